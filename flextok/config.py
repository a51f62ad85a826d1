"""Typed experiment configs: YAML files load into these dataclasses, the single home of defaults.

One YAML file describes one experiment. Each entry script reads the sections it needs
(`train_tokenizer.py`: data, tokenizer, grid/flextok, train; `train_prior.py`: data, prior, prior_train;
`evaluate.py`: eval). A file may extend another with `base: other.yaml` (relative to the file).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .files import atomic_write


class ConfigError(ValueError):
    """A config problem a user must fix; entry scripts print it as one line and exit with code 2."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


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
    num_workers: int = 0
    # builtin:skimage only: crops per training photograph and per held-out photograph
    crops_per_photo: int = 256
    eval_crops_per_photo: int = 32
    # images used for held-out metrics during training and in evaluation
    eval_images: int = 64

    def __post_init__(self):
        _check(self.resolution >= 8, "resolution' must be at least 8", self.resolution)


@dataclass
class GridConfig:
    """Convolutional grid autoencoder (the KL / quantized baselines and the 1D tokenizer's latent space)."""

    downsample: int = 4  # f in {4, 8, 16}
    latent_channels: int = 4
    channels: int = 64
    num_res_blocks: int = 1
    bottleneck: Literal["kl", "quantized"] = "kl"
    kl_weight: float = 1e-6
    quantizer: Literal["vq", "fsq", "lfq"] = "fsq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    codebook_size: int = 1024  # vq and lfq (lfq: a power of two)
    codebook_dim: int = 8  # vq: the code vectors' size (a linear map connects it to latent_channels)
    vq_decay: float = 0.99
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1  # lfq

    def __post_init__(self):
        _check(self.downsample in (4, 8, 16), "downsample' must be 4, 8 or 16", self.downsample)
        _check(self.latent_channels > 0, "latent_channels' must be positive", self.latent_channels)
        _check(self.codebook_size > 1, "codebook_size' must be > 1", self.codebook_size)
        _check(self.quantizer != "lfq" or self.codebook_size & (self.codebook_size - 1) == 0,
               "codebook_size' must be a power of two for lfq", self.codebook_size)


