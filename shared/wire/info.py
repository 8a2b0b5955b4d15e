"""What an encode replica advertises (GetInfo), and the check that it fits a language service.

The language side never sees pixels, so everything that shapes the embeddings it splices must
agree on both sides: the checkpoint, the hidden size, the number of deepstack parts, the dtype
on the wire and the patch / merge geometry that turns an image grid into a token count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from shared.wire.errors import IncompatibleEncoderError


@dataclass(frozen=True)
class EncoderContract:
    """The fields that must be equal on both sides for embeddings to be spliced as they come."""

    checkpoint_id: str
    hidden_size: int
    num_deepstack: int
    dtype: str
    patch_size: int
    merge_size: int
    temporal_patch_size: int

    def mismatches(self, other: EncoderContract) -> list[str]:
        """'field: self=X, other=Y' for every differing field."""
        return [
            f"{f.name} {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass(frozen=True)
class EncoderInfo:
    """A replica's contract plus its limits and placement (the GetInfo response)."""

    model: str
    contract: EncoderContract
    min_pixels: int
    max_pixels: int
    max_image_bytes: int
    max_images_per_request: int
    max_batch_patches: int
    device: str
    link_backend: str
    metrics_port: int = 0
    device_uuid: str = ""  # the GPU's UUID, "" on a CPU

    def as_flat_dict(self) -> dict:
        """Every field at one level (the GetInfo message's layout)."""
        flat = asdict(self)
        flat.update(flat.pop("contract"))
        return flat

    @classmethod
    def from_flat_dict(cls, flat: dict) -> EncoderInfo:
        """The inverse of `as_flat_dict`; keys of neither dataclass (newer fields) are ignored."""
        contract_names = {f.name for f in fields(EncoderContract)}
        own = {f.name for f in fields(cls)} - {"contract"}
        contract = EncoderContract(**{k: v for k, v in flat.items() if k in contract_names})
        return cls(contract=contract, **{k: v for k, v in flat.items() if k in own})


def check_compatible(expected: EncoderContract, info: EncoderInfo, endpoint: str) -> None:
    """Raise IncompatibleEncoderError naming each differing value (encode side first)."""
    differ = info.contract.mismatches(expected)
    if differ:
        raise IncompatibleEncoderError(
            f"encode replica {endpoint} ({info.model}) does not match this language service: "
            + "; ".join(f"{d} (encode != language)" for d in differ)
        )


def device_uuid(device: str) -> str:
    """The UUID of a CUDA device (the same GPU has the same UUID in every process, whatever its
    index there), or "" for any other device."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def check_link_placement(local_uuid: str, info: EncoderInfo, endpoint: str) -> None:
    """Refuse the NCCL link to a replica on this process's own GPU: NCCL will not connect two
    ranks on one device ("Duplicate GPU detected"), so the first transfer would fail."""
    if local_uuid and info.device_uuid == local_uuid:
        raise IncompatibleEncoderError(
            f"encode replica {endpoint} runs on the same GPU ({local_uuid}) as this language "
            "service, and NCCL cannot link two processes on one GPU; use --transport grpc for "
            "it, or run the replica on another GPU"
        )
