"""Config sections of the 1D tokenizer, and `TokenizerRunConfig`: one experiment file as the tokenizer
stage (`train_tokenizer.py`) sees it. Later layers extend it with their own sections (`priors.schema`,
`evaluation.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from base.config import check
from base.schema import (
    MAX_DEPTH,
    DataConfig,
    DistributedConfig,
    SamplingConfig,
    TrainLoopConfig,
)
from grid.schema import (
    EquivarianceConfig,
    GridConfig,
    LossConfig,
    QuantizerConfig,
    RepaConfig,
)

__all__ = ["FlexTokConfig", "TrainConfig", "PixelLossConfig", "PriorLossConfig", "TokenizerRunConfig"]


@dataclass
class FlexTokConfig:
    """FlexTok-style 1D tokenizer: register encoder, quantizer, nested dropout, generative decoder."""

    input: Literal["latents", "pixels"] = "latents"
    autoencoder: Optional[str] = None  # folder or hub id hf:owner/name of a grid KL autoencoder (input: latents)
    patch_size: int = 1
    num_registers: int = 32
    dim: int = 256
    depth: int = 4
    heads: int = 4
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 4
    # GLU MLP hidden width = mlp_ratio * width; 8/3 matches a ratio-4 plain MLP in parameters (FlexTok: 682 at 256)
    mlp_ratio: float = 8 / 3
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    # nested dropout's keep-count distribution (`flextok.nested_dropout.KEEP_DISTRIBUTIONS`). The default is the
    # tail schedule the shaping ablation adopted: "linear" (P(k) ~ k) with two prefixes per image gave +1.01 dB
    # at k = 32 on Fashion-MNIST and +0.85 on photographs over "uniform" (paired; docs/shaping.md), which in
    # turn beat FlexTok's "pow2" on the tail (configs/1d_tiny.yaml); it costs 1.5x the step time and 0.4-1.9 dB
    # at k <= 4
    nested_dropout: Literal["uniform", "pow2", "uniform_pow2", "linear"] = "linear"
    keep_all_fraction: float = 0.0  # fraction of the images that keep all R registers instead (tail supervision)
    # tail supervision: decoder losses per image (each its own keep count, noise and t) from one encoder pass,
    # averaged; the decoder's cost per step grows n-fold, the encoder's not
    prefixes_per_example: int = 2
    token_set: bool = False
    decoder: Literal["rectified_flow", "diffusion"] = "rectified_flow"
    # what the decoder's trunk outputs: rectified flow "v" (velocity) or "x0"; diffusion "v" or "eps"
    prediction: Literal["v", "eps", "x0"] = "v"
    time_logit_mean: float = 0.0  # rectified flow: t = sigmoid(N(mean, 1)); > 0 favours noisier t
    cond_dropout: float = 0.1  # null-condition probability, for classifier-free guidance
    # detokenize's defaults. Guidance only at noise levels 0.3-0.7: on the quickstart tokenizer it was at least
    # as good as guiding every step at scale 3 and much better at 7.5, and costs 11 trunk passes of 8 steps,
    # not 16 (benchmarks/RESULTS.md); at guidance 1 the interval changes nothing
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(guidance_interval=[0.3, 0.7]))

    @property
    def decoder_rows_per_image(self) -> int:
        """Decoder rows per training image: `prefixes_per_example`, but one for a token set (no prefixes)."""
        return 1 if self.token_set else self.prefixes_per_example

    def __post_init__(self):
        check(self.num_registers > 0, "num_registers' must be positive", self.num_registers)
        check(self.mlp_ratio > 0, "mlp_ratio' must be positive", self.mlp_ratio)
        check(self.patch_size > 0, "patch_size' must be positive", self.patch_size)
        for width, heads in (("dim", "heads"), ("decoder_dim", "decoder_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            check(w > 0 and w % 4 == 0 and h > 0 and w % h == 0,
                  f"{width}' must be positive and divisible by 4 and by {heads}", w)
        for depth in ("depth", "decoder_depth"):
            check(1 <= getattr(self, depth) <= MAX_DEPTH, f"{depth}' must be in 1..{MAX_DEPTH}", getattr(self, depth))
        check(0.0 <= self.cond_dropout < 1.0, "cond_dropout' must be in [0, 1)", self.cond_dropout)
        check(0.0 <= self.keep_all_fraction <= 1.0, "keep_all_fraction' must be in [0, 1]", self.keep_all_fraction)
        check(self.prefixes_per_example >= 1, "prefixes_per_example' must be at least 1", self.prefixes_per_example)
        allowed = {"rectified_flow": ("v", "x0"), "diffusion": ("v", "eps")}[self.decoder]
        check(self.prediction in allowed, f"prediction' must be {' or '.join(allowed)} for the {self.decoder} decoder",
              self.prediction)


@dataclass
class PixelLossConfig:
    """A pixel-space term for the 1D tokenizer's decoder: the clean target x̂0 implied by its prediction at
    the sampled noise level t is decoded (through the frozen KL decoder for input 'latents') and compared
    with the image, weighted by w(t); added with `weight`. The grid tokenizer ignores this section."""

    weight: float = 0.0  # 0 = off
    l1: float = 1.0  # relative weights of the distances between the decoded x̂0 and the image
    l2: float = 0.0
    lpips: float = 0.0
    lpips_weights: Optional[str] = None  # local LPIPS weights file (else $FLEXTOK_LPIPS_WEIGHTS); never downloaded
    # w(t): at large t, x̂0 is the blurry mean of what the registers leave open, which the flow loss already
    # teaches; "one_minus_t" (1 - t) puts the term near clean targets, where x̂0 can be sharp; "uniform" (1)
    t_weighting: Literal["one_minus_t", "uniform"] = "one_minus_t"
    t_max: float = 1.0  # rows with t > t_max weigh 0 (still decoded: no data-dependent shapes)

    def __post_init__(self):
        for key in ("weight", "l1", "l2", "lpips"):
            check(getattr(self, key) >= 0, f"{key}' must be >= 0", getattr(self, key))
        check(self.weight == 0 or self.l1 + self.l2 + self.lpips > 0,
              "l1' (or l2, lpips) must be > 0 when weight > 0", self.l1)
        check(0.0 < self.t_max <= 1.0, "t_max' must be in (0, 1]", self.t_max)


@dataclass
class PriorLossConfig:
    """A small causal transformer over the 1D tokenizer's register codes, trained jointly with it (LARP /
    CRT style): its next-token NLL trains it at weight 1 and reaches the encoder, through the quantizer's
    straight-through codes, at `weight`. Part of the objective, not of the saved tokenizer; the grid
    tokenizer ignores this section."""

    weight: float = 0.0  # 0 = off; trades reconstruction against modelability (an all-zero code is free)
    dim: int = 128
    depth: int = 2
    heads: int = 4

    def __post_init__(self):
        check(self.weight >= 0, "weight' must be >= 0", self.weight)
        check(self.dim > 0 and self.heads > 0 and self.dim % self.heads == 0,
              "dim' must be positive and divisible by heads", self.dim)
        check(1 <= self.depth <= MAX_DEPTH, f"depth' must be in 1..{MAX_DEPTH}", self.depth)


@dataclass
class TrainConfig(TrainLoopConfig):
    """The tokenizer's training (`train`)."""

    ema_decay: float = 0.999
    activation_checkpointing: bool = False  # recompute transformer / residual blocks in backward
    compile: bool = False  # torch.compile the training forward (pays off only on long runs: see RESULTS.md)
    device: str = "auto"  # auto | cpu | cuda (bf16 autocast on CUDA, fp32 on CPU)

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.ema_decay < 1.0, "ema_decay' must be in [0, 1)", self.ema_decay)


@dataclass
class TokenizerRunConfig:
    """One experiment file as the tokenizer layer sees it (`train_tokenizer.py`)."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    tokenizer: Literal["grid", "flextok"] = "grid"
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    flextok: FlexTokConfig = field(default_factory=FlexTokConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    equivariance: EquivarianceConfig = field(default_factory=EquivarianceConfig)  # grid tokenizer only, like loss
    pixel_loss: PixelLossConfig = field(default_factory=PixelLossConfig)  # 1D tokenizer only
    prior_loss: PriorLossConfig = field(default_factory=PriorLossConfig)  # 1D tokenizer only
    repa: RepaConfig = field(default_factory=RepaConfig)  # both families
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name
