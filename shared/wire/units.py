"""Byte sizes and dtype names as both services read them from flags and write them on the wire."""

from __future__ import annotations

import re

import torch

__all__ = [
    "DTYPES",
    "GIB",
    "KIB",
    "MIB",
    "compute_dtype",
    "cpu_has_native_bf16",
    "dtype_name",
    "nbytes",
    "parse_bytes",
    "parse_dtype",
    "resolve_dtype",
]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# The dtypes a checkpoint, a flag or the wire may name, by their wire names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return tensor.numel() * tensor.element_size()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); else bf16 is emulated
    and slower than fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(
    requested: str | torch.dtype | None,
    checkpoint_dtype: torch.dtype,
    device: str | torch.device,
    error: type[Exception] = ValueError,
) -> torch.dtype:
    """The compute dtype for `requested` ("auto" / None or a dtype name).

    "auto" follows the checkpoint, except half precision on a CPU without native bf16, where fp32
    is faster. Both services resolve it with this one rule, so with "auto" on both sides the
    embeddings on the wire already have the language model's dtype.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        return parse_dtype(requested, error)
    if torch.device(device).type == "cpu" and checkpoint_dtype != torch.float32:
        return checkpoint_dtype if cpu_has_native_bf16() else torch.float32
    return checkpoint_dtype


def compute_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype to compute `dtype` in on `device`: fp32 for bf16 on a CPU without native bf16,
    where bf16 matmuls are emulated and 5-7x slower than fp32 ones (results are cast back to
    `dtype`, which stays the dtype on the wire); else `dtype` itself."""
    emulated = torch.device(device).type == "cpu" and not cpu_has_native_bf16()
    return torch.float32 if dtype == torch.bfloat16 and emulated else dtype
