"""The C++ CPU kernels against the PyTorch references.

Tolerances. fp32: both sides accumulate in fp32 in different orders, ~1e-6 relative on
outputs of order one; 1e-5 leaves a margin. bf16: the kernels widen bf16 exactly, accumulate in
fp32 and round once at the end, so against the fp32 reference run on the same (bf16-valued)
inputs they are within half a bf16 ulp, 2^-8 relative, plus the fp32 noise above. The bf16
references themselves round every intermediate and are further off; they are not the oracle.
"""

from __future__ import annotations

import math

import pytest
import torch

from shared.kernels import cpu
from shared.kernels.cpu import build
from shared.kernels.reference import (
    add_rms_norm_torch,
    fused_moe_torch,
    paged_decode_torch,
    paged_prefill_torch,
    qk_norm_rope_torch,
)

BF16_RTOL = 2.0**-8


@pytest.fixture(scope="module")
def kernels():
    if not cpu.available():
        pytest.skip(f"CPU extension not built here: {cpu.build_error()}")
    return cpu


@pytest.fixture
def threads():
    """Sets the intra-op thread count for a test and restores it afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_extension_builds_where_a_compiler_exists():
    """A machine with a C++ compiler must get the extension; only one without may skip."""
    if build.compiler() is None:
        pytest.skip("no C++ compiler on PATH: the PyTorch references run instead")
    assert cpu.available(), f"a C++ compiler exists but the CPU kernels failed: {cpu.build_error()}"


def test_missing_compiler_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPLITVL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu, "_error", None)
    with pytest.raises(build.BuildError, match="no C\\+\\+ compiler"):
        build.library()
    assert cpu._load() is False
    assert "no C++ compiler" in cpu.build_error()
    assert [r for r in caplog.records if r.levelname == "WARNING"]


def test_held_build_lock_times_out(tmp_path, monkeypatch):
    if build.compiler() is None:
        pytest.skip("no C++ compiler on PATH")
    from filelock import FileLock

    monkeypatch.setenv("SPLITVL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "LOCK_TIMEOUT_S", 0.2)
    directory = build.cache_dir()
    directory.mkdir(parents=True)
    with FileLock(str(directory / "build.lock")):
        with pytest.raises(build.BuildError, match="build.lock"):
            build.library()


# --- fused_moe -------------------------------------------------------------------------------


def _moe_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, seed, route=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    gate_up = torch.randn(num_experts, hidden, 2 * inter, generator=gen) / math.sqrt(hidden)
    down = torch.randn(num_experts, inter, hidden, generator=gen) / math.sqrt(inter)
    if route is None:
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        ids = scores.topk(top_k, dim=-1).indices
    else:
        ids = route
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return [t.to(dtype) for t in (x, gate_up, down, weights)] + [ids]


def _check_moe(kernels, inputs, dtype):
    """The kernel itself and the wrapper, which sends batches of `gemm_rows(dtype)` rows per
    expert and more (this CPU's crossover) to the reference: then it is the reference."""
    x, gate_up, down, weights, ids = inputs
    ref = fused_moe_torch(x.float(), gate_up.float(), down.float(), weights.float(), ids)
    scale = max(1.0, ref.abs().max().item())
    rows = kernels.gemm_rows(dtype)
    outs = [torch.ops.splitvl.fused_moe(*inputs)]
    if rows is not None and ids.numel() >= rows * gate_up.shape[0]:
        assert torch.equal(kernels.fused_moe(*inputs), fused_moe_torch(*inputs))
    else:
        outs.append(kernels.fused_moe(*inputs))
    for out in outs:
        assert out.dtype == dtype and out.shape == x.shape
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
        else:
            torch.testing.assert_close(out.float(), ref, rtol=BF16_RTOL, atol=1e-4 * scale)


MOE_SHAPES = [  # tokens, hidden, intermediate, experts, top_k
    (1, 64, 48, 4, 1),
    (3, 40, 24, 4, 2),
    (32, 512, 384, 16, 4),
    (257, 72, 52, 16, 4),
    (32, 36, 20, 16, 2),
    (257, 128, 136, 4, 2),
    (3, 24, 12, 16, 4),
    (1, 512, 384, 16, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "T{}-H{}-I{}-E{}-k{}".format(*s))
def test_fused_moe_matches_reference(kernels, shape, dtype):
    _check_moe(kernels, _moe_inputs(*shape, dtype, seed=sum(shape)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_moe_all_tokens_one_expert(kernels, dtype):
    """Every row on expert 2 (its row blocks split the work); the other experts get none."""
    num_tokens, top_k = 200, 1
    route = torch.full((num_tokens, top_k), 2, dtype=torch.long)
    _check_moe(kernels, _moe_inputs(num_tokens, 96, 80, 4, top_k, dtype, 1, route), dtype)


@pytest.mark.parametrize("num_tokens", [1, 2, 32, 257, 1100])
def test_fused_moe_fp32_activations_on_bf16_expert_weights(kernels, num_tokens):
    """bf16 expert weights with fp32 compute (CPUs without bf16 arithmetic): the kernel widens
    the weights exactly, so it matches fp32 on the same bf16-valued weights, at every size (the
    wrapper keeps prefill-sized batches on the kernel too)."""
    x, gate_up, down, weights, ids = _moe_inputs(num_tokens, 136, 200, 16, 4, torch.float32, 9)
    gate_up, down = gate_up.to(torch.bfloat16), down.to(torch.bfloat16)
    ref = fused_moe_torch(x, gate_up.float(), down.float(), weights, ids)
    scale = max(1.0, ref.abs().max().item())
    for out in (
        torch.ops.splitvl.fused_moe(x, gate_up, down, weights, ids),
        kernels.fused_moe(x, gate_up, down, weights, ids),
        fused_moe_torch(x, gate_up, down, weights, ids),
    ):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(TypeError, match="bfloat16 expert weights"):  # not the other way round
        torch.ops.splitvl.fused_moe(
            x.bfloat16(), gate_up.float(), down.float(), weights.bfloat16(), ids
        )


def test_fused_moe_idle_experts_and_repeated_order(kernels):
    """Experts 0 and 3 get nothing; top-k order is not sorted by id."""
    route = torch.tensor([[5, 1], [1, 5], [2, 4], [4, 2], [1, 2]])
    _check_moe(kernels, _moe_inputs(5, 48, 40, 6, 2, torch.float32, 2, route), torch.float32)


def test_fused_moe_beyond_one_token_chunk(kernels):
    """More tokens than one pass of the kernel handles (it works in chunks of tokens)."""
    _check_moe(kernels, _moe_inputs(1100, 32, 24, 4, 2, torch.float32, 3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_tokens", [3, 32, 257, 1100])
def test_fused_moe_same_for_any_thread_count(kernels, threads, dtype, num_tokens):
    inputs = _moe_inputs(num_tokens, 136, 200, 16, 4, dtype, seed=4)
    threads(1)
    one = torch.ops.splitvl.fused_moe(*inputs)
    threads(2)
    two = torch.ops.splitvl.fused_moe(*inputs)
    assert torch.equal(one, two)


def test_fused_moe_bad_expert_id(kernels):
    x, gate_up, down, weights, ids = _moe_inputs(4, 16, 8, 4, 2, torch.float32, 5)
    ids[2, 1] = 5  # 4 (= E) is the "no expert" id
    with pytest.raises(IndexError, match="expert id 5"):
        torch.ops.splitvl.fused_moe(x, gate_up, down, weights, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_moe_rows_of_no_expert_add_nothing(kernels, dtype):
    """Id E: the row reads no expert and adds nothing; a token with no routed row gets zeros
    (the padding rows of a padded step), as in the reference."""
    inputs = _moe_inputs(6, 16, 8, 4, 2, dtype, 7)
    ids, weights = inputs[4], inputs[3]
    ids[3:] = 4
    ids[0, 1] = 4
    weights[ids == 4] = 0
    _check_moe(kernels, inputs, dtype)
    out = torch.ops.splitvl.fused_moe(*inputs)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))


def test_fused_moe_other_dtypes_and_autograd_use_the_reference(kernels):
    x, gate_up, down, weights, ids = _moe_inputs(3, 16, 8, 4, 2, torch.float16, 6)
    ref = fused_moe_torch(x.float(), gate_up.float(), down.float(), weights.float(), ids)
    torch.testing.assert_close(
        kernels.fused_moe(x, gate_up, down, weights, ids).float(), ref, rtol=1e-2, atol=1e-2
    )
    x, gate_up, down, weights, ids = _moe_inputs(3, 16, 8, 4, 2, torch.float32, 6)
    gate_up.requires_grad_(True)
    out = kernels.fused_moe(x, gate_up, down, weights, ids)
    out.sum().backward()  # the reference ran: gradients flow
    assert gate_up.grad is not None


# --- paged_decode ----------------------------------------------------------------------------


def _decode_inputs(context_lens, heads, kv_heads, dim, block_size, dtype, seed):
    """(kernel inputs with NaN wherever nothing may be read, the same with zeros there)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(context_lens, dtype=torch.long)
    batch = len(context_lens)
    used = [-(-n // block_size) for n in context_lens]
    width = max(used) + 2  # rows padded past every context
    num_blocks = sum(used) + 1
    scratch = num_blocks - 1  # where padding entries point
    order = torch.randperm(num_blocks - 1, generator=gen).tolist()
    tables = torch.full((batch, width), scratch, dtype=torch.long)
    at = 0
    for b, n in enumerate(used):
        tables[b, :n] = torch.tensor(order[at : at + n])
        at += n
    shape = (num_blocks, block_size, kv_heads, dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    k_nan, v_nan = k.clone(), v.clone()
    k[scratch] = v[scratch] = 0.0
    k_nan[scratch] = v_nan[scratch] = float("nan")
    for b, n in enumerate(context_lens):  # rows of the last block past the context
        last, filled = tables[b, used[b] - 1], n - (used[b] - 1) * block_size
        k[last, filled:] = v[last, filled:] = 0.0
        k_nan[last, filled:] = v_nan[last, filled:] = float("nan")
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    return (q, k_nan, v_nan, tables, lens, scale), (q, k, v, tables, lens, scale)


def _check_decode(kernels, nan_inputs, finite_inputs):
    q, k, v, tables, lens, scale = finite_inputs
    out = kernels.paged_decode(*nan_inputs)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "read a position past a context or a scratch block"
    ref = paged_decode_torch(q.float(), k.float(), v.float(), tables, lens, scale)
    if q.dtype == torch.float32 and k.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref, rtol=BF16_RTOL, atol=1e-4)


def _case_id(case) -> str:
    lens, heads, kv, dim, block = case
    return f"B{len(lens)}-max{max(lens)}-G{heads // kv}-D{dim}-bs{block}"


DECODE_CASES = [  # context lengths, q heads, kv heads, head_dim, block size
    ([1], 4, 4, 64, 16),
    ([600], 8, 4, 64, 16),
    ([1, 17, 33, 100, 600], 8, 2, 64, 4),
    ([5, 16, 15, 64, 257], 8, 8, 36, 16),
    (list(range(1, 600, 19))[:32], 8, 4, 64, 16),
    (list(range(7, 600, 37)) * 2, 4, 1, 40, 4),
    ([300, 2], 16, 4, 128, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_paged_decode_matches_reference(kernels, case, dtype):
    lens, heads, kv, dim, block = case
    nan_inputs, finite = _decode_inputs(lens, heads, kv, dim, block, dtype, seed=len(lens) + dim)
    _check_decode(kernels, nan_inputs, finite)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_decode_reads_int32_tables(kernels, dtype):
    """The runner's block tables are int32: the same result as through int64 tables."""
    nan_inputs, finite = _decode_inputs([1, 17, 300], 8, 2, 64, 16, dtype, seed=11)
    narrow = lambda inputs: (*inputs[:3], inputs[3].to(torch.int32), *inputs[4:])  # noqa: E731
    _check_decode(kernels, narrow(nan_inputs), finite)
    assert torch.equal(kernels.paged_decode(*narrow(nan_inputs)), kernels.paged_decode(*nan_inputs))
    bad = narrow(nan_inputs)
    bad[3][0, 0] = -1
    with pytest.raises(IndexError, match="sequence 0"):
        kernels.paged_decode(*bad)


def test_paged_decode_fp32_queries_on_a_bf16_cache(kernels):
    nan_inputs, finite = _decode_inputs([40, 300], 8, 4, 64, 16, torch.bfloat16, seed=7)
    as_fp32 = lambda inputs: (inputs[0].float(), *inputs[1:])  # noqa: E731
    _check_decode(kernels, as_fp32(nan_inputs), as_fp32(finite))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "lens", [[600], [3, 500, 64, 129, 7], list(range(10, 600, 18))[:32]], ids=["B1", "B5", "B32"]
)
def test_paged_decode_same_for_any_thread_count(kernels, threads, dtype, lens):
    nan_inputs, _ = _decode_inputs(lens, 8, 4, 64, 16, dtype, seed=8)
    threads(1)
    one = kernels.paged_decode(*nan_inputs)
    threads(2)
    two = kernels.paged_decode(*nan_inputs)
    assert torch.equal(one, two)


def test_paged_decode_rejects_out_of_range_tables(kernels):
    (q, k, v, tables, lens, scale), _ = _decode_inputs([20, 5], 4, 2, 32, 16, torch.float32, 9)
    bad = tables.clone()
    bad[0, 1] = k.shape[0]
    with pytest.raises(IndexError, match="sequence 0"):
        kernels.paged_decode(q, k, v, bad, lens, scale)
    too_long = torch.tensor([20, tables.shape[1] * 16 + 1])
    with pytest.raises(IndexError, match="sequence 1"):
        kernels.paged_decode(q, k, v, tables, too_long, scale)


@pytest.mark.parametrize(
    ("vendor", "features", "fp32", "bf16"),
    [
        ("AuthenticAMD", ["avx2", "fma"], 96, None),  # Zen 3: bf16 never to emulated GEMMs
        ("GenuineIntel", ["avx2", "avx512f"], 24, None),
        ("GenuineIntel", ["avx2", "avx512f", "avx512_bf16"], 24, 12),
        ("GenuineIntel", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], 24, 12),
        ("AuthenticAMD", ["avx2", "avx512f", "avx512_bf16"], 160, 20),  # Zen 4
        ("AuthenticAMD", ["avx2", "avx512f"], 160, None),
        ("", ["avx2", "avx512f", "avx512_bf16"], 24, 12),  # vendor unknown
    ],
)
def test_gemm_crossover_follows_the_isa(monkeypatch, vendor, features, fp32, bf16):
    from shared.kernels import cpu
    from shared.kernels.cpu import build

    monkeypatch.setattr(build, "cpu_features", lambda: features)
    monkeypatch.setattr(build, "cpu_vendor", lambda: vendor)
    cpu.gemm_rows.cache_clear()
    try:
        assert cpu.gemm_rows(torch.float32) == fp32
        assert cpu.gemm_rows(torch.bfloat16) == bf16
    finally:
        cpu.gemm_rows.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("num_tokens", "context_start", "heads", "kv_heads", "block_size"),
    [
        (1, 37, 8, 4, 16),  # one token after a partial block
        (7, 16, 6, 6, 16),  # no grouping
        (33, 100, 12, 3, 8),  # groups of 4, context not on a block edge
        (64, 500, 9, 3, 16),  # odd head count
        (20, 0, 8, 2, 16),  # no cache: only the causal pass
        (300, 0, 8, 8, 16),  # no cache, no grouping, longer than a flash block
    ],
)
def test_paged_prefill_matches_reference(
    num_tokens, context_start, heads, kv_heads, block_size, dtype
):
    gen = torch.Generator().manual_seed(num_tokens + context_start)
    dim, total = 32, context_start + num_tokens
    num_blocks = (total + block_size - 1) // block_size
    k_cache = torch.randn(num_blocks + 3, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks + 3, block_size, kv_heads, dim, generator=gen).to(dtype)
    table = torch.randperm(num_blocks + 3, generator=gen)[:num_blocks]
    # The chunk's keys are already in the cache (the engine stores them before attending).
    flat = (table[:, None] * block_size + torch.arange(block_size)).flatten()[:total]
    k = k_cache.flatten(0, 1)[flat[context_start:]]
    v = v_cache.flatten(0, 1)[flat[context_start:]]
    q = torch.randn(num_tokens, heads, dim, generator=gen).to(dtype)
    with torch.inference_mode():
        ref = paged_prefill_torch(q, k, v, k_cache, v_cache, table, context_start, 0.2)
        out = cpu.paged_prefill(q, k, v, k_cache, v_cache, table, context_start, 0.2)
    assert out.dtype == dtype and out.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=BF16_RTOL, atol=2e-2)


# --- add_rms_norm ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "alone"])
@pytest.mark.parametrize("shape", [(1, 512), (32, 512), (7, 100), (3, 5, 36), (300, 2048)])
def test_add_rms_norm_matches_reference(kernels, threads, shape, residual, dtype):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[-1])
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    res = (torch.randn(*shape, generator=gen) * 3).to(dtype) if residual else None
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    ref_out, ref_h = add_rms_norm_torch(x, res, weight, 1e-6)
    for count in (1, 2):
        threads(count)
        out, h = kernels.add_rms_norm(x, res, weight, 1e-6)
        assert out.dtype == h.dtype == dtype and out.shape == h.shape == x.shape
        assert torch.equal(h, ref_h)  # the residual add rounds exactly as the reference's
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        else:
            # Only the sum of squares' order differs: now and then the normalized value rounds
            # one bf16 step away, which the weight's product can widen to two.
            steps = ref_out.float().abs() * 2.0**-6 + 1e-30
            assert ((out.float() - ref_out.float()).abs() <= steps).all()
            assert (out != ref_out).float().mean().item() < 1e-3
    if residual:
        with pytest.raises(ValueError, match="residual"):
            torch.ops.splitvl.add_rms_norm(x, res[..., :-1], weight, 1e-6)
    with pytest.raises(TypeError, match="float32 or all bfloat16"):
        torch.ops.splitvl.add_rms_norm(x, res, weight.to(torch.float16), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("tokens", "q_heads", "k_heads", "dim"),
    [(1, 8, 4, 64), (32, 8, 4, 64), (5, 9, 3, 36), (300, 16, 2, 128), (3, 2, 2, 10)],
)
def test_qk_norm_rope_matches_reference(kernels, threads, tokens, q_heads, k_heads, dim, dtype):
    gen = torch.Generator().manual_seed(tokens * 13 + dim)
    # q and k as the model has them: column slices of one fused projection's output.
    qkv = (torch.randn(tokens, (q_heads + 2 * k_heads) * dim, generator=gen) * 2).to(dtype)
    q = qkv[:, : q_heads * dim].view(tokens, q_heads, dim)
    k = qkv[:, q_heads * dim : (q_heads + k_heads) * dim].view(tokens, k_heads, dim)
    q_w, k_w = ((torch.rand(2, dim, generator=gen) + 0.5).to(dtype)).unbind(0)
    angles = torch.rand(tokens, dim, generator=gen) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    ref_q, ref_k = qk_norm_rope_torch(q, k, q_w, k_w, 1e-6, cos, sin)
    for count in (1, 2):
        threads(count)
        out_q, out_k = kernels.qk_norm_rope(q, k, q_w, k_w, 1e-6, cos, sin)
        for out, ref in ((out_q, ref_q), (out_k, ref_k)):
            assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
            if dtype == torch.float32:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            else:
                # Only the sum of squares' order differs: a normalized value may round one
                # bf16 step away now and then, which the products can widen.
                diff = (out.float() - ref.float()).abs()
                assert (diff <= ref.float().abs() * 2.0**-5 + 2.0**-6).all()
                assert (out != ref).float().mean().item() < 2e-3
    with pytest.raises(ValueError, match="D even"):
        torch.ops.splitvl.qk_norm_rope(q[..., :-1], k[..., :-1], q_w, k_w, 1e-6, cos, sin)
    with pytest.raises(TypeError, match="all float32 or all"):
        torch.ops.splitvl.qk_norm_rope(q, k, q_w.half(), k_w, 1e-6, cos, sin)


