"""README.md as test input: its marked examples with their outputs, and its sections by heading.

An example is a fenced block right after `<!-- example: NAME -->`; what it prints is the fenced
block right after `<!-- output: NAME -->`, in which `...` stands for text that varies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

_MARKER = re.compile(r"^<!-- (example|output): ", re.M)
_BLOCK = re.compile(r"^<!-- (example|output): ([\w-]+) -->\n```(\w*)\n(.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Example:
    """One runnable block: `language` is its fence's (bash, python); `output` None: not checked."""

    name: str
    language: str
    code: str
    output: str | None


def examples(text: str) -> dict[str, Example]:
    """The marked examples in document order; a malformed or unpaired marker raises ValueError."""
    blocks = list(_BLOCK.finditer(text))
    if len(blocks) != len(_MARKER.findall(text)):
        raise ValueError("a marker is not followed directly by a fenced block")
    codes, outputs = {}, {}
    for m in blocks:
        kind, name, language, body = m.groups()
        target = codes if kind == "example" else outputs
        if name in target:
            raise ValueError(f"two {kind} blocks named {name!r}")
        target[name] = (language, body)
    if set(outputs) - set(codes):
        raise ValueError(f"outputs without an example: {sorted(set(outputs) - set(codes))}")
    return {
        name: Example(name, language, body, outputs.get(name, (None, None))[1])
        for name, (language, body) in codes.items()
    }


def section(text: str, heading: str) -> str:
    """From the line `heading` to the next heading of the same or a higher level (lines inside
    fenced blocks, such as shell comments, are not headings)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, inside, fenced = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            if inside:
                break
            inside = line == heading
            continue
        if inside:
            lines.append(line)
    if not inside:
        raise ValueError(f"README.md has no heading {heading!r}")
    return "\n".join(lines)
