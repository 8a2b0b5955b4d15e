"""Two fixes to Triton 3.6's CPU interpreter, so the kernels' CPU tests exercise them fully.

- Loops with runtime bounds under NumPy >= 2.4: the interpreter holds every scalar as a
  one-element array and converts it with ``int()`` where Python needs an index
  (``range(0, n, BLOCK)`` with a runtime ``n``). NumPy 2.4 made that conversion of a non-0-d
  array a TypeError; Triton fixed it after 3.6 (triton-lang/triton#9172). The fix here converts
  through the single element.
- ``tl.dot`` on bf16: the interpreter stores bf16 as raw uint16 bits and multiplies the bits.
  The fix widens bf16 operands to fp32 first (exact), as the GPU's fp32 accumulation sees them.
- fp32 -> bf16 casts: the interpreter truncates (rounds toward zero) where the compiled cast
  rounds to nearest even, so a kernel that rounds as torch rounds would differ from torch under
  the interpreter only. The fix rounds to nearest even.
- fp32 -> e4m3 (fp8e4nv) casts: the interpreter rounds ties away from zero, flushes subnormals
  and drops the carry when rounding up crosses a power of two (127.9 becomes 64). The fix casts
  as torch does (nearest even, subnormals kept, saturating at 448 as the compiled cast does).

``apply()`` installs them once; it only touches the interpreter's own objects.
"""

from __future__ import annotations

import numpy as np


def _needs_patch() -> bool:
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def apply() -> None:
    """Install the fixes (each once; the index fix only where this NumPy needs it)."""
    _apply_bf16_dot()
    _apply_index()
    _apply_bf16_rounding()


def _apply_index() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_splitvl_index_fix", False) or not _needs_patch():
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # The scope restores attributes last-in first-out, so this layer unwinds cleanly.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._splitvl_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _apply_bf16_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "_splitvl_bf16_fix", False):
        return

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._splitvl_bf16_fix = True
    builder.create_dot = create_dot


def _round_to_bf16(values: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), rounded to nearest even; NaNs stay NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if np.any(nan):
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # a quiet NaN, same sign
    return rounded.reshape(np.shape(values))


def _round_to_e4m3(values: np.ndarray) -> np.ndarray:
    """fp32 values -> e4m3 bit patterns (uint8), as torch casts them."""
    import torch

    fp32 = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return fp32.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _apply_bf16_rounding() -> None:
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_splitvl_rounding_fix", False):
        return

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        nearest = rounding_mode in (None, ir.ROUNDING_MODE.RTNE)
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and nearest:
            return _round_to_bf16(data)
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv and nearest:
            return _round_to_e4m3(data)
        return original(data, input_dtype, output_dtype, rounding_mode)

    convert_float._splitvl_rounding_fix = True
    interpreter._convert_float = convert_float
