"""Nested dropout: keep the first k registers per image, replace the rest with a learned mask token."""

from __future__ import annotations

import torch

__all__ = ["KEEP_DISTRIBUTIONS", "apply_nested_dropout", "keep_mask", "powers_of_two_upto", "sample_keep_counts"]

# uniform: k uniform on 1..R (register j present in (R-j+1)/R of the images); pow2: k in 1, 2, 4, ..., R;
# uniform_pow2: an even mix of both; linear: P(k) proportional to k (register j present in about 1-(j/R)^2),
# more mass on long prefixes, so the tail trains more often
KEEP_DISTRIBUTIONS = ("uniform", "pow2", "uniform_pow2", "linear")


def powers_of_two_upto(r: int) -> list[int]:
    """1, 2, 4, ... up to r, plus r itself when r is not a power of two."""
    ks = [1 << i for i in range(r.bit_length()) if (1 << i) <= r]
    return ks if ks[-1] == r else ks + [r]


def sample_keep_counts(batch: int, num_registers: int, distribution: str, *, keep_all_fraction: float = 0.0,
                       generator=None, device=None) -> torch.Tensor:
    """Per-image k in 1..R from `distribution` (`KEEP_DISTRIBUTIONS`); with `keep_all_fraction` > 0 that
    fraction of the images (each by its own coin) keeps all R instead."""
    if distribution not in KEEP_DISTRIBUTIONS:
        raise ValueError(f"unknown nested dropout distribution '{distribution}'")
    keep = _draw(batch, num_registers, distribution, generator, device)
    if keep_all_fraction > 0:  # no draw when off: the default consumes the random stream as it always did
        coin = torch.rand(batch, generator=generator, device=device) < keep_all_fraction
        keep = torch.where(coin, torch.full_like(keep, num_registers), keep)
    return keep


def _draw(batch: int, r: int, distribution: str, generator, device) -> torch.Tensor:
    if distribution == "linear":
        weights = torch.arange(1, r + 1, dtype=torch.float, device=device)
        return torch.multinomial(weights, batch, replacement=True, generator=generator) + 1
    uniform = torch.randint(1, r + 1, (batch,), generator=generator, device=device)
    if distribution == "uniform":
        return uniform
    pow2 = torch.tensor(powers_of_two_upto(r), device=device)
    choice = pow2[torch.randint(len(pow2), (batch,), generator=generator, device=device)]
    if distribution == "pow2":
        return choice
    coin = torch.rand(batch, generator=generator, device=device) < 0.5
    return torch.where(coin, uniform, choice)


def keep_mask(keep: torch.Tensor, num_registers: int) -> torch.Tensor:
    """[B] counts -> [B, R] boolean, True for kept positions."""
    return torch.arange(num_registers, device=keep.device)[None] < keep[:, None]


def apply_nested_dropout(registers: torch.Tensor, keep: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """registers [B, R, D]; positions >= keep[b] become `mask_token` [D]."""
    kept = keep_mask(keep, registers.shape[1])[..., None]
    return torch.where(kept, registers, mask_token.to(registers.dtype))
