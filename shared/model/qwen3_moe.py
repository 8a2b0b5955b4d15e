"""The unified Qwen3-MoE language model.

One `Qwen3MoeModel` serves text-only inference, VL inference and the language side of
disaggregation:
`input_deepstack_embeds` is an optional parameter, never a subclass. Tokens are flattened (`[T]`, no
batch
dimension); batching several sequences is the attention backend's business.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.model.config import TextConfig
from shared.model.layers.attention import Attention, AttentionBackend
from shared.model.layers.linear import Linear
from shared.model.layers.mlp import DenseMLP
from shared.model.layers.moe import SparseMoeBlock
from shared.model.layers.norm import RMSNorm
from shared.model.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    """RMSNorm -> attention -> residual -> RMSNorm -> MoE or dense MLP -> residual."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(
            layer_idx,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.rms_norm_eps,
        )
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(
                config.hidden_size,
                config.num_experts,
                config.num_experts_per_tok,
                config.moe_intermediate_size,
                config.norm_topk_prob,
            )
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,  # [T, H] the previous layer's MLP output (the embeddings at first)
        residual: torch.Tensor | None,  # [T, H] the residual stream before h is added
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionBackend | None,
        num_valid_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream): each residual add happens inside the
        next norm, in transformers' order (h + attn, then + mlp, each rounded), so the full
        hidden state of a layer is its two outputs' sum."""
        normed, residual = self.input_layernorm(h, residual)
        attn = self.self_attn(normed, cos, sin, attention)
        normed, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(normed, num_valid_tokens), residual


class Qwen3MoeModel(nn.Module):
    """Embeddings, decoder layers and the final norm; deepstack injection is optional."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.mrope_section, config.mrope_interleaved
        )

    def num_deepstack_layers(self, input_deepstack_embeds: torch.Tensor | None) -> int:
        """k, read from the tensor's width (k * hidden); 0 without deepstack."""
        if input_deepstack_embeds is None:
            return 0
        width = input_deepstack_embeds.shape[-1]
        hidden = self.config.hidden_size
        if width % hidden:
            raise ValueError(
                f"input_deepstack_embeds width {width} is not a multiple of hidden size {hidden}"
            )
        k = width // hidden
        if k > len(self.layers):
            raise ValueError(f"{k} deepstack slices but only {len(self.layers)} decoder layers")
        return k

    def _process_layer_output(
        self,
        layer_idx: int,
        h: torch.Tensor,
        residual: torch.Tensor,
        input_deepstack_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hook after decoder layer `layer_idx`: add deepstack slice i (zero on text rows) to the
        layer's full hidden state, which then starts a fresh residual stream."""
        if input_deepstack_embeds is None:
            return h, residual
        hidden = self.config.hidden_size
        if layer_idx * hidden >= input_deepstack_embeds.shape[-1]:
            return h, residual
        ds = input_deepstack_embeds[:, layer_idx * hidden : (layer_idx + 1) * hidden]
        return (h + residual) + ds.to(h.dtype), None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [T]
        positions: torch.Tensor | None = None,  # [T] or [3, T]
        inputs_embeds: torch.Tensor | None = None,  # [T, H]
        input_deepstack_embeds: torch.Tensor | None = None,  # [T, k*H]
        attention: AttentionBackend | None = None,
        num_valid_tokens: torch.Tensor | None = None,  # [1] on the device
    ) -> torch.Tensor:  # [T, H]
        """``num_valid_tokens``: rows at or past it are padding (a batch padded to a fixed
        shape), routed to no expert; counted on the device, so a captured graph reads each
        replay's count. Without it every row is a token."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if h.dim() != 2:
            raise ValueError(
                f"tokens are flattened: expected [T, H] embeddings, got {tuple(h.shape)}"
            )
        num_tokens = h.shape[0]
        if input_deepstack_embeds is not None and input_deepstack_embeds.shape[0] != num_tokens:
            raise ValueError(
                f"input_deepstack_embeds has {input_deepstack_embeds.shape[0]} rows for "
                f"{num_tokens} tokens"
            )
        self.num_deepstack_layers(input_deepstack_embeds)
        if positions is None:
            positions = torch.arange(num_tokens, device=h.device)
        cos, sin = self.rotary_emb(positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, cos, sin, attention, num_valid_tokens)
            h, residual = self._process_layer_output(i, h, residual, input_deepstack_embeds)
        return self.norm(h, residual)[0]


class Qwen3MoeForCausalLM(nn.Module):
    """`model: Qwen3MoeModel` + `lm_head`; serves text-only, VL and disaggregated-language
    inference."""

    def __init__(self, config: TextConfig, tie_word_embeddings: bool = False):
        super().__init__()
        self.config = config
        self.model = Qwen3MoeModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_word_embeddings = tie_word_embeddings
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> Qwen3MoeForCausalLM:
        """Concatenate q/k/v (and dense gate/up) weights for fewer, larger GEMMs; call after
        loading (and after tensor-parallel slicing)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv()
            if isinstance(layer.mlp, DenseMLP):
                layer.mlp.fuse_gate_up()
        return self

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_deepstack_embeds: torch.Tensor | None = None,
        attention: AttentionBackend | None = None,
        logits_indices: torch.Tensor | None = None,  # [n]: rows whose logits are wanted
        num_valid_tokens: torch.Tensor | None = None,  # see Qwen3MoeModel.forward
    ) -> torch.Tensor:  # [T or n, V]
        hidden = self.model(
            input_ids=input_ids,
            positions=positions,
            inputs_embeds=inputs_embeds,
            input_deepstack_embeds=input_deepstack_embeds,
            attention=attention,
            num_valid_tokens=num_valid_tokens,
        )
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        return self.compute_logits(hidden)
