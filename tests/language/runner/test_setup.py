"""The KV pool decides max_model_len when the flag is left out: the longest sequence the pool
holds, capped at the model's; a given length is kept (the server refuses one that cannot fit)."""

from __future__ import annotations

from services.language.engine import AsyncEngine, EngineConfig
from services.language.runner.model_runner import RunnerConfig
from services.language.runner.setup import RunnerSetup, fit_to_pool
from shared.model.config import load_config


def _setup(max_model_len: int, fit: bool) -> RunnerSetup:
    runner = RunnerConfig(8, 256, max_model_len, block_size=16)
    return RunnerSetup(runner, None, 0.9, 8, fit_max_model_len=fit)


def test_the_pool_decides_without_a_given_length_capped_at_the_models():
    assert fit_to_pool(_setup(262_144, fit=True), num_blocks=100).runner.max_model_len == 1600
    assert fit_to_pool(_setup(1000, fit=True), num_blocks=100).runner.max_model_len == 1000
    given = _setup(4096, fit=False)
    assert fit_to_pool(given, num_blocks=100) is given  # a given length is never changed
    fitted = fit_to_pool(_setup(262_144, fit=True), 100)
    assert fit_to_pool(fitted, 50) is fitted  # fitted once, on the pool that was built


def test_an_engine_without_max_model_len_gets_the_longest_its_pool_holds(tiny_vl_model_dir):
    model_max = load_config(tiny_vl_model_dir).text.max_position_embeddings
    engine = AsyncEngine.from_model_dir(
        tiny_vl_model_dir, EngineConfig(kv_cache_memory=256 * 2**10)
    )
    blocks = engine.stats().num_total_blocks
    assert blocks * 16 < model_max  # a pool too small for the model's own length
    assert engine.max_model_len == blocks * 16
    roomy = AsyncEngine.from_model_dir(tiny_vl_model_dir, EngineConfig(kv_cache_memory=64 * 2**20))
    assert roomy.max_model_len == model_max


def test_cuda_graphs_need_the_triton_kernels(caplog, monkeypatch):
    import types

    from services.language.engine import build
    from shared.kernels import select

    wants = types.SimpleNamespace(cuda_graphs=True, device="cuda:0")
    monkeypatch.setattr(select, "accelerated", lambda device_type: False)
    with caplog.at_level("WARNING"):
        assert build.decode_graphs(wants) is False
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "CUDA graphs off" in warning.getMessage()
    monkeypatch.setattr(select, "accelerated", lambda device_type: device_type == "cuda")
    assert build.decode_graphs(wants) is True
    assert build.decode_graphs(types.SimpleNamespace(cuda_graphs=False, device="cpu")) is False
