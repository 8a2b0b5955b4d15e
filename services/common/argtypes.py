"""argparse `type=` functions of the services' command lines: byte sizes, dtypes, media limits."""

from __future__ import annotations

import argparse
import json

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


def mm_limit_arg(text: str) -> dict[str, int]:
    """'{"image": 4, "video": 1}' (vLLM's form) or 'image=4' -> {"image": 4, "video": 1}."""
    try:
        value = json.loads(text)
    except ValueError:
        pairs = [part.partition("=") for part in text.split(",")]
        value = {k.strip(): n.strip() for k, sep, n in pairs if sep} if "=" in text else None
    if not isinstance(value, dict) or not value or set(value) - {"image", "video"}:
        raise argparse.ArgumentTypeError(f'expected {{"image": N, "video": M}}, got {text!r}')
    limits = {}
    for kind, number in value.items():
        try:
            limits[kind] = int(number)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"the {kind} limit must be an integer: {text!r}"
            ) from None
        if limits[kind] < 0:
            raise argparse.ArgumentTypeError(f"the {kind} limit must be >= 0: {text!r}")
    return limits
