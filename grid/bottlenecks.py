"""Bottlenecks: a diagonal Gaussian (KL) and one wrapper over vector-quantize-pytorch's VQ / FSQ / LFQ."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .schema import QuantizerConfig

__all__ = ["DiagonalGaussian", "Quantizer", "code_dim"]


class DiagonalGaussian(nn.Module):
    """Splits [B, 2c, h, w] into mean and log-variance; returns (latents, KL per image)."""

    def forward(self, moments: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        latents = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        return latents, kl


class Quantizer(nn.Module):
    """Sequences [B, N, dim] -> (quantized [B, N, dim], indices [B, N] long, auxiliary loss scalar).

    One interface over the three vector-quantize-pytorch quantizers, so models never branch on the kind.
    """

    def __init__(self, config: QuantizerConfig, dim: int):
        super().__init__()
        # vector-quantize-pytorch's constructors call `.item()`, which meta tensors cannot answer: under a
        # meta-device build (`flextok.plan`) the quantizer alone is built on the CPU (small: codebooks only)
        with torch.device("cpu") if torch.get_default_device().type == "meta" else contextlib.nullcontext():
            self._build(config, dim)

    def _build(self, config: QuantizerConfig, dim: int) -> None:
        from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

        kind, codebook_size, self.kind = config.kind, config.codebook_size, config.kind
        if kind == "fsq":
            self.impl = FSQ(levels=list(config.fsq_levels), dim=dim)
            self.codebook_size = self.impl.codebook_size
        elif kind == "vq":
            # sync_codebook=False: codebook all-reduce can hang outside DDP (DESIGN.md §5)
            self.impl = VectorQuantize(
                dim=dim, codebook_size=codebook_size, codebook_dim=config.codebook_dim, decay=config.vq_decay,
                commitment_weight=config.commitment_weight, threshold_ema_dead_code=2, kmeans_init=True,
                sync_codebook=False,
            )
            self.codebook_size = codebook_size
        elif kind == "lfq":
            if codebook_size & (codebook_size - 1):
                raise ValueError(f"lfq needs a power-of-two codebook_size, got {codebook_size}")
            self.impl = LFQ(
                dim=dim, codebook_size=codebook_size, entropy_loss_weight=config.entropy_weight,
                commitment_loss_weight=config.commitment_weight,
            )
            self.codebook_size = codebook_size
        else:
            raise ValueError(f"unknown quantizer '{kind}' (use fsq, vq or lfq)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kind == "fsq":
            quantized, indices = self.impl(x)
            # FSQ bounds with tanh: inputs pushed past ~±1 saturate at the extreme codes, where gradients
            # vanish and codes collapse. A penalty on the excess keeps them in the usable range.
            aux = F.relu(x.float().abs() - 1.0).pow(2).mean()
        else:
            quantized, indices, aux = self.impl(x)
        indices = indices.long()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise RuntimeError(f"{self.kind} produced indices outside [0, {self.codebook_size})")
        return quantized, indices, aux.sum()

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, N] -> the quantized vectors [B, N, dim] the decoder consumes."""
        if self.kind == "vq":
            return self.impl.get_output_from_indices(indices)
        return self.impl.indices_to_codes(indices)


def code_dim(config: QuantizerConfig) -> int:
    """The width of the vectors a quantizer of this config takes: one per FSQ level, log2(codebook) bits
    for LFQ, and VQ's own width otherwise (a linear map connects it to the codebook's)."""
    if config.kind == "fsq":
        return len(config.fsq_levels)
    if config.kind == "lfq":
        return int(math.log2(config.codebook_size))
    return config.codebook_dim
