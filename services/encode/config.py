"""Configuration of the encode service: frozen dataclasses built once from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.errors import ConfigError
from shared.model.video_decode import VideoLimits
from shared.wire.fetch import FetchPolicy
from shared.wire.security import TLSFiles
from shared.wire.units import GIB, KIB, MIB


@dataclass(frozen=True)
class EncodeLimits:
    """Per-request limits; breaking one is INVALID_ARGUMENT, a full queue RESOURCE_EXHAUSTED."""

    max_image_bytes: int = 32 * MIB
    # Images whose header claims more pixels are refused before decoding (decompression bombs).
    max_decoded_pixels: int = 8192 * 8192
    max_images_per_request: int = 32
    # Images waiting for the vision tower, all requests together.
    max_queue_images: int = 512
    # Ceiling for a request's max_pixels; None means the checkpoint's preprocessor value.
    max_pixels: int | None = None
    allow_url_fetch: bool = False
    url_fetch_timeout_s: float = 10.0
    # CIDRs exempt from the public-address rule of URL fetches (an image store on a private net)
    allowed_fetch_networks: tuple[str, ...] = ()
    # Videos: file size, length, frames sampled from one clip, and decoding time, each bounded
    max_video_bytes: int = 256 * MIB
    max_video_seconds: float = 20 * 60.0
    max_video_frames: int = 768
    video_decode_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in (
            "max_image_bytes",
            "max_decoded_pixels",
            "max_images_per_request",
            "max_queue_images",
            "max_video_bytes",
            "max_video_seconds",
            "max_video_frames",
            "video_decode_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        try:
            self.fetch_policy()
        except ValueError as exc:
            raise ConfigError(f"--allowed-fetch-networks: {exc}") from None

    def fetch_policy(self) -> FetchPolicy:
        """The limits and address policy of http(s) image fetches."""
        return FetchPolicy(
            max_bytes=self.max_image_bytes,
            timeout_s=self.url_fetch_timeout_s,
            allowed_networks=self.allowed_fetch_networks,
        )

    def video_limits(self) -> VideoLimits:
        """The bounds of decoding one clip."""
        return VideoLimits(
            max_bytes=self.max_video_bytes,
            max_duration_s=self.max_video_seconds,
            max_frame_pixels=min(VideoLimits().max_frame_pixels, self.max_decoded_pixels),
            decode_timeout_s=self.video_decode_timeout_s,
        )

    @property
    def max_request_bytes(self) -> int:
        """The gRPC receive limit: every image at its byte limit or one video at its limit,
        plus room for the envelope."""
        images = self.max_images_per_request * (self.max_image_bytes + 4 * KIB)
        return max(images, self.max_video_bytes) + MIB


@dataclass(frozen=True)
class EncodeServiceConfig:
    """Everything `python -m services.encode` is started with."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: resolved from the checkpoint (see resolve_dtype)
    # Patches in one vision forward; a single larger image still runs, alone.
    max_batch_patches: int = 16384
    # How long a partial batch waits for more images (0: run as soon as the tower is free).
    batch_wait_s: float = 0.0
    cache_bytes: int = 1 * GIB
    metrics_port: int | None = None
    limits: EncodeLimits = field(default_factory=EncodeLimits)
    # Inline tensors stream in chunks of this size, under gRPC's default 4 MiB message limit.
    chunk_bytes: int = 1 * MIB
    preprocess_workers: int = 2
    drain_timeout_s: float = 30.0
    ticket_ttl_s: float = 60.0
    link_timeout_s: float = 60.0
    # Address peers use for link rendezvous; None: host, or the machine's name for a wildcard host.
    advertise_host: str | None = None
    # Written (JSON: port, metrics_port, pid) once the port is bound, so callers can use port 0.
    port_file: Path | None = None
    # Required as x-splitvl-token metadata on every RPC but health; None: no check.
    internal_token: str | None = field(default=None, repr=False)
    # Server certificate and key (and, for mutual TLS, the CA client certificates must chain to).
    tls: TLSFiles | None = None
    # Links open or waiting for their peer; OpenLink beyond this is RESOURCE_EXHAUSTED.
    max_links: int = 64

    def __post_init__(self) -> None:
        if self.port < 0 or self.port > 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch_patches <= 0:
            raise ConfigError(f"max_batch_patches must be positive, got {self.max_batch_patches}")
        if self.cache_bytes < 0:
            raise ConfigError(f"cache memory must be >= 0, got {self.cache_bytes}")
        if not 4 * KIB <= self.chunk_bytes <= 3 * MIB:
            # Above ~3 MiB a chunk plus framing would exceed gRPC's default 4 MiB message limit.
            raise ConfigError(f"chunk_bytes must be in 4KiB..3MiB, got {self.chunk_bytes}")
        if self.preprocess_workers <= 0:
            raise ConfigError("preprocess_workers must be positive")
        if self.max_links <= 0:
            raise ConfigError(f"max_links must be positive, got {self.max_links}")
        _check_device(self.device)
        if self.port_file is not None and not self.port_file.parent.is_dir():
            raise ConfigError(
                f"the directory of --port-file {self.port_file} does not exist; create it first"
            )
        if not self.model_dir.is_dir():
            raise ConfigError(f"model directory {self.model_dir} does not exist")


def _check_device(name: str) -> None:
    """Refuse a device string torch cannot parse or the service cannot run on, before binding."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use cpu or cuda[:N]")
