"""Config sections of the base layer and the tokenizers: data, quantizer, sampling, grid autoencoder,
1D tokenizer, loss, training, and `TokenizerRunConfig` (what `train_tokenizer.py` reads).

Each dataclass is the one home of its defaults. Later layers extend `TokenizerRunConfig` with their own
sections (`priors.schema`, `evaluation.schema`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from .config import check

__all__ = [
    "DataConfig", "DistributedConfig", "FlexTokConfig", "GridConfig", "LossConfig", "MAX_DEPTH", "MAX_QUANTIZER_CODES",
    "QuantizerConfig", "SamplingConfig", "SamplingOverrides", "TokenizerRunConfig", "TrainConfig",
]

# Sanity bounds on model sizes, so a hostile or mistyped config cannot make a build loop or allocate without
# end (the total size of a loaded model is bounded too: `flextok.hub.MAX_MODEL_ELEMENTS`).
MAX_DEPTH = 1024  # blocks in one stack (transformer depth, residual blocks per level)
MAX_QUANTIZER_CODES = 2**20  # a quantizer's codebook: FSQ and LFQ build all of their codes when constructed


@dataclass
class DataConfig:
    # hf:<id> | imagefolder:<dir> | parquet:<glob> | fashion_mnist:<dir> | builtin:skimage
    source: str = "builtin:skimage"
    resolution: int = 32
    train_split: str = "train"
    eval_split: str = "test"
    image_column: str = "image"
    label_column: Optional[str] = "label"
    streaming: bool = False
    hflip: bool = True
    pad_to: int = 0  # center smaller images on a black square of this size first (Fashion-MNIST: 32)
    num_workers: int = 0
    # builtin:skimage only: crops per training photograph and per held-out photograph
    crops_per_photo: int = 256
    eval_crops_per_photo: int = 32
    # images used for held-out metrics during training and in evaluation
    eval_images: int = 64
    train_images: int = 0  # > 0: a seeded subset of the training split of this size (quick runs); 0 = all

    def __post_init__(self):
        check(self.resolution >= 8, "resolution' must be at least 8", self.resolution)
        check(self.pad_to >= 0, "pad_to' must be >= 0", self.pad_to)
        check(self.train_images >= 0, "train_images' must be >= 0 (0 = all)", self.train_images)


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
class SamplingConfig:
    """How anything that samples does it: the 1D tokenizer's decoder, the flow prior, the token prior.

    `guidance_scale` is classifier-free guidance (`flextok.guidance`): 1 = conditional, 0 = unconditional,
    > 1 = guided. `steps` are the Euler/DDIM steps of flow and diffusion samplers. `temperature`, `top_k`
    and `top_p` shape a token prior's next-token distribution (flow samplers have none).
    """

    guidance_scale: float = 1.0
    # flow and diffusion samplers: guide only at noise levels t in [low, high] (t = 1 is noise); the other
    # steps run the conditional model alone, one pass instead of two (Kynkaanniemi et al., 2024)
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    steps: int = 8
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0

    def __post_init__(self):
        check(self.guidance_scale >= 0, "guidance_scale' must be >= 0", self.guidance_scale)
        low_high = len(self.guidance_interval) == 2 and 0 <= self.guidance_interval[0] <= self.guidance_interval[1] <= 1
        check(low_high, "guidance_interval' must be [low, high] with 0 <= low <= high <= 1", self.guidance_interval)
        check(self.steps > 0, "steps' must be positive", self.steps)
        check(self.temperature > 0, "temperature' must be positive", self.temperature)
        check(self.top_k >= 0, "top_k' must be >= 0", self.top_k)
        check(0.0 < self.top_p <= 1.0, "top_p' must be in (0, 1]", self.top_p)


@dataclass
class SamplingOverrides:
    """Fields of a model's own `SamplingConfig` to replace (an evaluation's settings); None keeps the
    model's value, field by field."""

    guidance_scale: Optional[float] = None
    guidance_interval: Optional[list[float]] = None
    steps: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        SamplingConfig(**self.given())  # the same value checks

    def given(self) -> dict[str, float | int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def apply(self, own: SamplingConfig) -> SamplingConfig:
        return dataclasses.replace(own, **self.given())


_QUANTIZER_KEYS = ("fsq_levels", "codebook_size", "codebook_dim", "vq_decay", "commitment_weight", "entropy_weight")


@dataclass
class GridConfig:
    """Convolutional grid autoencoder (the KL / quantized baselines and the 1D tokenizer's latent space)."""

    RENAMED: ClassVar[dict[str, str]] = {"quantizer": "quantizer.kind",
                                         **{key: f"quantizer.{key}" for key in _QUANTIZER_KEYS}}

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
class LossConfig:
    l1: float = 1.0
    l2: float = 0.0
    lpips: float = 0.0
    lpips_weights: Optional[str] = None  # local path; never downloaded
    adversarial: float = 0.0
    adversarial_start: int = 2000


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    eval_every: int = 500
    # held-out images per forward pass at evaluation (and in sample grids): bounds its memory on one GPU
    eval_batch_size: int = 32
    checkpoint_every: int = 500
    log_every: int = 50
    grad_accumulation: int = 1  # micro-steps per optimizer step; batch_size is the global batch
    activation_checkpointing: bool = False  # recompute transformer / residual blocks in backward
    compile: bool = False  # torch.compile the training forward (pays off only on long runs: see RESULTS.md)
    device: str = "auto"  # auto | cpu | cuda (bf16 autocast on CUDA, fp32 on CPU)
    threads: int = 0  # torch threads per rank on CPU; 0 = the cores shared evenly by the local ranks

    def __post_init__(self):
        check(self.steps > 0, "steps' must be positive", self.steps)
        check(self.batch_size > 0, "batch_size' must be positive", self.batch_size)
        check(self.grad_accumulation > 0, "grad_accumulation' must be positive", self.grad_accumulation)
        check(0.0 <= self.ema_decay < 1.0, "ema_decay' must be in [0, 1)", self.ema_decay)
        check(len(self.betas) == 2, "betas' must have two values", self.betas)
        for key in ("eval_every", "eval_batch_size", "checkpoint_every", "log_every", "warmup_steps"):
            check(getattr(self, key) > 0, f"{key}' must be positive", getattr(self, key))


@dataclass
class DistributedConfig:
    """Multi-rank jobs (both trainers): how long a rank waits for the others."""

    # minutes any rank waits for other ranks' work (token-cache shards, the merged cache) and for a collective
    # (the process group's timeout) before it stops with one line naming what is missing. Hours, not minutes:
    # on several nodes each launcher ends only its own ranks, so this is what ends a job with a hung rank
    wait_timeout: float = 240.0

    def __post_init__(self):
        check(self.wait_timeout > 0, "wait_timeout' must be positive (minutes)", self.wait_timeout)


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
