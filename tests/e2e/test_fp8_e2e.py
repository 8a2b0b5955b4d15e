"""The shipped shapes model in block FP8, through the split path.

Its copy is written by `scripts.quantize_fp8` into a temporary directory (hidden 128 and
moe_intermediate 96: partial 128-blocks). Accuracy on 200 held-out questions through the
vision tower -> packed embeddings -> FP8 language model path must stay within 2 points of the
checkpoint's own. Then real processes: an encode replica of the *original* checkpoint (the FP8
copy keeps its vision tower, so the fingerprints match) serves a language service on the FP8
copy, and another language service quantizing the original at load (`--quantization fp8`):
both report ``"quantization": "fp8"`` on /v1/models and answer exactly as the in-process FP8
model does (the same e4m3 bytes and scales either way).
"""

from __future__ import annotations

import httpx
import pytest
import torch

from scripts.quantize_fp8 import quantize_checkpoint
from scripts.shapes_vl.data import make_dataset
from scripts.shapes_vl.evaluate import HELD_OUT_SEED, score, shared_answerer
from scripts.testkit.launch import start_encode, start_language
from tests.e2e.checks import chat_messages
from tests.e2e.conftest import LANGUAGE_ARGS, MODEL_NAME, Cluster
from tests.e2e.test_shapes_accuracy import _png

NUM_QUESTIONS = 200
MAX_DROP = 0.02
NUM_SERVED = 6


@pytest.fixture(scope="module")
def trained(e2e_model):
    if not e2e_model.trained:
        pytest.fail("the FP8 accuracy checks need the trained models/shapes-vl")
    return e2e_model.path


@pytest.fixture(scope="module")
def fp8_copy(trained, tmp_path_factory):
    return quantize_checkpoint(trained, tmp_path_factory.mktemp("shapes-vl-fp8"))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only spins on a shared machine
    yield
    torch.set_num_threads(before)


def test_fp8_keeps_accuracy_through_the_split_path(trained, fp8_copy, one_thread):
    examples = make_dataset(HELD_OUT_SEED, NUM_QUESTIONS)
    float_report = score(shared_answerer(trained), examples)
    fp8_report = score(shared_answerer(fp8_copy), examples)
    drop = float_report.accuracy - fp8_report.accuracy
    assert drop <= MAX_DROP, (
        f"FP8 {fp8_report.accuracy:.3f} vs {float_report.accuracy:.3f}:\n"
        + "\n".join(fp8_report.lines())
    )


def _ask_all(cluster: Cluster, examples) -> list[str]:
    client = cluster.client(timeout=60)
    answers = []
    for example in examples:
        response = client.chat.completions.create(
            model=cluster.model_name,
            messages=chat_messages(example.question, _png(example)),
            temperature=0,
            max_tokens=32,
        )
        answers.append(response.choices[0].message.content)
    return answers


def test_served_fp8_reports_itself_and_answers_as_in_process(trained, fp8_copy, tmp_path):
    examples = make_dataset(HELD_OUT_SEED + 1, NUM_SERVED)
    answer = shared_answerer(fp8_copy)
    expected = [answer(ex.image, ex.question) for ex in examples]
    encode, address = start_encode(trained, tmp_path)  # the original's tower
    try:
        for model_dir, extra in ((fp8_copy, []), (trained, ["--quantization", "fp8"])):
            args = ["--encode", address, *LANGUAGE_ARGS, *extra]
            language, base_url, grpc = start_language(model_dir, tmp_path, args, name=f"lm{extra}")
            try:
                card = httpx.get(
                    f"{base_url}/v1/models",
                    headers={"Authorization": "Bearer e2e-key"},
                    timeout=10,
                ).json()["data"][0]
                assert card["id"] == MODEL_NAME and card["quantization"] == "fp8"
                cluster = Cluster(base_url, grpc, address)
                assert _ask_all(cluster, examples) == expected, extra
            finally:
                language.stop()
    finally:
        encode.stop()
