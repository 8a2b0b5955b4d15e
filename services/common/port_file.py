"""What both services share besides the wire contract: the port file launchers read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_port_file(path: Path, info: dict[str, Any]) -> None:
    """Write `info` and this process's pid as JSON to `path`, atomically.

    Launchers poll this file to learn ports bound as port 0, so it is written to a temporary
    name and renamed: a reader never sees a half-written file.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)
