"""Sampling token sequences from a `DiscretePrior`: temperature, top-k, top-p, classifier-free guidance.

Guided sampling puts the conditional and the unconditional rows in one batch, so each position costs one
forward pass. Generation is fixed-length (k tokens) or runs until every row has produced EOS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from base.guidance import Guidance
from base.schema import SamplingConfig

from .discrete import DiscretePrior
from .kv_decoder import KVCacheDecoder

__all__ = ["filter_and_sample", "sample_categorical", "sample_tokens"]


def filter_and_sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits [B, V] -> one sampled id per row, from the softmax restricted to the top-k ids and then to
    the smallest set holding top-p of the mass (the most likely id always stays)."""
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_p < 1.0:  # needs the ids in order of probability
        values, ids = logits.topk(min(top_k or vocab, vocab), dim=-1)
        probs = torch.softmax(values, dim=-1)
        values = values.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        return ids.gather(1, sample_categorical(torch.softmax(values, dim=-1), generator)[:, None]).squeeze(1)
    if 0 < top_k < vocab:
        return _sample_top_k(logits, top_k, generator)
    return sample_categorical(torch.softmax(logits, dim=-1), generator)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of probs [B, V] by inverting the CDF with one uniform per row.

    `torch.multinomial` draws V exponentials per row, which at 16 x 4096 costs more than the decoder's
    attention; a float64 cumulative sum and a binary search cost ~50 µs.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand((len(probs), 1), generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


def _sample_top_k(logits: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Exact top-k sampling by rejection: draw from the full softmax and keep the rows whose draw ranks
    among the k largest logits. An accepted draw is a full-softmax draw conditioned on the top-k set,
    which is the top-k distribution; rejected rows (rare once a model is trained) are redrawn from an
    explicit top-k. This avoids a top-k selection over the vocabulary at every step."""
    ids = sample_categorical(torch.softmax(logits, dim=-1), generator)
    drawn = logits.gather(1, ids[:, None])
    rejected = ((logits > drawn).sum(-1) >= k).nonzero().squeeze(1)
    if len(rejected):
        values, top = logits[rejected].topk(k, dim=-1, sorted=False)
        redrawn = sample_categorical(torch.softmax(values, dim=-1), generator)
        ids[rejected] = top.gather(1, redrawn[:, None]).squeeze(1)
    return ids


class GuidedDecoder:
    """Next-token logits under classifier-free guidance (`base.guidance`), every row in one KV-cached batch."""

    def __init__(self, prior: DiscretePrior, labels: torch.Tensor | None, batch: int, guidance_scale: float,
                 max_positions: int):
        self.guidance = Guidance(guidance_scale, conditional=prior.config.num_classes > 0 and labels is not None)
        self.condition = self.guidance.conditions(prior.condition_ids(labels, batch), prior.condition_ids(None, batch))
        self.decoder = KVCacheDecoder(prior, len(self.condition), max_positions)

    def start(self) -> torch.Tensor:
        """Logits for the first token (after the condition token)."""
        return self.guidance.combine(self.decoder.step(self.condition))

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the tokens just sampled [B]; logits for the token after them."""
        return self.guidance.combine(self.decoder.step(self.guidance.repeat(tokens)))


@torch.no_grad()
def sample_tokens(prior: DiscretePrior, labels: torch.Tensor | None = None, num_samples: int | None = None, *,
                  sampling: SamplingConfig | None = None, length: int | None = None, seed: int = 0,
                  code_sizes: torch.Tensor | None = None, num_codes: int | None = None) -> list[torch.Tensor]:
    """Sample one 1D LongTensor of ids per row (EOS stripped), with `sampling` (default: the prior's own
    `config.sampling`: temperature, top-k, top-p, guidance scale).

    `labels` [B] (or `num_samples` rows, unconditional). `length` forces exactly that many tokens
    (EOS is never drawn); by default a fixed-length prior gives its trained length and a variable-length
    prior stops each row at EOS (at most `max_length` tokens). Token-set priors draw a sorted multiset.
    BPE priors pass `code_sizes` (codes per id, [V]) and `num_codes`: each row then spells exactly
    `num_codes` codes (ids that would overshoot are masked; EOS comes exactly when the count is reached),
    so every sample decodes to a full code sequence.
    """
    batch = len(labels) if labels is not None else num_samples
    if not batch:
        raise ValueError("give labels or a positive num_samples")
    if length is not None and not 1 <= length <= prior.max_length:
        raise ValueError(f"length must be in 1..{prior.max_length}, got {length}")
    budgeted = code_sizes is not None
    if budgeted and (not prior.variable_length or length is not None or not num_codes):
        raise ValueError("a code budget needs a variable-length prior, num_codes, and no forced length")
    steps = num_codes if budgeted else length or prior.max_length
    stops_at_eos = prior.variable_length and length is None
    device = prior.net.token_emb.emb.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(batch, steps, dtype=torch.long, device=device)
    ends = torch.full((batch,), steps, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    sampling = sampling or prior.config.sampling
    decoder = GuidedDecoder(prior, labels, batch, sampling.guidance_scale, steps)
    ids = torch.arange(prior.vocab_size + int(prior.variable_length), device=device)
    if budgeted:  # EOS spells no code; it is allowed only once nothing remains (below)
        sizes = F.pad(code_sizes.to(device=device, dtype=torch.long), (0, 1))
        remaining = torch.full((batch,), num_codes, dtype=torch.long, device=device)
    logits = decoder.start()
    for i in range(steps):
        if budgeted:
            logits.masked_fill_(sizes > remaining[:, None], float("-inf"))
            logits[:, prior.eos_id] = torch.where(remaining == 0, logits[:, prior.eos_id], float("-inf"))
        elif prior.variable_length and (i == 0 or not stops_at_eos):
            logits[:, prior.eos_id] = float("-inf")  # an image has at least one token
        if prior.token_set and i > 0:
            logits.masked_fill_(ids < out[:, i - 1, None], float("-inf"))
        token = filter_and_sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
        if budgeted:
            remaining -= sizes[token]
        out[:, i] = token
        if stops_at_eos:
            ended = (token == prior.eos_id) & ~done
            ends[ended] = i
            done |= ended
            if bool(done.all()):
                break
        if i + 1 < steps:
            logits = decoder.next(token)
    return [row[:end] for row, end in zip(out.cpu(), ends.tolist())]
