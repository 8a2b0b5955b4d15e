"""transformers' Qwen3-VL video processor and processor prompt, run as the test oracle.

    python -m scripts.testkit.video_oracle CASES.json OUT_DIR   (from the repository root)

transformers' video processor needs torchvision, and PyPI's torchvision wheel is a CUDA build
whose C extension cannot load beside the CPU torch wheel ("operator torchvision::nms does not
exist" at import). `make setup` installs it, without dependencies, into `.venv/oracle`, outside
the environment's path, so nothing else (the services above all) ever sees it; this process
defines the two operators its import registers fake kernels for, then imports it from there.
Only its pure-Python transforms run. A separate process keeps that away from the test process.

Each case: {"frames": path of uint8 [T, H, W, 3] .npy (the whole decoded clip; a list of
paths for several videos), "video_fps" (one or a list), "kwargs": the processor's call options
(fps or num_frames, size, cap_pixels_per_frame), "prompt": null or {"model_dir", "messages",
"images": [.npy paths of uint8 images], "image_size": the image processor's size}}. Writes
OUT_DIR/{i}_pixels.npy, {i}_grid.npy, {i}_indices.npy (the first video's) and {i}_ids.npy
(with a prompt).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ORACLE_DIR = REPO / ".venv" / "oracle"
CANNOT_RUN = 3


def import_torchvision():
    import torch

    if not (ORACLE_DIR / "torchvision").is_dir():
        print(f"no torchvision in {ORACLE_DIR}: run `make setup`", file=sys.stderr)
        sys.exit(CANNOT_RUN)
    lib = torch.library.Library("torchvision", "DEF")  # kept alive for the process
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    sys.path.insert(0, str(ORACLE_DIR))
    import torchvision  # noqa: F401

    return lib


def _video_processor(case: dict, cls):
    """The class defaults, or the prompt's checkpoint's video_preprocessor_config.json."""
    model_dir = (case.get("prompt") or {}).get("model_dir")
    path = Path(model_dir or ".") / "video_preprocessor_config.json"
    if model_dir is None or not path.is_file():
        return cls()
    skip = {"video_processor_type", "processor_class"}
    return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k not in skip})


def main(cases_path: str, out_dir: str) -> None:
    _keep = import_torchvision()
    import numpy as np
    from PIL import Image
    from transformers import PreTrainedTokenizerFast, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    out = Path(out_dir)
    for i, case in enumerate(json.loads(Path(cases_path).read_text())):
        paths, rates = case["frames"], case["video_fps"]
        if isinstance(paths, str):
            paths, rates = [paths], [rates]
        videos = [np.load(path) for path in paths]
        metadata = [
            VideoMetadata(total_num_frames=len(v), fps=fps)
            for v, fps in zip(videos, rates, strict=True)
        ]
        kwargs = dict(case["kwargs"])
        if "num_frames" in kwargs:
            kwargs["fps"] = None  # mutually exclusive with the class default fps
        video_processor = _video_processor(case, Qwen3VLVideoProcessor)
        if case.get("prompt") is None:
            result = video_processor(
                videos=videos, video_metadata=metadata, return_metadata=True, **kwargs
            )
            ids = None
        else:
            prompt = case["prompt"]
            model_dir = prompt["model_dir"]
            image_size = prompt.get("image_size") or {"shortest_edge": 9216, "longest_edge": 16384}
            processor = Qwen3VLProcessor(
                image_processor=Qwen2VLImageProcessorPil(
                    patch_size=16,
                    merge_size=2,
                    temporal_patch_size=2,
                    image_mean=[0.5] * 3,
                    image_std=[0.5] * 3,
                    size=image_size,
                ),
                tokenizer=PreTrainedTokenizerFast.from_pretrained(model_dir),
                video_processor=video_processor,
                chat_template=(Path(model_dir) / "chat_template.jinja").read_text(),
            )
            text = processor.apply_chat_template(
                case["prompt"]["messages"], tokenize=False, add_generation_prompt=True
            )
            images = [Image.fromarray(np.load(path)) for path in prompt.get("images", [])]
            result = processor(
                text=[text],
                images=images or None,
                videos=videos,
                video_metadata=metadata,
                return_metadata=True,
                **kwargs,
            )
            ids = np.asarray(result["input_ids"][0])
        np.save(out / f"{i}_pixels.npy", result["pixel_values_videos"].numpy())
        np.save(out / f"{i}_grid.npy", np.asarray(result["video_grid_thw"]))
        np.save(out / f"{i}_indices.npy", np.asarray(result["video_metadata"][0].frames_indices))
        if ids is not None:
            np.save(out / f"{i}_ids.npy", ids)


if __name__ == "__main__":
    main(*sys.argv[1:3])
