"""Byte sizes and dtypes as both services read them from flags and write them on the wire."""

from __future__ import annotations

import argparse

import pytest
import torch

from services.common.argtypes import byte_size, dtype_choice
from shared.wire.units import dtype_name, parse_bytes, parse_dtype


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("512MiB", 512 << 20), ("1.5G", 3 << 29), ("2 kib", 2048), ("1GB", 1 << 30)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected
    assert byte_size(text) == expected


def test_parse_errors_are_actionable_and_flag_errors_are_usage_errors():
    with pytest.raises(ValueError, match="e.g."):
        parse_bytes("lots")
    with pytest.raises(argparse.ArgumentTypeError, match="e.g."):
        byte_size("lots")
    with pytest.raises(ValueError, match="choose one of"):
        parse_dtype("int8")
    with pytest.raises(argparse.ArgumentTypeError, match="choose one of"):
        dtype_choice("int8")
    assert parse_dtype("bf16") is torch.bfloat16
    assert (dtype_choice("bf16"), dtype_choice("auto")) == ("bfloat16", "auto")
    assert dtype_name(torch.float16) == "float16"
    with pytest.raises(ValueError, match="not one of"):
        dtype_name(torch.int8)
