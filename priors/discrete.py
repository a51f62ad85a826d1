"""The discrete prior: a GPT-style decoder (x-transformers, rotary) over a tokenizer's token ids."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from base.config import check
from base.hub import HubMixin, register_model

from .fast_layers import use_fast_layers
from .schema import PriorConfig

__all__ = ["DiscretePrior", "DiscretePriorArgs", "IGNORE", "LOGIT_CHUNK_BYTES", "MAX_VOCAB_SIZE"]

IGNORE = -100
LOGIT_CHUNK_BYTES = 2**24  # logits are made in chunks of at most 16 MiB (see `_token_nll`)
MAX_VOCAB_SIZE = 2**24  # far above any codebook (LFQ: 2^18) or BPE vocabulary; bounds the embedding and head


@dataclass
class DiscretePriorArgs:
    """`DiscretePrior`'s constructor arguments besides its config (saved beside it in `config.json`)."""

    vocab_size: int
    max_length: int
    variable_length: bool = False
    token_set: bool = False
    tokenizer_hash: str = ""

    def __post_init__(self):
        check(1 <= self.vocab_size <= MAX_VOCAB_SIZE, f"vocab_size' must be in 1..{MAX_VOCAB_SIZE}", self.vocab_size)
        check(self.max_length >= 1, "max_length' must be positive", self.max_length)
        check(not (self.token_set and self.variable_length),
              "variable_length' must be false for a token-set prior (its length is the set size)", self.variable_length)