def test_cpu_summary_names_the_machine():
    line = build.cpu_summary()
    assert line.startswith(f"CPU: {build.cpu_model()}, ") and "usable cores; ISA: " in line
    assert all(f in line.split("ISA: ")[1].split() for f in build.cpu_features())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(
    "tokens, top_k, experts, hidden", [(1, 1, 4, 8), (37, 3, 5, 45), (300, 8, 32, 96)]
)
def test_moe_combine_equals_the_reference_bit_for_bit(
    kernels, threads, dtype, num_threads, tokens, top_k, experts, hidden
):
    """Rows routed nowhere (id E) included, hidden sizes with a partial last vector."""
    from shared.kernels.reference import moe_combine_torch

    threads(num_threads)
    gen = torch.Generator().manual_seed(tokens + hidden)
    h = torch.randn(tokens * top_k, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, experts + 1, (tokens, top_k), generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen).to(dtype)
    order = torch.argsort(ids.reshape(-1), stable=True)
    got = torch.ops.splitvl.moe_combine(h, order, weights, ids, experts)
    assert torch.equal(got, moe_combine_torch(h, order, weights, ids, experts))
    assert torch.equal(kernels.moe_combine(h, order, weights, ids, experts), got)


def test_moe_combine_refuses_what_it_cannot_read(kernels):
    h, weights = torch.randn(6, 8), torch.rand(3, 2)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    with pytest.raises(IndexError, match="not a permutation"):
        torch.ops.splitvl.moe_combine(h, torch.tensor([0, 1, 2, 2, 4, 5]), weights, ids, 3)
    with pytest.raises(ValueError, match="disagree"):
        torch.ops.splitvl.moe_combine(h[:5], torch.arange(6), weights, ids, 3)
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.splitvl.moe_combine(h, torch.arange(6), weights.double(), ids, 3)
