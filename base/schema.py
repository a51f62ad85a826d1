"""Config sections every stage shares: data, sampling, training and multi-rank settings.

Each dataclass is the one home of its defaults. The families add their own sections (`grid.schema`,
`flextok.schema`, `priors.schema`, `evaluation.schema`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .config import check
from .tracking import tracker_names_problem

__all__ = ["DataConfig", "DistributedConfig", "MAX_DEPTH", "SamplingConfig", "SamplingOverrides",
           "TrainLoopConfig"]

# Sanity bound on model sizes, so a hostile or mistyped config cannot make a build loop (the total size of a
# loaded model is bounded too: `base.hub.MAX_MODEL_ELEMENTS`).
MAX_DEPTH = 1024  # blocks in one stack (transformer depth, residual blocks per level)


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
class SamplingConfig:
    """How anything that samples does it: the 1D tokenizer's decoder, the flow prior, the token prior.

    `guidance_scale` is classifier-free guidance (`base.guidance`): 1 = conditional, 0 = unconditional,
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


@dataclass
class TrainLoopConfig:
    """What both training loops share (`train`, `prior_train`); `base.training` runs them."""

    steps: int = 2000
    batch_size: int = 32  # global: split over the ranks and the accumulation micro-steps of an optimizer step
    grad_accumulation: int = 1  # micro-steps per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 500
    # held-out items per forward pass at evaluation (and in sample grids): bounds its memory on one GPU
    eval_batch_size: int = 32
    checkpoint_every: int = 500
    log_every: int = 50
    threads: int = 0  # torch threads per rank on CPU; 0 = the cores shared evenly by the local ranks
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])  # any of base.tracking.TRACKERS

    def __post_init__(self):
        check(self.steps > 0, "steps' must be positive", self.steps)
        check(self.batch_size > 0, "batch_size' must be positive", self.batch_size)
        check(self.grad_accumulation > 0, "grad_accumulation' must be positive", self.grad_accumulation)
        check(len(self.betas) == 2, "betas' must have two values", self.betas)
        check(self.warmup_steps >= 0, "warmup_steps' must be >= 0", self.warmup_steps)
        for key in ("eval_every", "eval_batch_size", "checkpoint_every", "log_every"):
            check(getattr(self, key) > 0, f"{key}' must be positive", getattr(self, key))
        problem = tracker_names_problem(self.trackers)
        check(problem is None, f"trackers': {problem}", self.trackers)


@dataclass
class DistributedConfig:
    """Multi-rank jobs (both trainers): how long a rank waits for the others."""

    # minutes any rank waits for other ranks' work (token-cache shards, the merged cache) and for a collective
    # (the process group's timeout) before it stops with one line naming what is missing. Hours, not minutes:
    # on several nodes each launcher ends only its own ranks, so this is what ends a job with a hung rank
    wait_timeout: float = 240.0

    def __post_init__(self):
        check(self.wait_timeout > 0, "wait_timeout' must be positive (minutes)", self.wait_timeout)
