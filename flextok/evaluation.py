"""The engine behind `evaluate.py`: tokens and bits per image against PSNR, SSIM and rFID for every
tokenizer, and held-out NLL, gFID and sampling speed for every prior.

Every number is cached under a hash of what produced it: the checkpoint's fingerprint (its weights and
config, not its path), the held-out pixels, the token mode (k or adaptive target), the decoding or
sampling settings, and for FID the backbone's name. So adding a tokenizer computes only its rows, a
retrained checkpoint never reuses a stale number, and FIDs from two backbones never meet in one report.
One failing entry (unloadable checkpoint, wrong resolution, lossy codec) becomes an error record and
the others still run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from priors import DiscretePrior, FlowPrior, build_token_dataset, fingerprint_model, generate_images
from priors.token_dataset import TokenizerMismatch, fingerprint_files

from .cli import UserError
from .config import Config, DataConfig, EvalConfig, EvalPriorConfig, EvalTokenizerConfig
from .data import Batch, ImageDataset, collate, load_images, load_source, report_skipped, tensor_to_uint8
from .fid import FeatureExtractor, FeatureStats, InceptionV3Features, compute_feature_stats, fid_from_stats
from .fid import train_dataset_classifier
from .flextok_model import FlexTok
from .grid_autoencoder import GridAutoencoder
from .files import atomic_write
from .hub import load_model as load_hub_model
from .lpips import LPIPS, LPIPS_WEIGHTS_ENV
from .metrics import psnr, ssim
from .nested_dropout import powers_of_two_upto
from .training import pick_device

CACHE_VERSION = 1
SAMPLE_PREVIEW = 32  # samples kept per prior for its PNG grid


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


class ResultCache:
    """JSON records and uint8 image previews, each stored under a hash of the inputs that produced it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, inputs: dict[str, Any], suffix: str) -> Path:
        digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **inputs}, sort_keys=True).encode())
        return self.directory / f"{inputs['metric']}-{digest.hexdigest()[:32]}{suffix}"

    def record(self, inputs: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The stored record for `inputs`, else `compute()`'s, stored; and whether it was computed now."""
        path = self._path(inputs, ".json")
        if path.is_file():
            return json.loads(path.read_text())["value"], False
        value = compute()
        text = json.dumps({"inputs": inputs, "value": value}, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return value, True

    def images(self, inputs: dict[str, Any], compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Like `record` for images [N, 3, H, W] in [-1, 1], kept as uint8 (what a PNG shows anyway)."""
        path = self._path(inputs, ".npy")
        fresh = not path.is_file()
        if fresh:
            pixels = tensor_to_uint8(compute())
            atomic_write(path, lambda tmp: _save_npy(tmp, pixels))
        pixels = torch.from_numpy(np.load(path))
        return pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0), fresh


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save(path) would append '.npy' to the temporary name
        np.save(handle, array)


def tensor_digest(images: torch.Tensor) -> str:
    """Hash of a tensor's shape and values: the held-out set's identity, whatever source produced it."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_settings(data: DataConfig) -> dict[str, Any]:
    """Data settings that decide which images a split yields (worker count does not)."""
    return {k: v for k, v in dataclasses.asdict(data).items() if k != "num_workers"}


# ----------------------------------------------------------------------------------------------
# Shared state of one evaluation
# ----------------------------------------------------------------------------------------------


def load_subset(data: DataConfig, split: str, count: int, seed: int) -> Batch:
    """A seeded random subset of `split` (all of it when smaller); unlike the first `count` images it
    covers every class even when a source is sorted by class."""
    dataset = ImageDataset(load_source(data, split, seed), data.resolution, train=False)
    picks = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:count])
    batch = collate([dataset[int(i)] for i in picks])
    report_skipped(batch.skipped, f"{data.source} [{split}]")
    if batch.images.numel() == 0:
        raise UserError(f"data: {data.source} [{split}] yielded no usable image")
    return batch


class EvalContext:
    """What every row shares: settings, device, cache, held-out images, the FID backbone, loaded models."""

    def __init__(self, cfg: Config, progress: bool) -> None:
        if cfg.data.streaming:
            raise UserError("data.streaming: evaluation needs fixed, indexable splits; set data.streaming=false")
        self.cfg, self.settings, self.progress = cfg, cfg.eval, progress
        self.device = pick_device(cfg.eval.device)
        self.cache_root = Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else Path(cfg.out_dir) / "eval_cache"
        self.cache = ResultCache(self.cache_root / "results")
        self.held_out = load_images(cfg.data, cfg.data.eval_split, cfg.eval.num_images, cfg.seed)
        self.held_out_key = tensor_digest(self.held_out.images)
        # rows of reconstructions.png: spread over the held-out set, which may be ordered by source photo or class
        count = len(self.held_out.images)
        self.preview_index = torch.linspace(0, count - 1, min(cfg.eval.grid_rows, count)).round().long().unique()
        self.token_memo: dict[str, list[list[torch.Tensor]]] = {}  # BPE entries reuse their tokenizer's tokens
        self.backbone = self._build_backbone()
        self.lpips_weights = self.settings.lpips_weights or os.environ.get(LPIPS_WEIGHTS_ENV)
        self.lpips = self._load_lpips()
        self._models: dict[str, tuple[nn.Module, str]] = {}

    @cached_property
    def train_batch(self) -> Batch:
        return load_subset(self.cfg.data, self.cfg.data.train_split, self.settings.train_images, self.cfg.seed)

    @cached_property
    def held_out_stats(self) -> FeatureStats:
        """Backbone statistics of the held-out images: the real side of every rFID."""
        return compute_feature_stats(self.backbone, self.held_out.images.split(self.settings.batch_size))

    @cached_property
    def reference_stats(self) -> FeatureStats:
        """Backbone statistics of the training subset: the real side of every gFID (priors model that data)."""
        return compute_feature_stats(self.backbone, self.train_batch.images.split(self.settings.batch_size))

    @property
    def reference_key(self) -> dict[str, Any]:
        return {"data": data_settings(self.cfg.data), "split": self.cfg.data.train_split,
                "count": self.settings.train_images, "seed": self.cfg.seed}

    def _build_backbone(self) -> FeatureExtractor:
        if self.settings.fid_backbone == "inception":
            return InceptionV3Features(self.settings.inception_weights, device=self.device)
        images, labels = self.train_batch.images, self.train_batch.labels
        if labels.min() < 0 or len(labels.unique()) < 2:
            raise UserError(
                f"eval.fid_backbone: dataset_classifier needs at least two label classes in {self.cfg.data.source} "
                f"[{self.cfg.data.train_split}] (found {sorted(set(labels.tolist()))[:5]}); use inception"
            )
        extractor = train_dataset_classifier(
            images, labels, int(labels.max()) + 1, self.settings.classifier_steps, self.cfg.seed,
            self.cache_root / "fid", device=self.device, progress=self.progress,
        )
        # fid.py names the classifier after its training inputs, but CPU training also depends on the thread
        # count: name it after its weights too, so that FIDs of differently trained copies never share a name
        extractor.name = f"{extractor.name}:weights-{fingerprint_model(extractor.network)[:12]}"
        return extractor

    def _load_lpips(self) -> tuple[LPIPS, str] | None:
        """LPIPS and its weights' fingerprint, when local weights are configured (they are never downloaded)."""
        if not self.lpips_weights:
            return None
        model = LPIPS.from_pretrained(self.lpips_weights)
        return model.to(self.device), fingerprint_model(model)

    def backbone_info(self) -> dict[str, Any]:
        """Which backbone made every FID here, and how to read it (reports state it next to the numbers)."""
        info: dict[str, Any] = {"backbone": self.backbone.name, "kind": self.settings.fid_backbone}
        if self.settings.fid_backbone == "inception":
            info["note"] = "standard FID features (TF-ported Inception-v3 pool3 at 299x299)"
            return info
        labels = self.train_batch.labels
        info["note"] = ("dataset FID: features of a small classifier trained on this dataset's labels; comparable "
                        "only with FIDs from this same backbone, never with Inception FID")
        info["classifier"] = {"train_images": len(labels), "classes": int(labels.max()) + 1,
                              "steps": self.settings.classifier_steps}
        return info

    def model(self, path: str) -> tuple[nn.Module, str]:
        """A saved model on the device, loaded once per path, with its fingerprint taken as loaded."""
        if path not in self._models:
            model = load_hub_model(path)
            self._models[path] = (model, fingerprint_model(model))
            model.to(self.device)
        return self._models[path]


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """Which tokens of each image a row keeps: the first k (1D), an adaptive length, or all of them."""

    k: int | None = None
    target_psnr: float | None = None

    @property
    def label(self) -> str:
        if self.target_psnr is not None:
            return f"adaptive@{self.target_psnr:g}dB"
        return "all" if self.k is None else f"k={self.k}"


def open_codec(path: str) -> tuple[Any, str]:
    """A saved bpe_image codec and the hash of its files."""
    from bpe_image import BPECodec

    try:
        return BPECodec.from_pretrained(path), fingerprint_files(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"bpe codec {path}: {err}") from None


def base_family(model: nn.Module) -> str:
    if isinstance(model, FlexTok):
        return "token_set" if model.token_set else "1d"
    if isinstance(model, GridAutoencoder):
        return "grid_vq" if model.is_quantized else "grid_kl"
    raise UserError(f"holds a '{getattr(model, 'model_type', type(model).__name__)}' model, not a tokenizer")


def flextok_decoding(model: FlexTok, settings: EvalConfig) -> dict[str, Any]:
    """The decoder steps and guidance used: eval's settings where given, else the tokenizer's own."""
    steps = settings.decoder_steps or model.config.sample_steps
    return {"steps": steps, "guidance": model.config.guidance if settings.guidance is None else settings.guidance}


def check_resolution(model: nn.Module, data: DataConfig, what: str = "tokenizer") -> None:
    if model.resolution != data.resolution:
        raise UserError(f"{what} has resolution {model.resolution}, but data.resolution is {data.resolution}")


@dataclass
class TokenizerUnderTest:
    """A loaded tokenizer entry: the model, its identity, family and optional BPE codec."""

    entry: EvalTokenizerConfig
    model: nn.Module
    fingerprint: str
    settings: EvalConfig
    seed: int
    codec: Any = None
    codec_fingerprint: str | None = None

    @property
    def family(self) -> str:
        return base_family(self.model) + ("+bpe" if self.codec is not None else "")

    @property
    def decoder(self) -> dict[str, Any]:
        """FlexTok decoding settings (its noise also depends on the seed and batch); none for grid decoders."""
        if not isinstance(self.model, FlexTok):
            return {}
        batch_size = self.settings.batch_size
        return {**flextok_decoding(self.model, self.settings), "seed": self.seed, "batch_size": batch_size}

    def modes(self) -> list[Mode]:
        if base_family(self.model) != "1d":
            return [Mode()]
        modes = [Mode(k=k) for k in powers_of_two_upto(self.model.num_registers)]
        target = self.settings.adaptive_psnr if self.entry.adaptive_psnr is None else self.entry.adaptive_psnr
        return modes + ([Mode(target_psnr=target)] if target is not None else [])

    def tokenize(self, images: torch.Tensor, mode: Mode, seed: int) -> list[torch.Tensor]:
        if not isinstance(self.model, FlexTok):
            return self.model.tokenize(images)
        return self.model.tokenize(images, k=mode.k, target_psnr=mode.target_psnr, steps=self.decoder["steps"],
                                   guidance=self.decoder["guidance"], seed=seed)

    def detokenize(self, tokens: list[torch.Tensor], seed: int) -> torch.Tensor:
        if not isinstance(self.model, FlexTok):
            return self.model.detokenize(tokens)
        return self.model.detokenize(tokens, steps=self.decoder["steps"], guidance=self.decoder["guidance"], seed=seed)

    def describe(self, mode: Mode) -> dict[str, Any]:
        """The row's fixed columns: what was measured and how bits are counted."""
        if self.codec is not None:
            vocab, basis = self.codec.vocab_size, "post-BPE tokens x log2(BPE vocab)"
        elif self.model.vocab_size:
            vocab, basis = self.model.vocab_size, "tokens x log2(vocab)"
        else:
            vocab, basis = None, "latent elements x 16 bits (float16 KL latents)"
        decoder = self.decoder
        return {
            "name": self.entry.name, "family": self.family, "path": self.entry.path, "bpe": self.entry.bpe,
            "mode": mode.label, "k": mode.k, "target_psnr": mode.target_psnr, "vocab_size": vocab,
            "bits_basis": basis, "decoder_steps": decoder.get("steps"), "decoder_guidance": decoder.get("guidance"),
        }


def open_tokenizer(entry: EvalTokenizerConfig, ctx: EvalContext) -> TokenizerUnderTest:
    """Load and check an entry; every failure says what is wrong, and the caller names the entry."""
    model, fingerprint = ctx.model(entry.path)
    base_family(model)
    check_resolution(model, ctx.cfg.data)
    tut = TokenizerUnderTest(entry, model, fingerprint, ctx.settings, ctx.cfg.seed)
    if entry.bpe is None:
        return tut
    if not model.vocab_size:
        raise UserError(f"bpe {entry.bpe}: BPE needs integer codes, but this is a KL tokenizer (continuous latents)")
    tut.codec, tut.codec_fingerprint = open_codec(entry.bpe)
    if tut.codec.codebook_size != model.vocab_size:
        raise UserError(f"bpe {entry.bpe}: codec is for {tut.codec.codebook_size} codes, the tokenizer has "
                        f"{model.vocab_size}")
    return tut


class Reconstruction:
    """Held-out tokens and decodings of one (tokenizer, mode), each computed on first use only, so a row
    whose metrics are all cached never runs the tokenizer.

    Batch b is tokenized and decoded with seed + b and the same batch composition: FlexTok's adaptive
    length is chosen with exactly the noise its final decoding then uses."""

    def __init__(self, tut: TokenizerUnderTest, mode: Mode, ctx: EvalContext, identity: dict[str, Any]) -> None:
        self.tut, self.mode, self.ctx = tut, mode, ctx
        self.memo_key = json.dumps(identity, sort_keys=True)

    @cached_property
    def tokens(self) -> list[list[torch.Tensor]]:
        """Per batch, the tokens of each image; shared within a run by entries with the same tokenizer."""
        if self.memo_key not in self.ctx.token_memo:
            batches, seed = self.ctx.held_out.images.split(self.ctx.settings.batch_size), self.ctx.cfg.seed
            self.ctx.token_memo[self.memo_key] = [self.tut.tokenize(images.to(self.ctx.device), self.mode, seed + b)
                                                  for b, images in enumerate(batches)]
        return self.ctx.token_memo[self.memo_key]

    @cached_property
    def images(self) -> torch.Tensor:
        return torch.cat([self.tut.detokenize(tokens, self.ctx.cfg.seed + b).float().cpu()
                          for b, tokens in enumerate(self.tokens)])


def rate_record(tut: TokenizerUnderTest, batches: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Tokens and bits per image; BPE counts come from encoding the codes, checked to decode back exactly."""
    sequences = [t for batch in batches for t in batch]
    if tut.codec is None:
        counts, bits_per_token = np.array([len(t) for t in sequences]), float(tut.model.bits_per_token)
    else:
        counts, bits_per_token = bpe_counts(tut, sequences), math.log2(tut.codec.vocab_size)
    return {
        "tokens_per_image": float(counts.mean()), "tokens_min": int(counts.min()), "tokens_max": int(counts.max()),
        "bits_per_token": bits_per_token, "bits_per_image": float(counts.mean() * bits_per_token),
    }


def bpe_counts(tut: TokenizerUnderTest, sequences: list[torch.Tensor]) -> np.ndarray:
    codes = [t.cpu().numpy() for t in sequences]
    if tut.codec.mode == "2d":
        codes = [c.reshape(tut.codec.grid_shape) for c in codes]
    ids = tut.codec.encode_batch(codes)
    for i, (original, decoded) in enumerate(zip(codes, tut.codec.decode_batch(ids))):
        if not np.array_equal(np.asarray(decoded), original):
            raise ValueError(f"bpe {tut.entry.bpe}: held-out image {i} does not decode back to its codes (lossy)")
    return np.array([len(i) for i in ids])


def quality_record(metric: Callable, name: str, rec: Reconstruction, originals: torch.Tensor) -> dict[str, Any]:
    values = metric(rec.images, originals)
    record = {name: values.mean().item()}
    if name == "psnr" and rec.mode.target_psnr is not None:  # how often the adaptive target was reached
        record["target_met"] = (values >= rec.mode.target_psnr).float().mean().item()
    return record


@torch.no_grad()
def lpips_record(rec: Reconstruction, ctx: EvalContext) -> dict[str, Any]:
    model, bs = ctx.lpips[0], ctx.settings.batch_size
    pairs = zip(rec.images.split(bs), ctx.held_out.images.split(bs))
    distances = [model(x.to(ctx.device), y.to(ctx.device)).cpu() for x, y in pairs]
    return {"lpips": torch.cat(distances).mean().item()}


def rfid_record(rec: Reconstruction, ctx: EvalContext, batch_size: int) -> dict[str, Any]:
    fake = compute_feature_stats(ctx.backbone, rec.images.split(batch_size))
    result = fid_from_stats(ctx.held_out_stats, fake)
    return {"rfid": result.value, "rfid_backbone": result.backbone, "rfid_num_real": result.num_real,
            "rfid_num_fake": result.num_fake}


def evaluate_mode(tut: TokenizerUnderTest, mode: Mode, ctx: EvalContext) -> tuple[dict[str, Any], torch.Tensor]:
    """One report row (metrics from cache where present) and the reconstructions for the image grid."""
    originals, bs = ctx.held_out.images, ctx.settings.batch_size
    base = {"tokenizer": tut.fingerprint, "mode": dataclasses.asdict(mode), "held_out": ctx.held_out_key,
            "decoder": tut.decoder}
    rec = Reconstruction(tut, mode, ctx, base)
    jobs: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = {
        "rate": ({"bpe": tut.codec_fingerprint}, lambda: rate_record(tut, rec.tokens)),
        "psnr": ({}, lambda: quality_record(psnr, "psnr", rec, originals)),
        "ssim": ({}, lambda: quality_record(ssim, "ssim", rec, originals)),
        "rfid": ({"backbone": ctx.backbone.name}, lambda: rfid_record(rec, ctx, bs)),
    }
    if ctx.lpips is not None:
        jobs["lpips"] = ({"lpips_weights": ctx.lpips[1]}, lambda: lpips_record(rec, ctx))
    row, computed = {**tut.describe(mode), "lpips": None}, []
    for metric, (extra, compute) in jobs.items():
        value, fresh = ctx.cache.record({**base, **extra, "metric": metric}, compute)
        row.update(value)
        computed += [metric] if fresh else []
    index = ctx.preview_index
    preview, fresh = ctx.cache.images({**base, "metric": "preview", "rows": index.tolist()}, lambda: rec.images[index])
    row["computed"] = computed + (["preview"] if fresh else [])
    return row, preview


# ----------------------------------------------------------------------------------------------
# Priors
# ----------------------------------------------------------------------------------------------


@dataclass
class PriorUnderTest:
    """A loaded prior with the tokenizer (and BPE codec) its tokens belong to."""

    entry: EvalPriorConfig
    prior: DiscretePrior | FlowPrior
    fingerprint: str
    tokenizer_path: str
    tokenizer: nn.Module
    tokenizer_fingerprint: str
    codec: Any = None
    codec_fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return self.prior.config.num_classes

    def sampler(self, settings: EvalConfig, seed: int) -> dict[str, Any]:
        """Every setting a gFID depends on, stated next to it in the report."""
        classes = self.num_classes
        out: dict[str, Any] = {
            "samples": settings.gfid_samples, "seed": seed, "batch_size": settings.batch_size,
            "labels": f"classes 0..{classes - 1} in turn" if classes else "unconditional",
            "cfg_scale": settings.cfg_scale if classes else None,
        }
        if isinstance(self.prior, FlowPrior):
            out["flow_steps"] = settings.flow_steps
        else:
            out.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        if isinstance(self.tokenizer, FlexTok):
            decoding = flextok_decoding(self.tokenizer, settings)
            out.update(decoder_steps=decoding["steps"], decoder_guidance=decoding["guidance"])
        return out


def open_prior(entry: EvalPriorConfig, ctx: EvalContext) -> PriorUnderTest:
    prior, fingerprint = ctx.model(entry.path)
    if not isinstance(prior, (DiscretePrior, FlowPrior)):
        raise UserError(f"holds a '{getattr(prior, 'model_type', type(prior).__name__)}' model, not a prior")
    tokenizer_path = entry.tokenizer or prior.config.tokenizer
    if not tokenizer_path:
        raise UserError("the prior's config names no tokenizer: set 'tokenizer' in this eval.priors entry")
    tokenizer, tokenizer_fingerprint = ctx.model(tokenizer_path)
    base_family(tokenizer)
    check_resolution(tokenizer, ctx.cfg.data, f"its tokenizer {tokenizer_path}")
    if prior.tokenizer_hash and prior.tokenizer_hash != tokenizer_fingerprint:
        raise TokenizerMismatch(f"trained on tokens of tokenizer {prior.tokenizer_hash[:12]}, but {tokenizer_path} "
                                f"is tokenizer {tokenizer_fingerprint[:12]}")
    put = PriorUnderTest(entry, prior, fingerprint, tokenizer_path, tokenizer, tokenizer_fingerprint)
    if prior.config.tokens == "bpe":
        put.codec, put.codec_fingerprint = open_codec(prior.config.bpe)
    return put


@torch.no_grad()
def nll_record(put: PriorUnderTest, ctx: EvalContext) -> dict[str, Any]:
    """Held-out bits per image under the null condition (held-out images may belong to unseen classes).

    A flow prior has no discrete likelihood: its fixed-noise validation loss is reported instead."""
    data = build_token_dataset(put.tokenizer, put.prior.config, ctx.cfg.data, ctx.cfg.data.eval_split,
                               ctx.cache_root / "tokens", limit=ctx.settings.num_images, seed=ctx.cfg.seed,
                               device=ctx.device, progress=False)
    flow = isinstance(put.prior, FlowPrior)
    values = []
    for start in range(0, len(data), ctx.settings.batch_size):
        batch = data.batch(np.arange(start, min(start + ctx.settings.batch_size, len(data))))
        inputs = {k: v.to(ctx.device) for k, v in batch.items() if k != "labels"}
        if flow:
            values.append(put.prior.validation_loss(**inputs, seed=ctx.cfg.seed))
        else:
            values.append(put.prior.nll_bits(**inputs))
    mean = torch.cat(values).mean().item()
    return {"nll_bits_per_image": None if flow else mean, "flow_val_loss": mean if flow else None,
            "nll_images": len(data), "tokens_per_image": float(data.lengths.mean())}


class Sampling:
    """The gFID samples of one prior, generated on first use, with the time generation took."""

    def __init__(self, put: PriorUnderTest, ctx: EvalContext) -> None:
        self.put, self.ctx = put, ctx
        n, classes = ctx.settings.gfid_samples, put.num_classes
        self.labels = torch.arange(n) % classes if classes else None

    @cached_property
    def run(self) -> tuple[torch.Tensor, float]:
        s, put, seed = self.ctx.settings, self.put, self.ctx.cfg.seed
        chunks = []
        started = time.perf_counter()
        for b, start in enumerate(range(0, s.gfid_samples, s.batch_size)):
            count = min(s.batch_size, s.gfid_samples - start)
            labels = None if self.labels is None else self.labels[start : start + count]
            flextok = isinstance(put.tokenizer, FlexTok)
            decode = {**flextok_decoding(put.tokenizer, s), "seed": seed + b} if flextok else None
            chunks.append(generate_images(
                put.prior, put.tokenizer, labels, num_samples=count, temperature=s.temperature, top_k=s.top_k,
                top_p=s.top_p, cfg_scale=s.cfg_scale, steps=s.flow_steps, seed=seed + b, codec=put.codec,
                decode_kwargs=decode,
            ))
        return torch.cat(chunks).float(), time.perf_counter() - started

    def record(self) -> dict[str, Any]:
        images, seconds = self.run
        fake = compute_feature_stats(self.ctx.backbone, images.split(self.ctx.settings.batch_size))
        result = fid_from_stats(self.ctx.reference_stats, fake)
        return {"gfid": result.value, "gfid_backbone": result.backbone, "gfid_num_real": result.num_real,
                "gfid_num_fake": result.num_fake, "sampling_seconds": seconds,
                "sampling_images_per_s": len(images) / seconds}


def evaluate_prior(entry: EvalPriorConfig,
                   ctx: EvalContext) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]:
    """One prior row, plus a preview of its samples and their labels."""
    put = open_prior(entry, ctx)
    sampler = put.sampler(ctx.settings, ctx.cfg.seed)
    base = {"prior": put.fingerprint, "tokenizer": put.tokenizer_fingerprint, "bpe": put.codec_fingerprint}
    sampling = Sampling(put, ctx)
    gfid_inputs = {**base, "sampler": sampler, "backbone": ctx.backbone.name, "reference": ctx.reference_key,
                   "timed_on": {"device": str(ctx.device), "threads": torch.get_num_threads()}}  # images/s is measured
    row: dict[str, Any] = {
        "name": entry.name, "path": entry.path, "kind": put.prior.config.kind, "tokens": put.prior.config.tokens,
        "tokenizer": put.tokenizer_path, "tokenizer_family": base_family(put.tokenizer), "bpe": put.prior.config.bpe,
        "num_classes": put.num_classes, "sampler": sampler,
    }
    nll, nll_fresh = ctx.cache.record({**base, "metric": "nll", "held_out": ctx.held_out_key,
                                       "data": data_settings(ctx.cfg.data)}, lambda: nll_record(put, ctx))
    gfid, gfid_fresh = ctx.cache.record({**gfid_inputs, "metric": "gfid"}, sampling.record)
    count = min(SAMPLE_PREVIEW, ctx.settings.gfid_samples)
    preview, preview_fresh = ctx.cache.images({**gfid_inputs, "metric": "samples", "count": count},
                                              lambda: sampling.run[0][:count])
    fresh = {"nll": nll_fresh, "gfid": gfid_fresh, "samples": preview_fresh}
    row.update(nll, **gfid, computed=[name for name, was_fresh in fresh.items() if was_fresh])
    labels = None if sampling.labels is None else sampling.labels[:count]
    return row, preview, labels


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """Everything a report shows: rows, errors, shared settings, and the images of its PNG grids."""

    meta: dict[str, Any]
    originals: torch.Tensor  # the held-out images shown in reconstructions.png
    tokenizer_rows: list[dict[str, Any]] = field(default_factory=list)
    prior_rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    previews: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (tokenizer, mode) -> images
    samples: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)  # prior -> images

    def fail(self, kind: str, entry: EvalTokenizerConfig | EvalPriorConfig, err: Exception,
             mode: str | None = None) -> None:
        """Record one failed entry (or row) by name and path, and say so right away."""
        message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        self.errors.append({"kind": kind, "name": entry.name, "path": entry.path, "mode": mode, "error": message})
        where = f"{kind} '{entry.name}' ({entry.path}{', ' + mode if mode else ''})"
        tqdm.write(f"error: {where}: {message}", file=sys.stderr)


def describe_run(cfg: Config, ctx: EvalContext) -> dict[str, Any]:
    settings = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in ("tokenizers", "priors")}
    return {
        "name": cfg.name, "seed": cfg.seed, "device": str(ctx.device), "torch_threads": torch.get_num_threads(),
        "data": {"source": cfg.data.source, "resolution": cfg.data.resolution, "eval_split": cfg.data.eval_split,
                 "train_split": cfg.data.train_split, "held_out_images": len(ctx.held_out.images)},
        "fid": ctx.backbone_info(), "settings": settings,
        "lpips": None if ctx.lpips is None else {"weights": ctx.lpips_weights, "fingerprint": ctx.lpips[1]},
    }


def run_evaluation(cfg: Config, progress: bool = True) -> EvaluationResult:
    """Measure every configured tokenizer and prior; failures become error records, never a crash."""
    if not cfg.eval.tokenizers and not cfg.eval.priors:
        raise UserError("eval: list at least one entry under eval.tokenizers or eval.priors")
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    torch.manual_seed(cfg.seed)
    ctx = EvalContext(cfg, progress)
    result = EvaluationResult(describe_run(cfg, ctx), ctx.held_out.images[ctx.preview_index])
    opened = []
    for entry in cfg.eval.tokenizers:
        try:
            opened.append(open_tokenizer(entry, ctx))
        except Exception as err:  # noqa: BLE001 - any failure of one entry is reported, the rest still run
            result.fail("tokenizer", entry, err)
    total = sum(len(tut.modes()) for tut in opened) + len(cfg.eval.priors)
    with tqdm(total=total, desc="evaluate", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for tut in opened:
            for mode in tut.modes():
                bar.set_postfix_str(f"{tut.entry.name} {mode.label}")
                try:
                    row, preview = evaluate_mode(tut, mode, ctx)
                    result.tokenizer_rows.append(row)
                    result.previews[(tut.entry.name, mode.label)] = preview
                except Exception as err:  # noqa: BLE001
                    result.fail("tokenizer", tut.entry, err, mode.label)
                bar.update()
        for entry in cfg.eval.priors:
            bar.set_postfix_str(f"prior {entry.name}")
            try:
                row, samples, labels = evaluate_prior(entry, ctx)
                result.prior_rows.append(row)
                result.samples[entry.name] = (samples, labels)
            except Exception as err:  # noqa: BLE001
                result.fail("prior", entry, err)
            bar.update()
    return result
