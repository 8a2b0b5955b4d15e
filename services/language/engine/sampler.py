"""Batched token sampling: grammar masks, logit bias, penalties, temperature, top-k / top-p /
min-p, seeds and logprobs.

Every transform runs on the whole ``[batch, vocab]`` logits at once with per-row parameters;
the only per-request loop draws the noise of seeded requests from their own generators, so a
seeded request samples the same tokens whatever else shares its batch. Grammar rows get their
bitmask in one batched fill and one in-place apply; rows without a grammar are left alone, so
structured and free requests share a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.language.engine.request import RequestState, TokenLogprob
from services.language.engine.structured_output import TokenBitmask


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float, 0 = greedy
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long, vocab size where off
    min_p: torch.Tensor  # [B] float
    presence_penalty: torch.Tensor  # [B] float
    frequency_penalty: torch.Tensor  # [B] float
    repetition_penalty: torch.Tensor  # [B] float
    prompt_token_ids: torch.Tensor | None  # [B, P] long padded with vocab size; None: no penalty
    output_token_ids: torch.Tensor | None  # [B, O] long padded with vocab size
    generators: tuple[tuple[int, torch.Generator], ...]  # (row, generator) of seeded rows
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    max_num_logprobs: int  # -1 when no row asks for logprobs
    num_logprobs: tuple[int | None, ...]
    grammar_rows: tuple[int, ...] = ()  # rows whose request follows a grammar
    matchers: tuple[Any, ...] = ()  # their xgrammar matchers, in the same order
    # (rows [N] long, token ids [N] long, biases [N] float) of every logit_bias entry, or None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    # Padded on the host and copied once, not one small tensor per row.
    padded = [row + [pad] * (width - len(row)) for row in rows]
    return torch.tensor(padded, dtype=torch.long).to(device)


_FLOAT_COLUMNS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def build_sampling_batch(
    seqs: list[RequestState], vocab_size: int, device: torch.device | str
) -> SamplingBatch:
    """Collect the sampling parameters of ``seqs`` (one logits row each, in order)."""
    params = [s.sampling for s in seqs]

    # All per-row floats in one host-to-device copy rather than one per parameter.
    floats = torch.tensor(
        [[float(getattr(p, name)) for p in params] for name in _FLOAT_COLUMNS],
        dtype=torch.float32,
    ).to(device)
    column = dict(zip(_FLOAT_COLUMNS, floats.unbind(0), strict=True))
    top_k = torch.tensor(
        [min(p.top_k, vocab_size) or vocab_size for p in params], dtype=torch.long, device=device
    )
    use_penalties = any(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
    )
    prompt_ids = output_ids = None
    if use_penalties:
        prompt_ids = _padded([list(s.request.prompt_token_ids) for s in seqs], vocab_size, device)
        output_ids = _padded([s.output_token_ids for s in seqs], vocab_size, device)
    num_logprobs = tuple(p.logprobs for p in params)
    grammar_rows = tuple(i for i, s in enumerate(seqs) if s.grammar is not None)
    return SamplingBatch(
        temperature=column["temperature"],
        top_p=column["top_p"],
        top_k=top_k,
        min_p=column["min_p"],
        presence_penalty=column["presence_penalty"],
        frequency_penalty=column["frequency_penalty"],
        repetition_penalty=column["repetition_penalty"],
        prompt_token_ids=prompt_ids,
        output_token_ids=output_ids,
        generators=tuple(
            (i, s.generator)
            for i, s in enumerate(seqs)
            if s.generator is not None and not s.sampling.greedy
        ),
        all_greedy=all(p.greedy for p in params),
        use_top_k=any(0 < p.top_k < vocab_size for p in params),
        use_top_p=any(p.top_p < 1.0 for p in params),
        use_min_p=any(p.min_p > 0.0 for p in params),
        max_num_logprobs=max((n for n in num_logprobs if n is not None), default=-1),
        num_logprobs=num_logprobs,
        grammar_rows=grammar_rows,
        matchers=tuple(seqs[i].grammar for i in grammar_rows),
        logit_bias=_logit_bias(params, device),
    )


def _logit_bias(params: list, device: torch.device | str):
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias]
    if not entries:
        return None
    rows, tokens, biases = zip(*entries, strict=True)
    ids = torch.tensor([rows, tokens], dtype=torch.long).to(device)
    return ids[0], ids[1], torch.tensor(biases, dtype=torch.float32).to(device)


@dataclass(frozen=True)
class SamplerOutput:
    """Sampled token per row, and its logprobs where the row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=counts.dtype))
    return counts[:, :vocab_size]  # drop the padding column


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty (prompt and output, HF rule) then presence/frequency (output only)."""
    if batch.prompt_token_ids is None:
        return logits
    vocab_size = logits.shape[1]
    output_counts = _token_counts(batch.output_token_ids, vocab_size)
    seen = (_token_counts(batch.prompt_token_ids, vocab_size) + output_counts) > 0
    rep = batch.repetition_penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - batch.frequency_penalty.unsqueeze(1) * output_counts
    return logits - batch.presence_penalty.unsqueeze(1) * (output_counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf (one sort)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if batch.use_top_k:
        kth_index = (logits.shape[1] - batch.top_k).clamp(min=0).unsqueeze(1)
        kth = sorted_logits.gather(1, kth_index)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if batch.use_top_p:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - batch.top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def _exponential_noise(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for row, generator in batch.generators:
        noise[row].exponential_(generator=generator)
    # A zero draw would turn a masked token's 0/0 into NaN, which argmax would pick.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    rows, tokens, biases = batch.logit_bias
    # accumulate: two entries of one row and token add up rather than the last one winning
    return logits.index_put((rows, tokens), biases, accumulate=True)


class Sampler:
    """Picks one token per logits row and reports the requested logprobs.

    Logprobs are those of the constrained distribution (after the grammar mask and the logit
    bias, before penalties and temperature): the chosen token's logprob is never -inf.
    """

    def __init__(self) -> None:
        self._bitmask: TokenBitmask | None = None  # built at the first grammar row

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = self._constrain(logits.float(), batch)  # [B, V]
        raw_logits = logits
        logits = apply_penalties(logits, batch)
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            sampled = greedy
        else:
            sampled = torch.where(batch.temperature == 0, greedy, self._random(logits, batch))
        sampled_ids = sampled.tolist()  # the step's one unavoidable device-to-host sync
        return SamplerOutput(sampled_ids, self._logprobs(raw_logits, sampled, sampled_ids, batch))

    def _constrain(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.logit_bias is not None:
            logits = apply_logit_bias(logits, batch)  # a new tensor
        if batch.grammar_rows:
            if batch.logit_bias is None:
                logits = logits.clone()  # the executor's logits may be a reused buffer
            if self._bitmask is None:
                self._bitmask = TokenBitmask()
            self._bitmask.apply(logits, batch.grammar_rows, batch.matchers)
        return logits

    @staticmethod
    def _random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
        logits = logits / temperature.unsqueeze(1)
        if batch.use_min_p:
            logits = apply_min_p(logits, batch)
        if batch.use_top_k or batch.use_top_p:
            logits = apply_top_k_top_p(logits, batch)
        probs = logits.softmax(dim=-1)
        # Exponential race (Gumbel-max in another form): argmax p / q with q ~ Exp(1).
        return (probs / _exponential_noise(probs, batch)).argmax(dim=-1)

    @staticmethod
    def _logprobs(
        raw_logits: torch.Tensor,
        sampled: torch.Tensor,
        sampled_ids: list[int],
        batch: SamplingBatch,
    ) -> list[TokenLogprob | None]:
        if batch.max_num_logprobs < 0:
            return [None] * raw_logits.shape[0]
        logprobs = torch.log_softmax(raw_logits, dim=-1)
        chosen = logprobs.gather(1, sampled.unsqueeze(1))  # [B, 1]
        top_values, top_ids = logprobs.topk(max(batch.max_num_logprobs, 1), dim=-1)
        # Values and ids come to the host in two copies, not four.
        values = torch.cat([chosen, top_values], dim=1).tolist()
        top_ids = top_ids.tolist()
        out: list[TokenLogprob | None] = []
        for row, num in enumerate(batch.num_logprobs):
            if num is None:
                out.append(None)
                continue
            top = tuple(zip(top_ids[row][:num], values[row][1 : num + 1], strict=True))
            out.append(TokenLogprob(sampled_ids[row], values[row][0], top))
        return out
