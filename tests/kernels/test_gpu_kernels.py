"""The Triton kernels against the PyTorch references.

Without CUDA the kernels run in Triton's CPU interpreter on CPU tensors at tiny shapes (the
interpreter runs every program in Python, so shapes stay small). With CUDA the same small
cases run compiled, and the ``gpu`` tests add the Qwen3-VL-30B-A3B shapes in bf16 and a CUDA
graph capture of fused MoE + paged decode.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math

import pytest  # noqa: E402
import torch

from tests.kernels.triton_env import DEVICE, IN_PROCESS, rerun_in_fresh_process

pytest.importorskip("triton")

import shared.kernels.gpu as triton_kernels  # noqa: E402
from shared.kernels.gpu import interpreter_compat, tiles  # noqa: E402
from shared.kernels.reference import (  # noqa: E402
    fused_moe_torch,  # noqa: E402
    paged_decode_torch,
    paged_prefill_torch,
)

moe_mod = importlib.import_module("shared.kernels.gpu.moe_triton")
align_mod = importlib.import_module("shared.kernels.gpu.moe_align")
attn_mod = importlib.import_module("shared.kernels.gpu.attention_triton")
if DEVICE.type == "cpu":
    interpreter_compat.apply()


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if not IN_PROCESS and request.node.name != "test_interpreter_in_fresh_process":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET was set; "
            "test_interpreter_in_fresh_process runs this file instead"
        )


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_interpreter_in_fresh_process():
    done = rerun_in_fresh_process(__file__)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gen(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _randn(*shape, seed, scale=1.0, dtype=torch.float32, device=DEVICE):
    """Drawn on the target device: the 30B-A3B expert weights are 600M numbers."""
    x = torch.randn(*shape, generator=_gen(seed, device), device=device)
    return (x * scale).to(dtype)


# ----------------------------------------------------------------------------- package


def test_package_has_the_reference_signatures(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernels.available()
    for name, ref in [
        ("fused_moe", fused_moe_torch),
        ("paged_decode", paged_decode_torch),
        ("paged_prefill", paged_prefill_torch),
    ]:
        fn = getattr(triton_kernels, name)
        assert inspect.isfunction(fn), f"{name} is {fn!r}"
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(ref).parameters)


def test_tile_configs_load_and_fall_back():
    h200 = tiles.table_for(128, 768, "NVIDIA_H200")
    default = tiles.table_for(128, 768, "some_other_gpu")
    assert h200 is not default and h200[1]["BLOCK_SIZE_M"] == 16
    assert tiles.moe_config(4, 48, 33, torch.device("cpu")) == default[16]  # nearest M
    assert default == tiles.BUILTIN_DEFAULT  # the fallback for installs without the JSON
    for table in (h200, default):
        for entry in table.values():
            assert entry["BLOCK_SIZE_M"] >= 16 and entry["BLOCK_SIZE_K"] >= 16


def test_the_h100_table_is_the_h200_one_marked_as_derived(tmp_path):
    name = tiles.config_file_name(128, 768, "NVIDIA_H100_80GB_HBM3")
    raw = json.loads((tiles.CONFIG_DIR / name).read_text())
    assert raw["_derived_from"] == tiles.config_file_name(128, 768, "NVIDIA_H200")
    assert "_comment" in raw
    assert tiles.table_for(128, 768, "NVIDIA_H100_80GB_HBM3") == tiles.table_for(
        128, 768, "NVIDIA_H200"
    )
    # Notes are skipped; a malformed entry is still refused.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"_comment": "x", "16": {"BLOCK_SIZE_M": 16}}))
    with pytest.raises(tiles.TileConfigError, match="M=16 lacks"):
        tiles._load(bad)


# ----------------------------------------------------------------------------- fused MoE


def _routing(num_tokens, num_experts, top_k, seed, device=DEVICE, dtype=torch.float32):
    gen = _gen(seed)
    ids = torch.stack(
        [torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]
    )
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return weights.to(device=device, dtype=dtype), ids.to(device)


def _moe_inputs(
    num_tokens, num_experts, top_k, hidden=64, inter=48, seed=0, dtype=torch.float32, device=DEVICE
):
    x = _randn(num_tokens, hidden, seed=seed, dtype=dtype, device=device)
    gate_up = _randn(
        num_experts,
        hidden,
        2 * inter,
        seed=seed + 1,
        scale=hidden**-0.5,
        dtype=dtype,
        device=device,
    )
    down = _randn(
        num_experts, inter, hidden, seed=seed + 2, scale=inter**-0.5, dtype=dtype, device=device
    )
    weights, ids = _routing(num_tokens, num_experts, top_k, seed + 3, device, dtype)
    return x, gate_up, down, weights, ids


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,block_m",
    # 1100 x 2 rows: several 1024-row chunks per program; 6 experts: a padded histogram.
    [(1, 4, 1, 16), (5, 8, 2, 16), (33, 8, 2, 16), (33, 4, 2, 32), (1100, 6, 2, 16)],
)
def test_align_groups_rows_by_expert(num_tokens, num_experts, top_k, block_m):
    _, ids = _routing(num_tokens, num_experts, top_k, seed=num_tokens)
    sorted_rows, block_expert, num_blocks = align_mod.align_block_size(ids, num_experts, block_m)
    flat, num_rows = ids.reshape(-1).cpu(), ids.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    assert int(num_blocks) == int(((counts + block_m - 1) // block_m).sum())
    assert bool(((block_expert >= 0) & (block_expert < num_experts)).all())  # unused ones too
    blocks = sorted_rows[: int(num_blocks) * block_m].view(-1, block_m).cpu()
    seen = []
    for rows, expert in zip(blocks, block_expert[: int(num_blocks)].cpu(), strict=True):
        real = rows[rows < num_rows]
        assert real.numel() > 0 and (flat[real] == expert).all()
        assert (rows[rows >= num_rows] == num_rows).all()  # padding holds the sentinel
        seen += real.tolist()
    # Every row exactly once; within an expert in flat order (expert-major, stable).
    assert seen == sorted(range(num_rows), key=lambda r: (int(flat[r]), r))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_fused_moe_matches_reference(num_tokens, num_experts, top_k):
    args = _moe_inputs(num_tokens, num_experts, top_k, seed=num_tokens * 10 + num_experts)
    out = triton_kernels.fused_moe(*args)
    torch.testing.assert_close(out, fused_moe_torch(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_moe_rows_of_no_expert_add_nothing(top_k):
    """Id E routes a row to no expert: it is left out of the layout, its token gets only its
    other rows' terms, and a token with no routed row comes out zero (not garbage)."""
    num_experts = 8
    x, gate_up, down, weights, ids = _moe_inputs(7, num_experts, top_k, seed=13)
    ids[4:] = num_experts  # padding tokens
    ids[1, -1] = num_experts  # one row of a real token
    weights[ids == num_experts] = 0
    out = triton_kernels.fused_moe(x, gate_up, down, weights, ids)
    ref = fused_moe_torch(x, gate_up, down, weights, ids)
    assert torch.equal(out[4:], torch.zeros_like(out[4:])) and torch.equal(ref[4:], out[4:])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    real = ids[:4].clone()
    real[1, -1] = 0  # the same token with that row routed anywhere at weight 0
    plain = fused_moe_torch(x[:4], gate_up, down, weights[:4], real)
    torch.testing.assert_close(out[:4], plain, atol=1e-4, rtol=1e-4)
    sorted_rows, block_expert, num_blocks = align_mod.align_block_size(ids, num_experts, 16)
    laid_out = sorted_rows[: int(num_blocks) * 16]
    assert set(laid_out[laid_out < ids.numel()].tolist()) == set(
        torch.nonzero(ids.reshape(-1) < num_experts).flatten().tolist()
    )


