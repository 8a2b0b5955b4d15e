"""argparse `type=` functions both services' command lines use: byte sizes and dtypes."""

from __future__ import annotations

import argparse

from shared.wire import units


def byte_size(text: str) -> int:
    """'512MiB', '2GiB', '1000000' -> bytes (binary units)."""
    try:
        return units.parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def dtype_choice(text: str) -> str:
    """'auto', or a dtype name or alias ('bf16', 'fp32', ...) -> its canonical name."""
    if text == "auto":
        return text
    try:
        return units.dtype_name(units.parse_dtype(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
