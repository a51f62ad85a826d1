"""End-to-end generation: prior samples -> tokenizer.detokenize -> images (and a PNG grid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flextok.visualize import save_image_grid

from .discrete import DiscretePrior
from .flow import FlowPrior
from .sampling import sample_tokens
from .token_dataset import TokenizerMismatch, fingerprint_model, load_codec


@torch.no_grad()
def generate_images(
    prior: DiscretePrior | FlowPrior,
    tokenizer: torch.nn.Module,
    labels: torch.Tensor | list[int] | None = None,
    *,
    num_samples: int | None = None,
    path: str | Path | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    length: int | None = None,
    steps: int = 25,
    seed: int = 0,
    codec: Any = None,
    decode_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sample images [B, 3, H, W] in [-1, 1]; with `path`, also write a PNG grid (one column per class).

    `labels` (or `num_samples` unconditional rows) pick the classes. Discrete priors use temperature /
    top_k / top_p / cfg_scale / length; flow priors use steps / cfg_scale. BPE priors decode ids with
    `codec` (loaded from the prior's config when not given). `decode_kwargs` go to `tokenizer.detokenize`
    (e.g. FlexTok's steps, guidance). The tokenizer must be the one the prior was trained on.
    """
    if prior.tokenizer_hash and prior.tokenizer_hash != fingerprint_model(tokenizer):
        raise TokenizerMismatch(
            f"this prior was trained on tokens of tokenizer {prior.tokenizer_hash[:12]}, "
            f"not of the given {type(tokenizer).__name__}"
        )
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
    if isinstance(prior, FlowPrior):
        tokens = prior.sample(labels, num_samples, steps=steps, cfg_scale=cfg_scale, seed=seed)
    else:
        budget = {}
        if prior.config.tokens == "bpe":  # BPE ids were encoded from full code sequences: spell exactly that many
            codec = codec or load_codec(prior.config.bpe)
            budget = {"code_sizes": torch.as_tensor(codec.token_sizes()), "num_codes": tokenizer.tokens_per_image}
        tokens = sample_tokens(
            prior, labels, num_samples, length=length, temperature=temperature, top_k=top_k, top_p=top_p,
            cfg_scale=cfg_scale, seed=seed, **budget,
        )
        if budget:
            tokens = [torch.as_tensor(codec.decode(t.numpy())).long().flatten() for t in tokens]
    images = tokenizer.detokenize(tokens, **(decode_kwargs or {})).cpu()
    if path is not None:
        columns, titles = class_columns(images, labels)
        save_image_grid(columns, path, titles)
    return images


def class_columns(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[list[torch.Tensor], list[str]]:
    """One column per class in order of first appearance; unconditional samples in equal columns of <= 8
    (the grid shows as many rows as its shortest column)."""
    if labels is None:
        rows = max(r for r in range(1, 9) if len(images) % r == 0)
        columns = list(images.split(rows))
        return columns, ["samples"] * len(columns)
    classes = list(dict.fromkeys(labels.tolist()))
    return [images[labels == c] for c in classes], [f"class {c}" for c in classes]