def test_fused_moe_tiles_with_groups_and_k_loop(monkeypatch):
    """BLOCK_M 32, GROUP_M 4 and a K loop of several steps with a ragged last one."""
    cfg = {
        "BLOCK_SIZE_M": 32,
        "BLOCK_SIZE_N": 32,
        "BLOCK_SIZE_K": 32,
        "GROUP_SIZE_M": 4,
        "num_warps": 4,
        "num_stages": 2,
    }
    monkeypatch.setattr(tiles, "moe_config", lambda *a, **k: cfg)
    args = _moe_inputs(33, 8, 2, hidden=96, inter=40, seed=7)
    out = triton_kernels.fused_moe(*args)
    torch.testing.assert_close(out, fused_moe_torch(*args), atol=1e-4, rtol=1e-4)


def test_fused_moe_is_deterministic():
    args = _moe_inputs(5, 4, 2, seed=3)
    assert torch.equal(triton_kernels.fused_moe(*args), triton_kernels.fused_moe(*args))


def test_fused_moe_bf16():
    args = _moe_inputs(5, 8, 2, seed=11, dtype=torch.bfloat16)
    out = triton_kernels.fused_moe(*args)
    ref = fused_moe_torch(*[a.float() if a.is_floating_point() else a for a in args])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_fused_moe_rejects_mismatched_shapes():
    x, gate_up, down, weights, ids = _moe_inputs(2, 4, 1)
    with pytest.raises(moe_mod.MoeShapeError):
        triton_kernels.fused_moe(x, gate_up, down[:, :-1], weights, ids)


