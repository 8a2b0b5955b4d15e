"""The Qwen3-VL vision tower, returning the packed wire form `[N/4, (1+k) * out_hidden]`.

Patches arrive in 2x2 merge-block order (block_row, block_col, row_in_block, col_in_block); several
images
are concatenated and attend only within themselves (block-diagonal attention), so a batched forward
equals
the per-image forwards up to float noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.model.config import VisionConfig
from shared.model.layers.linear import Linear
from shared.model.layers.rotary import rotate_half
from shared.wire.packed import pack_embeds

_ACTS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


def _activation(name: str):
    if name not in _ACTS:
        raise ValueError(f"unsupported vision hidden_act '{name}'")
    return _ACTS[name]


def patch_coordinates(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmerged (row, col) of every patch, in merge-block order, repeated over t. -> ([N], [N])."""
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        c = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        rows.append(r.permute(0, 2, 1, 3).reshape(-1).repeat(t))
        cols.append(c.permute(0, 2, 1, 3).reshape(-1).repeat(t))
    device = grid_thw.device
    return torch.cat(rows).to(device), torch.cat(cols).to(device)


class VisionAttention(nn.Module):
    """Non-causal multi-head attention with 2-D rotary, block-diagonal per image (per frame)."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.qkv = Linear(hidden, 3 * hidden, bias=True)
        self.proj = Linear(hidden, hidden, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        dtype = q.dtype
        # Rotary in fp32, then back to the model dtype.
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        outs = []
        for qi, ki, vi in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens), strict=True):
            # [1, heads, len, head_dim]: 4-D inputs reach SDPA's fused kernels (flash on CPU and
            # GPU), which never hold a [len, len] score matrix; 3-D ones take the math path.
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1).unsqueeze(0),
                ki.transpose(0, 1).unsqueeze(0),
                vi.transpose(0, 1).unsqueeze(0),
            )
            outs.append(o.squeeze(0).transpose(0, 1))
        return self.proj(torch.cat(outs).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.linear_fc1 = Linear(hidden, intermediate, bias=True)
        self.linear_fc2 = Linear(intermediate, hidden, bias=True)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x, cos, sin, seq_lens):
        x = x + self.attn(self.norm1(x), cos, sin, seq_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Merges each 2x2 block into one token. Deepstack mergers normalize after the concat."""

    def __init__(self, config: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        norm_dim = self.merged if postshuffle_norm else config.hidden_size
        self.norm = nn.LayerNorm(norm_dim, eps=1e-6)
        self.linear_fc1 = Linear(self.merged, self.merged)
        self.linear_fc2 = Linear(self.merged, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        # Exact (erf) GELU here, unlike the blocks' tanh approximation.
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over a (C, T, P, P) patch: a Linear over its flattened
    values."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = Linear(config.patch_dim, config.hidden_size, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class Qwen3VLVisionModel(nn.Module):
    """Vision tower: pixel patches -> packed `cat([embeds, ds_0, ..., ds_{k-1}], 1)`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(config) for _ in range(config.depth)])
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            [PatchMerger(config, postshuffle_norm=True) for _ in config.deepstack_visual_indexes]
        )

    @property
    def num_deepstack(self) -> int:
        return self.config.num_deepstack

    def _position_embeddings(self, rows: torch.Tensor, cols: torch.Tensor, grid_thw: torch.Tensor):
        """Bilinear (align_corners) resampling of the square learned table, as a 4-term fp32 sum."""
        side = math.isqrt(self.config.num_position_embeddings)
        counts = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
        heights = torch.repeat_interleave(grid_thw[:, 1], torch.tensor(counts, device=rows.device))
        widths = torch.repeat_interleave(grid_thw[:, 2], torch.tensor(counts, device=rows.device))

        def taps(idx, size):
            src = idx.float() * (side - 1) / torch.clamp(size - 1, min=1)
            lo = torch.floor(src)
            frac = src - lo
            hi = torch.clamp(lo + 1, max=side - 1)
            return lo.long(), hi.long(), frac

        h0, h1, dh = taps(rows, heights)
        w0, w1, dw = taps(cols, widths)
        table = self.pos_embed.weight.float()
        dh, dw = dh[:, None], dw[:, None]
        pe = (1 - dh) * (1 - dw) * table[h0 * side + w0]
        pe = pe + (1 - dh) * dw * table[h0 * side + w1]
        pe = pe + dh * (1 - dw) * table[h1 * side + w0]
        pe = pe + dh * dw * table[h1 * side + w1]
        return pe

    def _rotary(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.config.head_dim // 2
        steps = torch.arange(0, dim, 2, dtype=torch.float, device=rows.device) / dim
        inv_freq = 1.0 / (self.config.rope_theta**steps)
        freqs = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], -1)
        emb = torch.cat([freqs, freqs], -1)[:, None, :]  # [N, 1, head_dim]
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P], grid_thw [num_images, 3] -> [N / merge^2, (1+k) * out]."""
        grid_thw = grid_thw.to(device=pixel_values.device, dtype=torch.long)
        expected = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        if pixel_values.shape != (expected, self.config.patch_dim):
            raise ValueError(
                f"pixel_values shape {tuple(pixel_values.shape)} does not match grid_thw "
                f"({expected} patches of {self.config.patch_dim} values)"
            )
        merge = self.config.spatial_merge_size
        rows, cols = patch_coordinates(grid_thw, merge)
        x = self.patch_embed(pixel_values)
        x = x + self._position_embeddings(rows, cols, grid_thw).to(x.dtype)
        cos, sin = self._rotary(rows, cols)
        seq_lens = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, seq_lens)
            if i in self.config.deepstack_visual_indexes:
                j = self.config.deepstack_visual_indexes.index(i)
                deepstack.append(self.deepstack_merger_list[j](x))
        return pack_embeds(self.merger(x), deepstack)
