"""Greedy token ids of the shipped model on held-out shape questions through the in-process
engine and front end, printed as JSON: run once with the default kernel selection and once with
SPLITVL_KERNELS=gpu TRITON_INTERPRET=1 (the CUDA selection on a CPU) by test_gpu_selection."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

from scripts.shapes_vl.chat import chat_messages
from scripts.shapes_vl.data import make_dataset
from scripts.shapes_vl.evaluate import HELD_OUT_SEED
from services.language.engine import EngineConfig
from tests.e2e.inprocess import language_server
from tests.e2e.support import InProcessEncoder

MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-vl"


def main(num: int) -> None:
    engine = EngineConfig(kv_cache_memory=16 * 2**20, max_model_len=512, dtype="float32")
    answers = []
    with language_server(MODEL, InProcessEncoder(MODEL), engine, model_name="m") as server:
        for example in make_dataset(HELD_OUT_SEED, num):
            body = {
                "model": "m",
                "messages": chat_messages(example.image, example.question),
                "max_tokens": 12,
                "temperature": 0,
                "return_token_ids": True,
            }
            reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
            reply.raise_for_status()
            choice = reply.json()["choices"][0]
            answers.append({"text": choice["message"]["content"], "ids": choice["token_ids"]})
    print(json.dumps(answers))


if __name__ == "__main__":
    main(int(sys.argv[1]))