# ----------------------------------------------------------------------------- paged decode


def _paged_cache(
    num_seqs, max_context, block_size, kv_heads, head_dim, seed, dtype=torch.float32, device=DEVICE
):
    """A cache with a shuffled block table per sequence; block 0 is the scratch block."""
    width = -(-max_context // block_size)
    num_blocks = num_seqs * width + 1
    k_cache = _randn(
        num_blocks, block_size, kv_heads, head_dim, seed=seed, dtype=dtype, device=device
    )
    v_cache = _randn(
        num_blocks, block_size, kv_heads, head_dim, seed=seed + 1, dtype=dtype, device=device
    )
    tables = (torch.randperm(num_blocks - 1, generator=_gen(seed + 2)) + 1)[: num_seqs * width]
    return k_cache, v_cache, tables.view(num_seqs, width).to(device)


def _poison_outside(cache, tables, context_lens):
    """NaN everywhere a kernel must not read: the scratch block, unused table entries (pointed
    at the scratch block) and the unused tail of each sequence's last block."""
    poisoned = cache.clone()
    tables = tables.clone()
    block_size = cache.shape[1]
    keep = torch.zeros(cache.shape[:2], dtype=torch.bool, device=cache.device)
    for row, length in enumerate(context_lens.tolist()):
        pos = torch.arange(length, device=cache.device)
        keep[tables[row, pos // block_size], pos % block_size] = True
        tables[row, -(-length // block_size) :] = 0
    poisoned[~keep] = float("nan")
    return poisoned, tables


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("batch", [1, 3])
def test_paged_decode_matches_reference(batch, block_size, splits):
    kv_heads, heads, head_dim, max_context = 2, 4, 32, 70
    k_cache, v_cache, tables = _paged_cache(
        batch, max_context, block_size, kv_heads, head_dim, seed=batch * 100 + block_size
    )
    context_lens = torch.tensor([70, 1, 37][:batch], device=DEVICE)
    q = _randn(batch, heads, head_dim, seed=5)
    ref = paged_decode_torch(q, k_cache, v_cache, tables, context_lens, 0.3)
    k_bad, tables_bad = _poison_outside(k_cache, tables, context_lens)
    v_bad, _ = _poison_outside(v_cache, tables, context_lens)
    out = attn_mod.paged_decode_triton(q, k_bad, v_bad, tables_bad, context_lens, 0.3, splits)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# Rows of 1 to 3 partitions of MIN_PARTITION tokens and a row of one token.
LONG_CONTEXTS = [300, 1, 130, 257]


def _expected_splits(context: int, bound: int, block_n: int) -> tuple[int, int]:
    """(splits, tokens per split) of a row: the specification the kernel implements."""
    wanted = min(math.ceil(context / attn_mod.MIN_PARTITION), bound)
    partition = math.ceil(math.ceil(context / wanted) / block_n) * block_n
    return math.ceil(context / partition), partition


@pytest.mark.parametrize(
    "splits,table_dtype,dtype",
    [
        (None, torch.int32, torch.float32),
        (2, torch.int64, torch.float32),
        (8, torch.int32, torch.bfloat16),
        (None, torch.int64, torch.bfloat16),
    ],
)
def test_paged_decode_splits_long_rows_by_their_own_context(splits, table_dtype, dtype):
    """Rows split by their own context length (read on the device) under one static bound;
    the merge loops over each row's own split count; int32 and int64 tables alike."""
    batch, kv_heads, heads, head_dim, block_size = 4, 2, 4, 32, 16
    k_cache, v_cache, tables = _paged_cache(
        batch, 320, block_size, kv_heads, head_dim, seed=41, dtype=dtype
    )
    context_lens = torch.tensor(LONG_CONTEXTS, device=DEVICE)
    q = _randn(batch, heads, head_dim, seed=42, dtype=dtype)
    up = [t.float() for t in (q, k_cache, v_cache)]
    ref = paged_decode_torch(*up, tables, context_lens, 0.2)
    k_bad, tables_bad = _poison_outside(k_cache, tables, context_lens)
    v_bad, _ = _poison_outside(v_cache, tables, context_lens)
    tables_bad = tables_bad.to(table_dtype)
    out = attn_mod.paged_decode_triton(q, k_bad, v_bad, tables_bad, context_lens, 0.2, splits)
    assert out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_paged_decode_programs_cover_real_shares(monkeypatch):
    """Each row uses cdiv(context, MIN_PARTITION) splits (at most the bound) of equal, tile-
    rounded length: exactly those write a partial result; a one-split row writes none."""
    seen, allocate = {}, attn_mod.split_buffers

    def poisoned(*args):
        part, lse = allocate(*args)
        seen.update(part=part.fill_(float("nan")), lse=lse.fill_(float("nan")))
        return part, lse

    monkeypatch.setattr(attn_mod, "split_buffers", poisoned)
    bound, head_dim = 8, 32
    k_cache, v_cache, tables = _paged_cache(4, 320, 16, 2, head_dim, seed=43)
    context_lens = torch.tensor(LONG_CONTEXTS, device=DEVICE)
    q = _randn(4, 4, head_dim, seed=44)
    attn_mod.paged_decode_triton(q, k_cache, v_cache, tables, context_lens, 0.2, bound)
    written = ~torch.isnan(seen["lse"]).cpu()  # [B, Hq, bound]
    block_n = attn_mod.tile_n(head_dim, q.dtype)
    for row, context in enumerate(LONG_CONTEXTS):
        used, partition = _expected_splits(context, bound, block_n)
        assert (used - 1) * partition < context  # the last split holds tokens too
        want = torch.arange(bound) < used if used > 1 else torch.zeros(bound, dtype=torch.bool)
        assert torch.equal(written[row], want.expand(4, bound)), (row, context)


def test_paged_decode_public_entry_and_bf16():
    k_cache, v_cache, tables = _paged_cache(2, 40, 16, 2, 32, seed=9, dtype=torch.bfloat16)
    context_lens = torch.tensor([40, 17], device=DEVICE)
    q = _randn(2, 4, 32, seed=10, dtype=torch.bfloat16)
    out = triton_kernels.paged_decode(q, k_cache, v_cache, tables, context_lens, 0.2)
    ref = paged_decode_torch(q.float(), k_cache.float(), v_cache.float(), tables, context_lens, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_num_splits_fills_the_gpu_for_one_long_sequence():
    cpu = torch.device("cpu")  # the split count depends on shapes and the SM count only
    assert attn_mod.num_splits(1, 4, 70, cpu) == 1  # below one partition: no split
    assert attn_mod.num_splits(1, 4, 8192, cpu) > 1
    assert attn_mod.num_splits(64, 4, 8192, cpu) == 1  # enough programs already


# ----------------------------------------------------------------------------- paged prefill


def _prefill_case(
    context_start,
    num_tokens,
    block_size,
    seed,
    dtype=torch.float32,
    device=DEVICE,
    heads=4,
    kv_heads=2,
    head_dim=32,
):
    total = context_start + num_tokens
    k_cache, v_cache, tables = _paged_cache(
        1, total, block_size, kv_heads, head_dim, seed, dtype, device
    )
    table = tables[0]
    q = _randn(num_tokens, heads, head_dim, seed=seed + 3, dtype=dtype, device=device)
    k = _randn(num_tokens, kv_heads, head_dim, seed=seed + 4, dtype=dtype, device=device)
    v = _randn(num_tokens, kv_heads, head_dim, seed=seed + 5, dtype=dtype, device=device)
    pos = torch.arange(context_start, total, device=device)
    k_cache[table[pos // block_size], pos % block_size] = k  # as the runner writes the chunk
    v_cache[table[pos // block_size], pos % block_size] = v
    return q, k, v, k_cache, v_cache, table


@pytest.mark.parametrize("context_start,num_tokens", [(0, 1), (0, 20), (13, 7), (30, 20)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_prefill_matches_reference(context_start, num_tokens, block_size):
    q, k, v, k_cache, v_cache, table = _prefill_case(
        context_start, num_tokens, block_size, seed=context_start + num_tokens
    )
    ref = paged_prefill_torch(q, k, v, k_cache, v_cache, table, context_start, 0.25)
    # Only the context before the chunk is read from the cache; the chunk comes from k, v.
    lens = torch.tensor([context_start], device=DEVICE)
    k_bad = _poison_outside(k_cache, table[None], lens)[0]
    v_bad = _poison_outside(v_cache, table[None], lens)[0]
    out = triton_kernels.paged_prefill(q, k, v, k_bad, v_bad, table, context_start, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    narrow = table.to(torch.int32)  # the runner's tables
    out = triton_kernels.paged_prefill(q, k, v, k_bad, v_bad, narrow, context_start, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    ref32 = paged_prefill_torch(q, k, v, k_cache, v_cache, narrow, context_start, 0.25)
    torch.testing.assert_close(ref32, ref, atol=0, rtol=0)


def test_paged_prefill_long_chunk_and_bf16():
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]:
        q, k, v, k_cache, v_cache, table = _prefill_case(9, 40, 16, seed=21, dtype=dtype)
        out = triton_kernels.paged_prefill(q, k, v, k_cache, v_cache, table, 9, 0.25)
        up = [t.float() for t in (q, k, v, k_cache, v_cache)]
        ref = paged_prefill_torch(*up, table, 9, 0.25)
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- GPU, 30B-A3B


A3B = {
    "hidden": 2048,
    "experts": 128,
    "top_k": 8,
    "inter": 768,
    "heads": 32,
    "kv_heads": 4,
    "head_dim": 128,
    "block_size": 16,
}


def _close_to_fp32(out, ref_bf16, ref_fp32):
    """bf16 kernels against an fp32 oracle: no worse than twice the bf16 reference's error."""
    err = (out.float() - ref_fp32).abs().max().item()
    ref_err = (ref_bf16.float() - ref_fp32).abs().max().item()
    scale = ref_fp32.abs().max().item()
    assert err <= 2 * ref_err + 1e-3 * scale, (err, ref_err, scale)


def _a3b_moe(num_tokens, seed):
    cuda = torch.device("cuda")
    return _moe_inputs(
        num_tokens,
        A3B["experts"],
        A3B["top_k"],
        A3B["hidden"],
        A3B["inter"],
        seed=seed,
        dtype=torch.bfloat16,
        device=cuda,
    )


def _fp32(args):
    return [a.float() if a.is_floating_point() else a for a in args]


@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 1024])
def test_gpu_fused_moe_a3b(num_tokens):
    args = _a3b_moe(num_tokens, seed=num_tokens)
    out = triton_kernels.fused_moe(*args)
    _close_to_fp32(out, fused_moe_torch(*args), fused_moe_torch(*_fp32(args)))


def _a3b_decode(batch, max_context, seed):
    cuda = torch.device("cuda")
    k_cache, v_cache, tables = _paged_cache(
        batch,
        max_context,
        A3B["block_size"],
        A3B["kv_heads"],
        A3B["head_dim"],
        seed,
        torch.bfloat16,
        cuda,
    )
    lens = torch.randint(1, max_context + 1, (batch,), generator=_gen(seed))
    lens[0] = max_context
    q = _randn(
        batch, A3B["heads"], A3B["head_dim"], seed=seed + 7, dtype=torch.bfloat16, device=cuda
    )
    return q, k_cache, v_cache, tables, lens.to(cuda)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch,max_context", [(1, 1024), (1, 8192), (16, 8192), (64, 1024)])
def test_gpu_paged_decode_a3b(batch, max_context):
    q, k_cache, v_cache, tables, lens = _a3b_decode(batch, max_context, seed=batch)
    scale = A3B["head_dim"] ** -0.5
    out = triton_kernels.paged_decode(q, k_cache, v_cache, tables, lens, scale)
    ref = paged_decode_torch(q, k_cache, v_cache, tables, lens, scale)
    ref32 = paged_decode_torch(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    _close_to_fp32(out, ref, ref32)


@gpu
@needs_cuda
@pytest.mark.parametrize("context_start,num_tokens", [(0, 1066), (1000, 66), (512, 1)])
def test_gpu_paged_prefill_a3b(context_start, num_tokens):
    q, k, v, k_cache, v_cache, table = _prefill_case(
        context_start,
        num_tokens,
        A3B["block_size"],
        seed=1,
        dtype=torch.bfloat16,
        device=torch.device("cuda"),
        heads=A3B["heads"],
        kv_heads=A3B["kv_heads"],
        head_dim=A3B["head_dim"],
    )
    scale = A3B["head_dim"] ** -0.5
    out = triton_kernels.paged_prefill(q, k, v, k_cache, v_cache, table, context_start, scale)
    ref = paged_prefill_torch(q, k, v, k_cache, v_cache, table, context_start, scale)
    ref32 = paged_prefill_torch(
        *[t.float() for t in (q, k, v, k_cache, v_cache)], table, context_start, scale
    )
    _close_to_fp32(out, ref, ref32)


@contextlib.contextmanager
def _sync_debug_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@needs_cuda
def test_gpu_moe_and_decode_replay_in_a_cuda_graph():
    """Captured once, replayed on new routing, queries and context lengths without a sync."""
    num_tokens, batch, max_context = 4, 4, 1024
    scale = A3B["head_dim"] ** -0.5
    x, gate_up, down, weights, ids = _a3b_moe(num_tokens, seed=1)
    q, k_cache, v_cache, tables, lens = _a3b_decode(batch, max_context, seed=2)

    def step():
        return (
            triton_kernels.fused_moe(x, gate_up, down, weights, ids),
            triton_kernels.paged_decode(q, k_cache, v_cache, tables, lens, scale),
        )

    # The next step's inputs, made on the device beforehand: host-to-device copies sync.
    x2 = _randn(num_tokens, A3B["hidden"], seed=5, dtype=torch.bfloat16, device=x.device)
    weights2, ids2 = _routing(num_tokens, A3B["experts"], A3B["top_k"], 6, x.device, torch.bfloat16)
    q2 = _randn(*q.shape, seed=7, dtype=torch.bfloat16, device=q.device)
    lens2 = torch.tensor([7, 1024, 300, 16], device=lens.device)
    torch.cuda.synchronize()

    # Eager first (every kernel compiles here), then the capture, which itself rejects any
    # synchronizing call; torch.cuda.graph synchronizes around it, so the mode is off there.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), _sync_debug_error():
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_out, attn_out = step()
    with _sync_debug_error():
        graph.replay()
        first = (moe_out.clone(), attn_out.clone())
        for dst, src in [(x, x2), (weights, weights2), (ids, ids2), (q, q2), (lens, lens2)]:
            dst.copy_(src)
        graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(moe_out, first[0]) and not torch.equal(attn_out, first[1])
    eager = step()  # the kernels are deterministic: a replay is bit-identical to a launch
    assert torch.equal(moe_out, eager[0]) and torch.equal(attn_out, eager[1])
    _close_to_fp32(
        moe_out,
        fused_moe_torch(x, gate_up, down, weights, ids),
        fused_moe_torch(*_fp32([x, gate_up, down, weights, ids])),
    )
    ref32 = paged_decode_torch(q.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    _close_to_fp32(attn_out, paged_decode_torch(q, k_cache, v_cache, tables, lens, scale), ref32)
