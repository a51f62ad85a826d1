"""Config sections of the 1D tokenizer, and `TokenizerRunConfig`: one experiment file as the tokenizer
stage (`train_tokenizer.py`) sees it. Later layers extend it with their own sections (`priors.schema`,
`evaluation.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from base.config import check
from base.schema import (
    MAX_DEPTH,
    DataConfig,
    DistributedConfig,
    SamplingConfig,
    TrainConfig,
)
from grid.schema import _QUANTIZER_KEYS, GridConfig, LossConfig, QuantizerConfig

__all__ = ["FlexTokConfig", "TokenizerRunConfig"]


@dataclass
class FlexTokConfig:
    """FlexTok-style 1D tokenizer: register encoder, quantizer, nested dropout, generative decoder."""

    RENAMED: ClassVar[dict[str, str]] = {
        "quantizer": "quantizer.kind", **{key: f"quantizer.{key}" for key in _QUANTIZER_KEYS},
        "sample_steps": "sampling.steps", "guidance": "sampling.guidance_scale",
    }
    LEGACY_DEFAULTS: ClassVar[dict[str, object]] = {"sampling.guidance_interval": [0.0, 1.0]}  # saved before it

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
    nested_dropout: Literal["uniform", "pow2", "uniform_pow2"] = "pow2"
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
        allowed = {"rectified_flow": ("v", "x0"), "diffusion": ("v", "eps")}[self.decoder]
        check(self.prediction in allowed, f"prediction' must be {' or '.join(allowed)} for the {self.decoder} decoder",
              self.prediction)


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
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name
