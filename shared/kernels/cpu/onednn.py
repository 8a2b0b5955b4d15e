"""Half-precision GEMMs on the CPU at a bounded set of shapes.

torch hands bf16 and fp16 matmuls on the CPU to oneDNN, which generates machine code (AMX /
AVX512-BF16 tiles) for each new (M, K, N) and caches it: a first call at a new row count M
costs 0.7-10 ms of code generation, 5-20x the GEMM itself (measured on a Sapphire Rapids-class
Xeon at 32-1,900 rows). A serving engine sees a new M nearly every step (prefill chunk sizes,
rows per expert), so without care most bf16 prefill time went to the code generator. Here M is
rounded up to one of a few sizes per octave: at most 1/8 of the rows are padding and each
(K, N) meets ~8 shapes per doubling of M, generated once. fp32 goes to MKL, which generates
nothing per shape: it is passed through.

Every output row depends only on its own input row, so padding rows (zeros, or the next
expert's rows) never change the real ones beyond the kernel choice oneDNN makes per shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BUCKETED = (torch.bfloat16, torch.float16)
_EXACT_BELOW = 16  # row counts up to this are their own bucket (decode batches: few, reused)


def bucket_rows(m: int) -> int:
    """The row count a GEMM of `m` rows runs at: `m` up to 16, then the next multiple of
    2^(bit_length(m) - 4), i.e. 8 sizes per doubling and at most 1/8 padding."""
    if m <= _EXACT_BELOW:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


def bucketed(x: torch.Tensor) -> bool:
    return x.dtype in _BUCKETED and x.device.type == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, with the rows of a bf16 / fp16 `x` padded to `bucket_rows` (zeros) and cut
    off again: the result is a view of the first rows of the padded product."""
    if not bucketed(x) or x.dim() < 2:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    padded = bucket_rows(rows)
    if padded == rows:
        return F.linear(x, weight, bias)
    padded_x = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
    out = F.linear(padded_x, weight, bias)[:rows]
    return out.view(*x.shape[:-1], out.shape[-1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x ``[n, K]`` sorted by expert, w ``[E, K, N]``, offs int32 ``[E]`` cumulative rows ->
    ``[n, N]``: `torch._grouped_mm`'s result, one matmul per expert at `bucket_rows` of its
    rows. An expert's bucket reaches into the next expert's rows; experts run in order, so each
    real output row is last written by its own expert. Only a bucket that runs past the last
    row goes through a zero-padded copy of its rows."""
    if not bucketed(x):
        return torch._grouped_mm(x, w, offs=offs)
    n = x.shape[0]
    out = x.new_empty(n, w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        rows, m = end - start, bucket_rows(end - start)
        if rows > 0 and start + m <= n:
            torch.mm(x[start : start + m], w[e], out=out[start : start + m])
        elif rows > 0:
            tail = F.pad(x[start:end], (0, 0, 0, m - rows))
            out[start:end] = torch.mm(tail, w[e])[:rows]
        start = end
    return out
