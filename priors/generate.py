"""End-to-end generation: prior samples -> tokenizer.detokenize -> images (and a PNG grid)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from base.fingerprint import fingerprint_model
from base.schema import SamplingConfig
from base.visualize import class_columns, save_image_grid
from bpe_image import open_codec
from flextok import FlexTok

from .discrete import DiscretePrior
from .flow import FlowPrior
from .pairing import check_tokenizer
from .sampling import sample_tokens

__all__ = ["generate_images"]


@torch.no_grad()
def generate_images(
    prior: DiscretePrior | FlowPrior,
    tokenizer: torch.nn.Module,
    labels: torch.Tensor | list[int] | None = None,
    *,
    num_samples: int | None = None,
    path: str | Path | None = None,
    sampling: SamplingConfig | None = None,
    decoder_sampling: SamplingConfig | None = None,
    length: int | None = None,
    seed: int = 0,
    codec: Any = None,
) -> torch.Tensor:
    """Sample images [B, 3, H, W] in [-1, 1]; with `path`, also write a PNG grid (one column per class).

    `labels` (or `num_samples` unconditional rows) pick the classes. `sampling` drives the prior (default:
    its own `config.sampling`); `decoder_sampling` a FlexTok tokenizer's decoder (default: its own), both
    seeded with `seed`. Discrete priors may force a `length`. BPE priors decode ids with `codec` (loaded
    from the prior's config when not given). The tokenizer must be the one the prior was trained on.
    """
    check_tokenizer(prior, fingerprint_model(tokenizer), f"the given {type(tokenizer).__name__}")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
    if isinstance(prior, FlowPrior):
        tokens = prior.sample(labels, num_samples, sampling=sampling, seed=seed)
    else:
        budget = {}
        if prior.config.tokens == "bpe":  # BPE ids were encoded from full code sequences: spell exactly that many
            codec = codec or open_codec(prior.config.bpe)[0]
            budget = {"code_sizes": torch.as_tensor(codec.token_sizes()), "num_codes": tokenizer.tokens_per_image}
        tokens = sample_tokens(prior, labels, num_samples, sampling=sampling, length=length, seed=seed, **budget)
        if budget:
            tokens = [torch.as_tensor(codec.decode(t.numpy())).long().flatten() for t in tokens]
    if isinstance(tokenizer, FlexTok):
        decoding = decoder_sampling or tokenizer.config.sampling
        images = tokenizer.detokenize(tokens, seed=seed, **dataclasses.asdict(decoding))
    else:
        images = tokenizer.detokenize(tokens)
    images = images.cpu()
    if path is not None:
        columns, titles = class_columns(images, labels)
        save_image_grid(columns, path, titles)
    return images
