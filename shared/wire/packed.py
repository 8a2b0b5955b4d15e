"""The packed embedding layout, the unit that travels between the services.

Per image, the vision tower's outputs are concatenated along the feature axis:
`cat([embeds, ds_0, ..., ds_{k-1}], dim=1)` of shape `[num_tokens, (1 + k) * H]` (SGLang's and
vLLM's wire form). The model builds it (`pack_embeds`) and the language side takes views of it
(`separate_deepstack_embeds`); neither ever copies it into separate tensors.
"""

from __future__ import annotations

import torch


def pack_embeds(embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> torch.Tensor:
    """`[n, H]` embeds and k deepstack tensors `[n, H]` -> packed `[n, (1+k)*H]`."""
    return torch.cat([embeds, *deepstack], dim=1)


def separate_deepstack_embeds(
    packed: torch.Tensor, num_deepstack: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the tower's packed `[n, (1+k)*H]` into embeds `[n, H]` and deepstack `[n, k*H]`."""
    if packed.dim() != 2 or packed.shape[1] % (1 + num_deepstack):
        raise ValueError(
            f"packed embeddings of shape {tuple(packed.shape)} do not split into "
            f"1 + {num_deepstack} equal parts"
        )
    hidden = packed.shape[1] // (1 + num_deepstack)
    return packed[:, :hidden], packed[:, hidden:]