@dataclass
class FlexTokConfig:
    """FlexTok-style 1D tokenizer: register encoder, quantizer, nested dropout, generative decoder."""

    input: Literal["latents", "pixels"] = "latents"
    autoencoder: Optional[str] = None  # path or hub id of a grid KL autoencoder (input: latents)
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
    quantizer: Literal["fsq", "vq", "lfq"] = "fsq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    codebook_size: int = 1024  # vq and lfq
    codebook_dim: int = 8  # vq
    commitment_weight: float = 0.25
    nested_dropout: Literal["uniform", "pow2", "uniform_pow2"] = "pow2"
    token_set: bool = False
    decoder: Literal["rectified_flow", "diffusion"] = "rectified_flow"
    prediction: Literal["v", "eps"] = "v"  # diffusion decoder
    time_logit_mean: float = 0.0  # rectified flow: t = sigmoid(N(mean, 1)); > 0 favours noisier t
    cond_dropout: float = 0.1  # null-condition probability, for classifier-free guidance
    sample_steps: int = 8
    guidance: float = 1.0

    def __post_init__(self):
        _check(self.num_registers > 0, "num_registers' must be positive", self.num_registers)
        _check(self.mlp_ratio > 0, "mlp_ratio' must be positive", self.mlp_ratio)
        _check(self.patch_size > 0, "patch_size' must be positive", self.patch_size)
        for width, heads in (("dim", "heads"), ("decoder_dim", "decoder_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            _check(w % 4 == 0 and h > 0 and w % h == 0, f"{width}' must be divisible by 4 and by {heads}", w)
        _check(self.quantizer != "lfq" or self.codebook_size & (self.codebook_size - 1) == 0,
               "codebook_size' must be a power of two for lfq", self.codebook_size)
        _check(0.0 <= self.cond_dropout < 1.0, "cond_dropout' must be in [0, 1)", self.cond_dropout)


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
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch threads on CPU; 0 = torch's default

    def __post_init__(self):
        _check(self.steps > 0, "steps' must be positive", self.steps)
        _check(self.batch_size > 0, "batch_size' must be positive", self.batch_size)
        _check(0.0 <= self.ema_decay < 1.0, "ema_decay' must be in [0, 1)", self.ema_decay)
        _check(len(self.betas) == 2, "betas' must have two values", self.betas)
        for key in ("eval_every", "checkpoint_every", "log_every", "warmup_steps"):
            _check(getattr(self, key) > 0, f"{key}' must be positive", getattr(self, key))


@dataclass
class PriorConfig:
    """Decoder-only prior over a tokenizer's token stream (or a flow prior over KL latents)."""

    tokenizer: Optional[str] = None  # path of the tokenizer the tokens come from
    kind: Literal["discrete", "flow"] = "discrete"
    tokens: Literal["full", "prefix", "adaptive", "bpe"] = "full"
    prefix_length: int = 0  # tokens: prefix
    target_psnr: float = 30.0  # tokens: adaptive, the per-image reconstruction PSNR that sets its length
    bpe: Optional[str] = None  # tokens: bpe, path of a bpe_image codec
    cache_dir: Optional[str] = None  # token caches; None = <out_dir>/token_cache
    tokenize_batch_size: int = 64
    dim: int = 256
    depth: int = 6
    heads: int = 4
    num_classes: int = 0  # 0 = unconditional
    class_dropout: float = 0.1
    dropout: float = 0.0

    def __post_init__(self):
        _check(self.dim % max(self.heads, 1) == 0 and self.heads > 0, "heads' must divide dim", self.heads)
        _check(self.depth > 0, "depth' must be positive", self.depth)
        _check(self.num_classes >= 0, "num_classes' must be >= 0", self.num_classes)
        _check(0.0 <= self.class_dropout < 1.0, "class_dropout' must be in [0, 1)", self.class_dropout)
        _check(0.0 <= self.dropout < 1.0, "dropout' must be in [0, 1)", self.dropout)
        _check(self.tokenize_batch_size > 0, "tokenize_batch_size' must be positive", self.tokenize_batch_size)
        _check(self.tokens != "prefix" or self.prefix_length > 0, "prefix_length' must be > 0 for tokens: prefix",
               self.prefix_length)
        _check(self.tokens != "bpe" or bool(self.bpe), "bpe' must name a bpe_image codec for tokens: bpe", self.bpe)
        _check(self.kind != "flow" or self.tokens == "full", "tokens' must be full for kind: flow", self.tokens)


@dataclass
class PriorTrainConfig:
    run_name: Optional[str] = None  # run folder under out_dir; None = the top-level name
    steps: int = 2000
    micro_batch_size: int = 16  # per rank
    grad_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05  # on matrices and embeddings; never on norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    grad_clip: float = 1.0
    zero_stage: int = 0
    eval_every: int = 500
    sample_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 50
    num_samples: int = 16  # images in each periodic sample grid
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    cfg_scale: float = 1.0  # 0 = unconditional, 1 = conditional, >1 = guided
    sample_steps: int = 25  # Euler steps of the flow prior
    threads: int = 0  # torch threads per rank on CPU; 0 = cores / local ranks

    def __post_init__(self):
        _check(self.steps > 0, "steps' must be positive", self.steps)
        _check(self.micro_batch_size > 0, "micro_batch_size' must be positive", self.micro_batch_size)
        _check(self.grad_accumulation > 0, "grad_accumulation' must be positive", self.grad_accumulation)
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage' must be 0, 1, 2 or 3", self.zero_stage)
        _check(len(self.betas) == 2, "betas' must have two values", self.betas)
        for key in ("eval_every", "sample_every", "checkpoint_every", "log_every", "sample_steps"):
            _check(getattr(self, key) > 0, f"{key}' must be positive", getattr(self, key))
        _check(self.temperature > 0, "temperature' must be positive", self.temperature)
        _check(self.top_k >= 0, "top_k' must be >= 0", self.top_k)
        _check(0.0 < self.top_p <= 1.0, "top_p' must be in (0, 1]", self.top_p)
        _check(self.cfg_scale >= 0, "cfg_scale' must be >= 0", self.cfg_scale)
        _check(self.num_samples >= 0, "num_samples' must be >= 0", self.num_samples)


@dataclass
class EvalTokenizerConfig:
    """One tokenizer `evaluate.py` measures; its family (1d, token_set, grid_vq, grid_kl) is read from the model."""

    name: str = ""  # row label and file-name part: letters, digits, . _ + -
    path: str = ""  # folder or hub id of a saved tokenizer
    bpe: Optional[str] = None  # a bpe_image codec over its codes: rate from the post-BPE count, quality unchanged
    adaptive_psnr: Optional[float] = None  # 1D tokenizers: this entry's target instead of eval.adaptive_psnr

    def __post_init__(self):
        _check(_is_entry_name(self.name), "name' must be non-empty letters, digits, '.', '_', '+' or '-'", self.name)
        _check(bool(self.path), "path' must be set", self.path)


@dataclass
class EvalPriorConfig:
    """One prior `evaluate.py` measures (held-out NLL, gFID, sampling speed)."""

    name: str = ""
    path: str = ""
    tokenizer: Optional[str] = None  # None = the tokenizer path stored in the prior's own config

    def __post_init__(self):
        _check(_is_entry_name(self.name), "name' must be non-empty letters, digits, '.', '_', '+' or '-'", self.name)
        _check(bool(self.path), "path' must be set", self.path)


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
    adaptive_psnr: Optional[float] = 25.0  # 1D tokenizers' adaptive-length target in dB; null = no adaptive row
    decoder_steps: Optional[int] = None  # FlexTok decoding steps; None = each tokenizer's own sample_steps
    guidance: Optional[float] = None  # FlexTok decoder CFG; None = the tokenizer's own, which adaptive length uses
    gfid_samples: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0  # priors with classes: 0 = unconditional, 1 = conditional, >1 = guided
    flow_steps: int = 25  # Euler steps of flow priors
    batch_size: int = 32
    grid_rows: int = 8  # held-out images shown in reconstructions.png
    cache_dir: Optional[str] = None  # None = <out_dir>/eval_cache
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = torch's default (tiny models are faster on 1 on a busy machine)

    def __post_init__(self):
        for key in ("num_images", "train_images", "gfid_samples"):
            _check(getattr(self, key) >= 2, f"{key}' must be at least 2 (FID needs a covariance)", getattr(self, key))
        _check(self.threads >= 0, "threads' must be >= 0", self.threads)
        for key in ("classifier_steps", "flow_steps", "batch_size", "grid_rows"):
            _check(getattr(self, key) > 0, f"{key}' must be positive", getattr(self, key))
        _check(self.decoder_steps is None or self.decoder_steps > 0, "decoder_steps' must be positive",
               self.decoder_steps)
        _check(self.temperature > 0, "temperature' must be positive", self.temperature)
        _check(self.top_k >= 0, "top_k' must be >= 0", self.top_k)
        _check(0.0 < self.top_p <= 1.0, "top_p' must be in (0, 1]", self.top_p)
        _check(self.cfg_scale >= 0, "cfg_scale' must be >= 0", self.cfg_scale)
        for key, entries in (("tokenizers", self.tokenizers), ("priors", self.priors)):
            names = [e.name for e in entries]
            _check(len(set(names)) == len(names), f"{key}' names must be unique", names)


def _is_entry_name(name: str) -> bool:
    """Entry names label rows and name files (samples_<name>.png), so they stay file-name safe."""
    return bool(name) and all(c.isalnum() or c in "._+-" for c in name)


@dataclass
class Config:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    tokenizer: Literal["grid", "flextok"] = "grid"
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    flextok: FlexTokConfig = field(default_factory=FlexTokConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    prior_train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _check(ok: bool, message: str, value: Any) -> None:
    """Value checks in sections; `message` starts with the key name and its closing quote."""
    if not ok:
        raise ConfigError(f"{message}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = Config):
    """Load `path` (following `base:` chains), apply `section.key=value` overrides, validate into `cls`."""
    raw: dict[str, Any] = _read_with_bases(Path(path), seen=()) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(cls, raw, source)


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", prefix: str = ""):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrongly typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, source, dotted)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by a section's value checks, which don't know the file
        raise ConfigError(f"{source}: '{prefix}{err}") from None


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config (every default filled in) so a run can be reproduced from its folder."""
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))



def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_with_bases(path.parent / base, seen + (path.resolve(),))
    return _deep_merge(parent, raw)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override '{dotted}': cannot parse value '{text}'") from None


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(inner, v, f"{source}", f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp} for '{key}'")
