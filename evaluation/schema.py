"""Config sections of the evaluation layer (`eval`), and `ExperimentConfig`: a whole experiment file,
every section of every layer, as the entry scripts load it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from base.config import check
from base.schema import SamplingOverrides
from priors.schema import PriorRunConfig

__all__ = ["EvalCodecConfig", "EvalConfig", "EvalEntry", "EvalPriorConfig", "EvalTokenizerConfig", "ExperimentConfig"]


@dataclass
class EvalEntry:
    """One saved model `evaluate.py` measures: a row label and where the model is."""

    name: str = ""  # row label and file-name part: letters, digits, . _ + -
    path: str = ""  # folder or hub id hf:owner/name

    def __post_init__(self):
        # entry names label rows and name files (samples_<name>.png), so they stay file-name safe
        safe = bool(self.name) and all(c.isalnum() or c in "._+-" for c in self.name)
        check(safe, "name' must be non-empty letters, digits, '.', '_', '+' or '-'", self.name)
        check(bool(self.path), "path' must be set", self.path)


@dataclass
class EvalTokenizerConfig(EvalEntry):
    """A tokenizer; its family (1d, token_set, grid_vq, grid_kl) is read from the model."""

    bpe: Optional[str] = None  # a bpe_image codec over its codes: rate from the post-BPE count, quality unchanged
    adaptive_psnr: Optional[float] = None  # 1D tokenizers: this entry's target instead of eval.adaptive_psnr


@dataclass
class EvalPriorConfig(EvalEntry):
    """A prior (held-out NLL, gFID, sampling speed)."""

    tokenizer: Optional[str] = None  # None = the tokenizer path stored in the prior's own config


@dataclass
class EvalCodecConfig:
    """The image codec (`codec`) against JPEG and WebP on whole held-out images (`evaluation.codec_rows`);
    off while `priors` is empty."""

    priors: list[str] = field(default_factory=list)  # names of eval.priors entries (discrete priors)
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])  # ordered 1D streams' prefix lengths
    target_psnrs: list[float] = field(default_factory=list)  # adaptive per-tile lengths (full-stream 1D priors)
    jpeg_qualities: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 40, 70, 90])
    webp_qualities: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40, 70, 90])
    images: Literal["held_out", "photos"] = "held_out"  # eval split's images as they are, or whole photographs
    num_images: int = 200  # at most this many of them (held_out: the first of eval.num_images)
    max_side: int = 256  # photos: resized (Lanczos) so that the long side is this many pixels

    def __post_init__(self):
        check(len(set(self.priors)) == len(self.priors), "priors' names must be unique", self.priors)
        check(all(k >= 1 for k in self.ks), "ks' must all be >= 1", self.ks)
        check(all(0 <= q <= 100 for q in self.jpeg_qualities + self.webp_qualities),
              "jpeg_qualities' and 'webp_qualities' must be in 0..100", self.jpeg_qualities + self.webp_qualities)
        check(not self.priors or self.jpeg_qualities, "jpeg_qualities' must not be empty (the lowest-rate target "
              "compares with JPEG's lowest quality)", self.jpeg_qualities)
        check(self.num_images >= 2, "num_images' must be at least 2 (FID needs a covariance)", self.num_images)
        check(self.max_side >= 16, "max_side' must be at least 16", self.max_side)


@dataclass
class EvalConfig:
    """`evaluate.py`: tokenizers and priors side by side; the report goes to runs/<name>/report/."""

    tokenizers: list[EvalTokenizerConfig] = field(default_factory=list)
    priors: list[EvalPriorConfig] = field(default_factory=list)
    num_images: int = 64  # held-out images (the first ones of data.eval_split): reconstruction metrics, prior NLL
    train_images: int = 2048  # seeded subset of data.train_split: the dataset classifier's data, the gFID reference
    fid_backbone: Literal["dataset_classifier", "inception"] = "dataset_classifier"
    inception_weights: Optional[str] = None  # None = $FLEXTOK_INCEPTION_WEIGHTS; never downloaded
    lpips_weights: Optional[str] = None  # None = $FLEXTOK_LPIPS_WEIGHTS; no weights: no LPIPS column
    classifier_steps: int = 500  # dataset classifier training steps (trained once, cached)
    # a saved dataset classifier (folder or hf:owner/name, e.g. from train_classifier.py) as the dataset-FID
    # backbone instead of training one here: the same weights for every rerun, wherever it runs
    fid_classifier: Optional[str] = None
    # dataset classifiers trained here with seeds seed, seed + 1, ...: every rFID and gFID is also computed under
    # the others, and reports give its spread over them (the first one's value stays the reported one)
    fid_seeds: int = 1
    adaptive_psnr: Optional[float] = 25.0  # 1D tokenizers' adaptive-length target in dB; null = no adaptive row
    # Replace fields of each model's own sampling settings (`flextok.sampling`, `prior.sampling`)
    decoder_sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    prior_sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    codec: EvalCodecConfig = field(default_factory=EvalCodecConfig)
    # a tokenizers entry every other one is compared with, paired over the same held-out images (an ablation)
    baseline: Optional[str] = None
    gfid_samples: int = 64
    batch_size: int = 32
    grid_rows: int = 8  # held-out images shown in reconstructions.png
    cache_dir: Optional[str] = None  # None = <out_dir>/eval_cache
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default (tiny models are faster on 1 on a busy machine)

    def __post_init__(self):
        for key in ("num_images", "train_images", "gfid_samples"):
            check(getattr(self, key) >= 2, f"{key}' must be at least 2 (FID needs a covariance)", getattr(self, key))
        check(self.threads >= 0, "threads' must be >= 0", self.threads)
        for key in ("classifier_steps", "batch_size", "grid_rows"):
            check(getattr(self, key) > 0, f"{key}' must be positive", getattr(self, key))
        for key, entries in (("tokenizers", self.tokenizers), ("priors", self.priors)):
            names = [e.name for e in entries]
            check(len(set(names)) == len(names), f"{key}' names must be unique", names)
        unknown = [name for name in self.codec.priors if name not in {p.name for p in self.priors}]
        check(not unknown, "codec.priors' must name eval.priors entries", unknown)
        check(self.fid_seeds >= 1, "fid_seeds' must be at least 1", self.fid_seeds)
        check(self.fid_seeds == 1 or (self.fid_backbone == "dataset_classifier" and not self.fid_classifier),
              "fid_seeds' > 1 needs classifiers trained here (fid_backbone: dataset_classifier, no fid_classifier)",
              self.fid_seeds)
        check(self.fid_classifier is None or self.fid_backbone == "dataset_classifier",
              "fid_classifier' needs fid_backbone: dataset_classifier", self.fid_classifier)
        check(self.baseline is None or self.baseline in {t.name for t in self.tokenizers if t.bpe is None},
              "baseline' must name an eval.tokenizers entry without bpe", self.baseline)


@dataclass
class ExperimentConfig(PriorRunConfig):
    """A whole experiment file: every section `train_tokenizer.py`, `train_prior.py` and `evaluate.py` read."""

    eval: EvalConfig = field(default_factory=EvalConfig)
