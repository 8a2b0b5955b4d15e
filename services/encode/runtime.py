"""Loading the vision tower and assembling what serves it: batcher, encoder, cache and links."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import torch

from services.common.errors import ConfigError
from services.common.placement import apply_share, for_service
from services.encode.batcher import BatchStats, VisionBatcher
from services.encode.cache import EmbeddingCache
from services.encode.config import EncodeServiceConfig
from services.encode.encoder import VisionEncoder
from services.encode.links import LinkManager
from services.encode.metrics import EncodeMetrics
from shared.wire.info import EncoderContract, EncoderInfo, device_uuid
from shared.wire.units import compute_dtype, dtype_name, resolve_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Everything that exists once the model is loaded."""

    encoder: VisionEncoder
    batcher: VisionBatcher
    links: LinkManager
    info: EncoderInfo


def load_runtime(config: EncodeServiceConfig, metrics: EncodeMetrics) -> Runtime:
    """Load only the vision weights and build the serving objects (the batcher is not started)."""
    from shared.model.config import load_config
    from shared.model.fingerprint import vision_fingerprint
    from shared.model.loader import load_vision_model
    from shared.model.processing import load_image_processor_config
    from shared.model.video import load_video_processor_config

    model_config = load_config(config.model_dir)
    if model_config.vision is None:
        raise ConfigError(f"{config.model_dir} is a text-only checkpoint; it has no vision tower")
    processor = load_image_processor_config(config.model_dir)
    vision = model_config.vision
    if (processor.patch_size, processor.merge_size) != (
        vision.patch_size,
        vision.spatial_merge_size,
    ):
        raise ConfigError(
            f"preprocessor_config.json (patch {processor.patch_size}, merge "
            f"{processor.merge_size}) disagrees with config.json (patch {vision.patch_size}, "
            f"merge {vision.spatial_merge_size})"
        )
    device = select_device(config.device)
    # The checkpoint's dtype unless the operator chose one: what the language side computes in,
    # so embeddings are spliced without a cast.
    dtype = resolve_dtype(config.dtype, model_config.dtype, device)
    compute = compute_dtype(dtype, device)  # fp32 for bf16 on a CPU that only emulates it
    t0 = time.perf_counter()
    model = load_vision_model(config.model_dir, dtype=compute, device=device)
    log.info(
        "loaded the vision tower of %s (%d blocks, %d deepstack) on %s in %s (computing in "
        "%s) in %.2f s",
        config.model_dir.name,
        vision.depth,
        vision.num_deepstack,
        device,
        dtype_name(dtype),
        dtype_name(compute),
        time.perf_counter() - t0,
    )

    cores = for_service("encode", config.device)

    def forward(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        apply_share(cores)  # on the vision thread, which runs the tower
        packed = model(pixel_values.to(device), grid_thw).to(dtype)  # a no-op unless widened
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so batch timings measure the work
        return packed

    batcher = VisionBatcher(
        forward,
        vision.spatial_merge_size,
        config.max_batch_patches,
        config.limits.max_queue_images,
        on_batch=batch_observer(metrics),
        batch_wait_s=config.batch_wait_s,
    )
    encoder = VisionEncoder(
        processor,
        config.limits,
        batcher,
        EmbeddingCache(config.cache_bytes),
        metrics,
        config.preprocess_workers,
        load_video_processor_config(config.model_dir),
    )
    links = LinkManager(
        advertise_host(config),
        device,
        config.link_timeout_s,
        config.ticket_ttl_s,
        max_links=config.max_links,
    )
    contract = EncoderContract(
        checkpoint_id=vision_fingerprint(config.model_dir),
        hidden_size=vision.out_hidden_size,
        num_deepstack=vision.num_deepstack,
        dtype=dtype_name(dtype),
        patch_size=processor.patch_size,
        merge_size=processor.merge_size,
        temporal_patch_size=processor.temporal_patch_size,
    )
    info = EncoderInfo(
        model=config.model_dir.name,
        contract=contract,
        min_pixels=processor.min_pixels,
        max_pixels=encoder.max_pixels,
        max_image_bytes=config.limits.max_image_bytes,
        max_images_per_request=config.limits.max_images_per_request,
        max_batch_patches=config.max_batch_patches,
        device=str(device),
        link_backend=links.backend,
        device_uuid=device_uuid(str(device)),
    )
    return Runtime(encoder, batcher, links, info)


def select_device(name: str) -> torch.device:
    """torch.device(name), checked to exist (and made current when CUDA)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} requested but CUDA is not available")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name}; use cpu or cuda[:N]")
    return device


def advertise_host(config: EncodeServiceConfig) -> str:
    """The address link peers reach this process at."""
    if config.advertise_host:
        return config.advertise_host
    if config.host in ("0.0.0.0", "::", "[::]", ""):
        return socket.getfqdn()
    return config.host


def batch_observer(metrics: EncodeMetrics):
    """A VisionBatcher on_batch callback recording batch metrics."""

    def observe(stats: BatchStats) -> None:
        metrics.batch_images.observe(stats.num_images)
        metrics.batch_patches.observe(stats.num_patches)
        metrics.forward_seconds.observe(stats.forward_s)
        metrics.queue_wait.observe(stats.max_wait_s)

    return observe
