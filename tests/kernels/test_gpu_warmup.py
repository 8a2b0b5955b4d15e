"""The start-up warm-up launches every Triton kernel variant a server then launches: checked on a
CPU by recording, under Triton's interpreter, the variant of each launch (kernel, constexprs,
launch options, argument dtypes, pointer alignment and the integer specializations Triton would
make) during the warm-up and during engine steps of every kind on the same tiny model."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.kernels.triton_env import DEVICE, IN_PROCESS, rerun_in_fresh_process

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from bench.common import model_config, random_text_model, random_tokenizer  # noqa: E402
from services.language.engine.build import core_for_model  # noqa: E402
from services.language.engine.config import EngineConfig  # noqa: E402
from services.language.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from services.language.runner import setup  # noqa: E402
from shared.kernels import select  # noqa: E402
from shared.kernels.gpu import interpreter_compat, tiles, warmup  # noqa: E402

if DEVICE.type == "cpu":
    interpreter_compat.apply()


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if not IN_PROCESS and request.node.name != "test_interpreter_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET was set")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_interpreter_in_fresh_process():
    done = rerun_in_fresh_process(__file__)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]


def _variant(fn: InterpretedFunction, args: tuple, kwargs: dict) -> tuple:
    """What a compiled launch is specialized on, as far as the arguments show it."""
    unspecialized = set(fn.kwargs.get("do_not_specialize") or ())
    key = []
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool | float) or value is None:
            key.append((name, type(value).__name__))
        elif isinstance(value, int) and name not in unspecialized:
            key.append((name, value == 1, value % 16 == 0))
    return fn.fn.__name__, tuple(key), tuple(sorted(kwargs.items()))


@contextlib.contextmanager
def _recording(seen: set):
    run = InterpretedFunction.run

    def recorded(fn, *args, **kwargs):
        options = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        seen.add(_variant(fn, args, options))
        return run(fn, *args, **kwargs)

    InterpretedFunction.run = recorded
    try:
        yield seen
    finally:
        InterpretedFunction.run = run


@pytest.fixture
def gpu_selection(monkeypatch):
    monkeypatch.setenv("SPLITVL_KERNELS", "gpu")
    select.implementation.cache_clear()
    select._backend.cache_clear()
    yield
    select.implementation.cache_clear()
    select._backend.cache_clear()


SHORT = warmup.SHORT_PREFILL


def _request(rid: str, num_tokens: int, new: int) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    return GenerationRequest(rid, tuple(range(100, 100 + num_tokens)), (), sampling, 0.0)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="records launches in Triton's interpreter")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_warmup_covers_every_variant_the_engine_launches(gpu_selection, dtype):
    config = model_config("tiny", 1)  # one MoE decoder layer: the interpreter is slow
    model = random_text_model(config, getattr(torch, dtype), "cpu")
    engine_config = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=SHORT + 2,
        max_model_len=512,  # 32 blocks of 16: decode splits and merges
        device="cpu",
        dtype=dtype,
        kv_cache_memory=8 * 2**20,
        pad_decodes=True,  # the graphs' steps, eagerly
    )
    core = core_for_model(model, config, random_tokenizer(config.text.vocab_size), engine_config)
    warmed: set = set()
    with _recording(warmed):
        setup.warm_up_kernels(model, config, core.executor.runner)
    served: set = set()
    with _recording(served):
        core.add_request(_request("a", SHORT + 4, 4))  # a chunk on the long tile, then 2 tokens
        for _ in range(3):
            core.step()  # then padded decode steps
        core.add_request(_request("b", 6, 2))  # a mixed step: a decodes, b prefills
        while core.has_work():
            core.step()
    names = {v[0] for v in served}
    assert {"_decode_kernel", "_decode_merge_kernel", "_prefill_kernel", "_gate_up_kernel"} <= names
    # Both tile heights in bf16 (fp32's long tile is the short one: 16 positions)
    prefills = {v for v in served if v[0] == "_prefill_kernel"}
    assert len(prefills) == (2 if dtype == "bfloat16" else 1)
    missing = served - warmed
    assert not missing, "\n".join(map(str, sorted(missing)))


def test_moe_tile_configs_are_those_of_every_token_count_in_range():
    cpu = torch.device("cpu")
    for max_tokens in (1, 40, 300, 8192):
        for dtype in (torch.bfloat16, torch.float32):
            want = {
                tuple(tiles.moe_config(8, 48, n, cpu, dtype).items())
                for n in range(1, max_tokens + 1)
            }
            got = warmup.moe_tile_configs(8, 48, max_tokens, cpu, dtype)
            assert {tuple(c.items()) for c in got} == want and len(got) == len(want)


def test_the_runner_warms_up_only_on_cuda_with_the_triton_kernels(monkeypatch):
    """build_runner warms up where `compiles_triton`: a CUDA device with the Triton backend."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(setup.select, "accelerated", lambda device_type: True)
    assert setup.compiles_triton(cuda) and not setup.compiles_triton(cpu)
    monkeypatch.setattr(setup.select, "accelerated", lambda device_type: False)
    assert not setup.compiles_triton(cuda)
    calls = []
    monkeypatch.setattr(setup, "warm_up_kernels", lambda *args: calls.append(args))
    config = model_config("tiny", 1)
    model = random_text_model(config, torch.float32, "cpu")
    engine_config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory=2**20)
    tokenizer = random_tokenizer(config.text.vocab_size)
    core_for_model(model, config, tokenizer, engine_config)
    assert calls == []
    monkeypatch.setattr(setup, "compiles_triton", lambda device: True)
    core = core_for_model(model, config, tokenizer, engine_config)
    [(got_model, got_config, runner)] = calls
    assert got_model is model and got_config is config and runner is core.executor.runner
