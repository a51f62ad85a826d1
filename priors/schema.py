"""Config sections of the prior layer: the prior model (`prior`) and its DeepSpeed training
(`prior_train`), and `PriorRunConfig` (what `train_prior.py` reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from base.config import check
from base.schema import MAX_DEPTH, SamplingConfig, TrainLoopConfig
from flextok.schema import TokenizerRunConfig

__all__ = ["PriorConfig", "PriorRunConfig", "PriorTrainConfig"]


@dataclass
class PriorConfig:
    """Decoder-only prior over a tokenizer's token stream (or a flow prior over KL latents)."""

    tokenizer: Optional[str] = None  # folder or hub id hf:owner/name of the tokenizer the tokens come from
    kind: Literal["discrete", "flow"] = "discrete"
    tokens: Literal["full", "prefix", "adaptive", "bpe"] = "full"
    prefix_length: int = 0  # tokens: prefix
    target_psnr: float = 30.0  # tokens: adaptive, the per-image reconstruction PSNR that sets its length
    bpe: Optional[str] = None  # tokens: bpe, folder or hub id hf:owner/name of a bpe_image codec
    cache_dir: Optional[str] = None  # token caches; None = <out_dir>/token_cache (see `token_cache_dir`)
    tokenize_batch_size: int = 64
    cache_shard_size: int = 10_000  # images per token-cache shard: the unit of work per rank and of resume
    dim: int = 256
    depth: int = 6
    heads: int = 4
    num_classes: int = 0  # 0 = unconditional
    class_dropout: float = 0.1
    dropout: float = 0.0  # in the feed-forward blocks
    # on the attention weights; 0 as in LlamaGen, and only then does CPU training use the fused attention
    # kernel (dropout masks over [B, heads, L, L] cost a fifth of a CPU training step)
    attn_dropout: float = 0.0
    # this prior's sampling defaults: a flow prior integrates 25 Euler steps (SamplingConfig's 8 are the 1D
    # decoder's default)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=25))

    def __post_init__(self):
        check(self.dim > 0, "dim' must be positive", self.dim)
        check(self.dim % max(self.heads, 1) == 0 and self.heads > 0, "heads' must divide dim", self.heads)
        check(1 <= self.depth <= MAX_DEPTH, f"depth' must be in 1..{MAX_DEPTH}", self.depth)
        check(self.num_classes >= 0, "num_classes' must be >= 0", self.num_classes)
        check(0.0 <= self.class_dropout < 1.0, "class_dropout' must be in [0, 1)", self.class_dropout)
        check(0.0 <= self.dropout < 1.0, "dropout' must be in [0, 1)", self.dropout)
        check(0.0 <= self.attn_dropout < 1.0, "attn_dropout' must be in [0, 1)", self.attn_dropout)
        check(self.tokenize_batch_size > 0, "tokenize_batch_size' must be positive", self.tokenize_batch_size)
        check(self.cache_shard_size > 0, "cache_shard_size' must be positive", self.cache_shard_size)
        check(self.tokens != "prefix" or self.prefix_length > 0, "prefix_length' must be > 0 for tokens: prefix",
              self.prefix_length)
        check(self.tokens != "bpe" or bool(self.bpe), "bpe' must name a bpe_image codec for tokens: bpe", self.bpe)
        check(self.kind != "flow" or self.tokens == "full", "tokens' must be full for kind: flow", self.tokens)


@dataclass
class PriorTrainConfig(TrainLoopConfig):
    """The prior's DeepSpeed training (`prior_train`)."""

    run_name: Optional[str] = None  # run folder under out_dir; None = the top-level name
    lr: float = 1e-4
    weight_decay: float = 0.05  # on matrices and embeddings; never on norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    zero_stage: int = 0  # 3 also builds the model already partitioned (`deepspeed.zero.Init`)
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state and step on the CPU
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs
    # a DeepSpeed JSON merged over the config made from this section (it wins wherever it sets a key;
    # batch sizes must agree, see `priors.deepspeed_utils.deepspeed_config`); `--deepspeed_config` wins
    deepspeed_config: Optional[str] = None
    sample_every: int = 500
    num_samples: int = 16  # images in each periodic sample grid (drawn with `prior.sampling`)

    def __post_init__(self):
        super().__post_init__()
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage' must be 0, 1, 2 or 3", self.zero_stage)
        check(not self.offload_optimizer or self.zero_stage > 0, "offload_optimizer' needs zero_stage >= 1",
              self.offload_optimizer)
        check(self.sample_every > 0, "sample_every' must be positive", self.sample_every)
        check(self.num_samples >= 0, "num_samples' must be >= 0", self.num_samples)


@dataclass
class PriorRunConfig(TokenizerRunConfig):
    """One experiment file as the prior layer sees it (`train_prior.py`)."""

    prior: PriorConfig = field(default_factory=PriorConfig)
    prior_train: PriorTrainConfig = field(default_factory=PriorTrainConfig)

    @property
    def prior_run_dir(self) -> Path:
        return Path(self.out_dir) / (self.prior_train.run_name or self.name)
