"""Rotary position embeddings: plain 1-D RoPE and Qwen3-VL's interleaved M-RoPE.

cos/sin are computed once per forward (not per layer) and shared by every decoder layer.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def mrope_axis_of_slot(
    mrope_section: tuple[int, int, int], num_slots: int, interleaved: bool
) -> torch.Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the head_dim/2 frequency slots.

    Interleaved (Qwen3-VL): slot j takes h when j % 3 == 1 and j < 3 * sections[1], w when j % 3 ==
    2 and
    j < 3 * sections[2], t otherwise. Non-interleaved (Qwen2-VL style): contiguous t, h, w runs.
    """
    axis = torch.zeros(num_slots, dtype=torch.long)
    if interleaved:
        axis[1 : 3 * mrope_section[1] : 3] = 1
        axis[2 : 3 * mrope_section[2] : 3] = 2
    else:
        t, h, _ = mrope_section
        axis[t : t + h] = 1
        axis[t + h :] = 2
    return axis


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) [T, head_dim] for positions [T] (1-D) or [3, T] (M-RoPE).

    Holds no buffers, so a model built on the meta device needs nothing re-initialized after
    loading.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        mrope_section: tuple[int, int, int] | None = None,
        mrope_interleaved: bool = True,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.mrope_section = mrope_section
        self.mrope_interleaved = mrope_interleaved
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if device not in self._tables:
            steps = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
            inv_freq = 1.0 / (self.theta**steps)
            axis = None
            if self.mrope_section is not None:
                axis = mrope_axis_of_slot(
                    self.mrope_section, self.head_dim // 2, self.mrope_interleaved
                ).to(device)
            self._tables[device] = (inv_freq.to(device), axis)
        return self._tables[device]

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, axis = self._table(positions.device)
        if axis is not None:
            if positions.dim() == 1:
                positions = positions.expand(3, -1)
            freqs = positions[..., None].float() * inv_freq  # [3, T, D/2]
            freqs = freqs.gather(0, axis.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]
        else:
            if positions.dim() != 1:
                raise ValueError("1-D RoPE takes positions of shape [T]")
            freqs = positions[:, None].float() * inv_freq  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
