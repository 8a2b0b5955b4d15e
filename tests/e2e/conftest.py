"""End-to-end fixtures: the model under test and encode + language clusters as real processes.

The trained small checkpoint `models/shapes-vl/` is used when it is present (its answers have wide
margins, so greedy outputs equal transformers' exactly); otherwise the tiny random checkpoint
with a generated tokenizer stands in. SPLITVL_E2E_MODEL=DIR picks another shapes-style checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from scripts.testkit.launch import REPO, start_encode, start_language
from tests.e2e.reference import Reference
from tests.e2e.support import png_bytes, servable_copy

SHAPES_VL = REPO / "models" / "shapes-vl"
API_KEY = "e2e-key"
MODEL_NAME = "splitvl-e2e"


@dataclass(frozen=True)
class E2EModel:
    """The checkpoint the services serve, and how to ask it for greedy answers."""

    path: Path
    trained: bool

    def greedy(self) -> dict:
        """openai-client arguments for a greedy answer (fixed length on random weights)."""
        if self.trained:
            return {"temperature": 0, "max_tokens": 32, "extra_body": {"return_token_ids": True}}
        extra = {"return_token_ids": True, "ignore_eos": True}
        return {"temperature": 0, "max_tokens": 8, "extra_body": extra}

    def image_cases(self, n: int, seed: int = 0) -> list[tuple[bytes, str]]:
        """(PNG bytes, question) pairs the model can answer."""
        if self.trained:
            import io

            from scripts.shapes_vl.data import make_dataset

            cases = []
            for example in make_dataset(seed, n):
                buf = io.BytesIO()
                example.image.save(buf, format="PNG")
                cases.append((buf.getvalue(), example.question))
            return cases
        sizes = [(64, 48), (48, 96), (96, 64), (32, 32)]
        questions = ["What shape is this?", "What color is it?", "Describe the image."]
        return [
            (png_bytes(*sizes[i % len(sizes)], seed=seed + i), questions[i % len(questions)])
            for i in range(n)
        ]


def _trained_model_ready() -> bool:
    needed = ("config.json", "tokenizer.json", "preprocessor_config.json")
    return all((SHAPES_VL / name).is_file() for name in needed) and any(
        SHAPES_VL.glob("*.safetensors")
    )


@pytest.fixture(scope="session")
def e2e_model(request, tmp_path_factory) -> E2EModel:
    override = os.environ.get("SPLITVL_E2E_MODEL")  # any shapes-style checkpoint directory
    if override:
        return E2EModel(Path(override), trained=True)
    if _trained_model_ready():
        return E2EModel(SHAPES_VL, trained=True)
    tiny_dir = request.getfixturevalue("tiny_vl_dir")
    return E2EModel(servable_copy(tiny_dir, tmp_path_factory.mktemp("e2e_model")), False)


@pytest.fixture(scope="session")
def reference(request, e2e_model) -> Reference:
    if e2e_model.trained:
        from transformers import Qwen3VLMoeForConditionalGeneration

        hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(
            e2e_model.path, dtype=torch.float32
        ).eval()
    else:
        hf = request.getfixturevalue("tiny_vl")[1]
    return Reference(e2e_model.path, hf, e2e_model.trained)


@dataclass
class Cluster:
    """A running encode replica and language service."""

    base_url: str
    grpc_address: str
    encode_address: str
    model_name: str = MODEL_NAME
    api_key: str = API_KEY
    logs: list[Path] = field(default_factory=list)

    def client(self, timeout: float = 120.0):
        """The official openai client, pointed at this cluster."""
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, timeout=timeout
        )

    def async_client(self, timeout: float = 300.0):
        """The official async openai client."""
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, timeout=timeout
        )


LANGUAGE_ARGS = [
    "--served-model-name",
    MODEL_NAME,
    "--api-key",
    API_KEY,
    "--max-model-len",
    "2048",
    "--kv-cache-memory",
    "128MiB",
    "--max-num-seqs",
    "32",
]


def run_cluster(model: E2EModel, workdir: Path, transport: str) -> Iterator[Cluster]:
    """Start encode then language (with `transport`); stop both afterwards."""
    encode, encode_address = start_encode(model.path, workdir)
    try:
        args = ["--encode", encode_address, "--transport", transport, *LANGUAGE_ARGS]
        language, base_url, grpc_address = start_language(model.path, workdir, args)
        try:
            yield Cluster(
                base_url, grpc_address, encode_address, logs=[encode.log_path, language.log_path]
            )
        finally:
            language.stop()
    finally:
        encode.stop()


@pytest.fixture(scope="session")
def grpc_cluster(e2e_model, tmp_path_factory) -> Iterator[Cluster]:
    yield from run_cluster(e2e_model, tmp_path_factory.mktemp("grpc_cluster"), "grpc")


@pytest.fixture(scope="session")
def nccl_cluster(e2e_model, tmp_path_factory) -> Iterator[Cluster]:
    yield from run_cluster(e2e_model, tmp_path_factory.mktemp("nccl_cluster"), "nccl")


@pytest.fixture(scope="session")
def ipc_cluster(e2e_model, tmp_path_factory) -> Iterator[Cluster]:
    yield from run_cluster(e2e_model, tmp_path_factory.mktemp("ipc_cluster"), "ipc")
