"""Config sections of the grid autoencoders: the quantizer (shared with the 1D tokenizer), the autoencoder
and its training loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from base.config import check
from base.schema import MAX_DEPTH

__all__ = ["EquivarianceConfig", "GridConfig", "LossConfig", "MAX_QUANTIZER_CODES", "QuantizerConfig",
           "RepaConfig"]

MAX_QUANTIZER_CODES = 2**20  # a quantizer's codebook: FSQ and LFQ build all of their codes when constructed


@dataclass
class QuantizerConfig:
    """The quantizer of every quantized tokenizer (vector-quantize-pytorch's FSQ, VectorQuantize or LFQ)."""

    kind: Literal["fsq", "vq", "lfq"] = "fsq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    codebook_size: int = 1024  # vq and lfq (lfq: a power of two)
    codebook_dim: int = 8  # vq: the code vectors' size (a linear map connects it to the latent width)
    vq_decay: float = 0.99  # vq: EMA decay of the codebook
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1  # lfq

    def __post_init__(self):
        check(1 < self.codebook_size <= MAX_QUANTIZER_CODES, f"codebook_size' must be in 2..{MAX_QUANTIZER_CODES}",
              self.codebook_size)
        check(self.kind != "lfq" or self.codebook_size & (self.codebook_size - 1) == 0,
              "codebook_size' must be a power of two for lfq", self.codebook_size)
        check(self.codebook_dim > 0, "codebook_dim' must be positive", self.codebook_dim)
        # vector-quantize-pytorch's FSQ refuses level 2 unless preserve_symmetry is on (it is not here)
        check(bool(self.fsq_levels) and all(level > 2 for level in self.fsq_levels),
              "fsq_levels' must be one or more levels, each > 2", self.fsq_levels)
        check(self.kind != "fsq" or math.prod(self.fsq_levels) <= MAX_QUANTIZER_CODES,
              f"fsq_levels' must make at most {MAX_QUANTIZER_CODES} codes", self.fsq_levels)


@dataclass
class GridConfig:
    """Convolutional grid autoencoder (the KL / quantized baselines and the 1D tokenizer's latent space)."""

    downsample: int = 4  # f in {4, 8, 16}
    latent_channels: int = 4
    channels: int = 64
    num_res_blocks: int = 1
    bottleneck: Literal["kl", "quantized"] = "kl"
    kl_weight: float = 1e-6
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self):
        check(self.downsample in (4, 8, 16), "downsample' must be 4, 8 or 16", self.downsample)
        check(self.latent_channels > 0, "latent_channels' must be positive", self.latent_channels)
        check(self.channels > 0, "channels' must be positive", self.channels)
        check(0 <= self.num_res_blocks <= MAX_DEPTH, f"num_res_blocks' must be in 0..{MAX_DEPTH}", self.num_res_blocks)


@dataclass
class LossConfig:
    l1: float = 1.0
    l2: float = 0.0
    lpips: float = 0.0
    lpips_weights: Optional[str] = None  # local path; never downloaded
    adversarial: float = 0.0
    adversarial_start: int = 2000


@dataclass
class EquivarianceConfig:
    """EQ-VAE-style equivariance (Kouzelis et al. 2025) for the grid autoencoders, KL and quantized: for a
    random transform tau per batch, the loss's L1/L2 terms between decode(tau(latents)) and tau(images) are
    added with `weight`. The 1D tokenizer has no spatial latent to transform: it ignores this section."""

    weight: float = 0.0  # 0 = off
    scales: list[int] = field(default_factory=lambda: [2, 4])  # downscale factors (average pooling)
    rotations: bool = True  # rotations by 90, 180 and 270 degrees
    # fraction of each batch's images the term sees (the first ones; batches are shuffled): EQ-VAE applies it
    # to half of its batches, which costs the same on average
    fraction: float = 0.5

    def __post_init__(self):
        check(self.weight >= 0, "weight' must be >= 0", self.weight)
        check(all(s >= 2 for s in self.scales), "scales' must be downscale factors of at least 2", self.scales)
        check(bool(self.scales) or self.rotations, "scales' must list a factor when rotations is false", self.scales)
        check(0.0 < self.fraction <= 1.0, "fraction' must be in (0, 1]", self.fraction)


@dataclass
class RepaConfig:
    """Representation alignment with a frozen teacher (`base.teachers`), for both tokenizer families: a
    trainable projector maps student features to the teacher's channels and `weight` x (1 - cosine
    similarity with the teacher's features of the clean image, per patch, averaged) is added to the loss.
    The 1D tokenizer aligns its decoder's hidden state after block `layer` (REPA; the decoder sees the noisy
    input) through a 2-layer MLP, and with `encoder` also its register encoder's patch tokens; a grid
    autoencoder aligns its latent grid through a 1x1 convolution (VA-VAE). The projectors and the teacher
    belong to the training objective, never to the saved tokenizer."""

    weight: float = 0.0  # 0 = off; REPA uses 0.5-1
    teacher: Optional[str] = None  # folder or hf:owner/name of a saved model with patch_features (local weights)
    layer: Optional[int] = None  # 1D decoder block (1-based) whose output is aligned; None: decoder_depth // 3, >= 1
    encoder: bool = False  # 1D tokenizer: also align the register encoder's patch tokens (last layer)

    def __post_init__(self):
        check(self.weight >= 0, "weight' must be >= 0", self.weight)
        check(self.weight == 0 or bool(self.teacher), "teacher' must name a saved model when weight > 0",
              self.teacher)
        check(self.layer is None or self.layer >= 1, "layer' must be at least 1 (blocks count from 1)", self.layer)
