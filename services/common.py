"""What both services share: byte sizes, dtype names, data: URL payloads, port files.

Each service maps the errors raised here onto its own typed errors, so this module depends on
nothing in either service.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.model.config import DTYPES

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1024 * GIB}


def parse_bytes(text: str | int, error: type[Exception] = ValueError) -> int:
    """'512MiB', '1.5G', '4096' -> bytes (binary units; the B/iB suffix is optional).

    `error` is the exception class raised for text that is not a size, so a caller can raise
    its own typed error (argparse.ArgumentTypeError for a command-line `type=`).
    """
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise error(f"cannot parse size {text!r}; use e.g. 4096, 512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_dtype(name: str, error: type[Exception] = ValueError) -> torch.dtype:
    """'float32' / 'fp32' / 'bfloat16' / 'bf16' / 'float16' / 'fp16' -> torch dtype."""
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise error(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype, error: type[Exception] = ValueError) -> str:
    """torch.bfloat16 -> 'bfloat16' (the wire name)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise error(f"dtype {dtype} is not one of {', '.join(DTYPES)}")


class DataURLError(ValueError):
    """A data: URL that is malformed or whose base64 payload does not decode."""


class DataURLTooLargeError(DataURLError):
    """A data: URL whose payload decodes to more bytes than allowed."""


@dataclass(frozen=True)
class DataURL:
    """The parts of data:[<mime>][;<param>...],<payload> (mime and params lower-cased)."""

    mime: str
    params: tuple[str, ...]
    payload: str

    @property
    def is_base64(self) -> bool:
        """Whether the payload is base64 (otherwise it is percent-encoded)."""
        return "base64" in self.params


def split_data_url(url: str) -> DataURL:
    """Split a data: URL into media type, parameters and payload; DataURLError without a ','."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise DataURLError("data URL has no ',' separating the header from the data")
    media = header[len("data:") :].split(";")
    mime = media[0].strip().lower()
    return DataURL(mime, tuple(p.strip().lower() for p in media[1:]), payload)


def decode_base64_payload(payload: str, max_bytes: int) -> bytes:
    """Decode a data URL's base64 payload, refusing one over max_bytes before decoding it."""
    payload = "".join(payload.split())
    # base64 expands 3 bytes to 4 characters: refuse before allocating the decoded image
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise DataURLTooLargeError(
            f"image is about {len(payload) // 4 * 3} bytes, above the limit of {max_bytes} bytes"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataURLError(f"data URL is not valid base64: {exc}") from exc
    if len(data) > max_bytes:  # padding lets the estimate above run two bytes short
        raise DataURLTooLargeError(f"image is {len(data)} bytes, above the limit of {max_bytes}")
    return data


def write_port_file(path: Path, info: dict[str, Any]) -> None:
    """Write `info` and this process's pid as JSON to `path`, atomically.

    Launchers poll this file to learn ports bound as port 0, so it is written to a temporary
    name and renamed: a reader never sees a half-written file.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)