@register_model("discrete_prior")
class DiscretePrior(HubMixin, nn.Module):
    """Next-token model over sequences `[condition] t_0 … t_{L-1} [EOS]`.

    Ids: codes are [0, V); EOS is V; the null condition is V+1; class c is V+2+c. The null condition is
    the BOS of an unconditional prior and the dropped class of a conditional one, so classifier-free
    guidance needs no extra parameters. The output head covers only what may be generated (the codes,
    plus EOS when lengths vary), so samplers never have to mask special ids.
    """

    config_class = PriorConfig
    args_class = DiscretePriorArgs

    def __init__(self, config: PriorConfig, vocab_size: int, max_length: int, variable_length: bool = False,
                 token_set: bool = False, tokenizer_hash: str = ""):
        nn.Module.__init__(self)
        HubMixin.__init__(self, config, vocab_size=vocab_size, max_length=max_length,
                          variable_length=variable_length, token_set=token_set, tokenizer_hash=tokenizer_hash)
        self.vocab_size, self.max_length = vocab_size, max_length
        dim_head = config.dim // config.heads
        self.variable_length, self.token_set, self.tokenizer_hash = variable_length, token_set, tokenizer_hash
        self.net = TransformerWrapper(
            num_tokens=vocab_size + 2 + config.num_classes,
            max_seq_len=max_length + 1,
            logits_dim=vocab_size + int(variable_length),
            use_abs_pos_emb=False,
            attn_layers=Decoder(
                dim=config.dim, depth=config.depth, heads=config.heads, attn_dim_head=dim_head,
                # rotate at least 32 dims of each head (x-transformers' advice), half of larger heads
                rotary_pos_emb=True, rotary_emb_dim=min(dim_head, max(32, dim_head // 2)),
                attn_flash=True, attn_dropout=config.attn_dropout, ff_dropout=config.dropout,
            ),
        )
        use_fast_layers(self.net)

    @property
    def eos_id(self) -> int:
        return self.vocab_size

    @property
    def null_id(self) -> int:
        return self.vocab_size + 1

    def condition_ids(self, labels: torch.Tensor | None, batch: int, drop: float = 0.0) -> torch.Tensor:
        """Labels [B] (negative = none) -> condition ids [B]; each is replaced by null with prob. `drop`."""
        device = self.net.token_emb.emb.weight.device
        if labels is None or self.config.num_classes == 0:
            return torch.full((batch,), self.null_id, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        if labels.numel() and labels.max() >= self.config.num_classes:
            raise ValueError(f"labels must be < num_classes={self.config.num_classes}, got {labels.max().item()}")
        ids = torch.where(labels < 0, self.null_id, labels + self.vocab_size + 2)
        if drop > 0:
            ids = torch.where(torch.rand(batch, device=device) < drop, self.null_id, ids)
        return ids

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: mean next-token cross-entropy (nats) over real targets, with class dropout."""
        drop = self.config.class_dropout if self.training else 0.0
        inputs, targets = self._inputs_and_targets(tokens, self.condition_ids(labels, len(tokens), drop), lengths)
        return self._token_nll(inputs, targets).sum() / (targets != IGNORE).sum()

    def nll_bits(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood of each sequence (including its EOS) in bits: bits per image."""
        inputs, targets = self._inputs_and_targets(tokens, self.condition_ids(labels, len(tokens)), lengths)
        return self._token_nll(inputs, targets).sum(1) / math.log(2)

    def prefix_nll_bits(self, tokens: torch.Tensor, ks: list[int], labels: torch.Tensor | None = None) -> torch.Tensor:
        """Bits of each sequence's first k tokens for every k in `ks`: [B, len(ks)]. The prior is autoregressive,
        so this is its exact marginal likelihood of the prefix, what an entropy coder driven by it spends to send
        the first k tokens of an ordered stream (a coarse-to-fine 1D tokenizer at k tokens). Fixed-length ordered
        streams only: token sets have no prefixes, and a variable-length stream's prefixes end at its EOS."""
        if not ks or min(ks) < 1 or max(ks) > tokens.shape[1]:
            raise ValueError(f"prefix lengths must be in 1..{tokens.shape[1]}, got {ks}")
        return self.position_nll_bits(tokens, labels).cumsum(1)[:, [k - 1 for k in ks]]

    def position_nll_bits(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Bits of each token given the ones before it: [B, L], summing to the bits of the whole sequence.
        Fixed-length ordered streams only (position i means the same register in every image)."""
        if self.variable_length or self.token_set:
            raise ValueError("per-position bits need a fixed-length ordered token stream (not token sets or "
                             "variable lengths)")
        inputs, targets = self._inputs_and_targets(tokens, self.condition_ids(labels, len(tokens)), None)
        return self._token_nll(inputs, targets) / math.log(2)

    def _token_nll(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy [B, L] (0 at ignored targets), with the output head applied in chunks.

        Logits of a whole batch are large (16x128 tokens x 4096 ids = 32 MiB): allocations that size are
        fresh mmaps whose page faults cost more than the softmax itself on CPU, and chunks also bound
        the peak memory of big vocabularies on GPUs. The head runs as a module call per chunk, so ZeRO-3
        gathers its weight as usual.
        """
        hidden = self.net(inputs, return_embeddings=True).flatten(0, 1)
        flat_targets = targets.flatten()
        rows = max(1, LOGIT_CHUNK_BYTES // (4 * self.net.to_logits.out_features))
        floors = self._set_floors(inputs, targets).flatten() if self.token_set else None
        nll = []
        for i, (h, t) in enumerate(zip(hidden.split(rows), flat_targets.split(rows))):
            logits = self.net.to_logits(h).float()
            if floors is not None:  # a sorted multiset: ids below the previous one are impossible
                ids = torch.arange(logits.shape[1], device=logits.device)
                logits = logits.masked_fill(ids < floors[i * rows : i * rows + len(h), None], float("-inf"))
            nll.append(F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="none"))
        return torch.cat(nll).view_as(targets)

    def _set_floors(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The smallest id each position of a sorted multiset may take: the previous token (0 at the first).

        The sampler draws token sets in sorted order, so training and likelihood use the same support: the
        probability mass of ids that sorting forbids is renormalized onto the allowed ones."""
        floors = torch.zeros_like(targets)
        floors[:, 1:] = inputs[:, 1:]  # fixed length: input i is the token before target i (input 0: condition)
        return floors

    def logits(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Next-token logits after each prefix of `[condition] + tokens`: [B, L+1, V(+1)]."""
        return self.net(torch.cat([condition[:, None], tokens], 1))

    def _inputs_and_targets(self, tokens: torch.Tensor, condition: torch.Tensor,
                            lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(condition.device)
        if not self.variable_length:
            return torch.cat([condition[:, None], tokens[:, :-1]], 1), tokens
        if lengths is None:
            raise ValueError("a variable-length prior needs the sequence lengths")
        lengths = lengths.to(condition.device)[:, None]
        inputs = torch.cat([condition[:, None], tokens], 1)
        padded = F.pad(tokens, (0, 1))
        position = torch.arange(padded.shape[1], device=padded.device)[None]
        targets = torch.where(position < lengths, padded, torch.where(position == lengths, self.eos_id, IGNORE))
        return inputs, targets
