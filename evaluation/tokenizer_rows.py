"""Tokenizer rows: for every tokenizer entry and token mode (1D: every k = 1, 2, 4, ..., R and the
adaptive length; grid: all codes), tokens and bits per image against held-out PSNR, SSIM, rFID and LPIPS."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from base.errors import UserError
from base.metrics import psnr, ssim
from base.schema import DataConfig, SamplingConfig
from bpe_image import BPECodec, open_codec
from flextok import FlexTok
from flextok.nested_dropout import powers_of_two_upto
from grid.autoencoder import GridAutoencoder

from .bits import length_code_bits, multiset_bits
from .bootstrap import bootstrap_interval
from .context import EvalContext
from .frechet import compute_feature_stats, fid_from_stats
from .kid import kernel_inception_distance
from .rows import TokenizerRow
from .schema import EvalConfig, EvalTokenizerConfig
from .tail import code_entropy_bits

__all__ = ["Mode", "TokenizerUnderTest", "base_family", "check_resolution", "decoder_sampling", "evaluate_mode",
           "open_tokenizer"]


@dataclass(frozen=True)
class Mode:
    """Which tokens of each image a row keeps (the first k, an adaptive length, or all of them), and for a
    generative decoder whether the row shows a sample or the posterior mean.

    The mean is one Euler step from pure noise at t = 1: for a rectified flow that is eps - v(eps, 1, c),
    the model's estimate of E[x0 | tokens], the MSE-optimal reconstruction (a perfect posterior sample has
    twice its MSE). Grid decoders are deterministic, so they have one row."""

    k: int | None = None
    target_psnr: float | None = None
    mean: bool = False

    @property
    def label(self) -> str:
        if self.target_psnr is not None:
            label = f"adaptive@{self.target_psnr:g}dB"
        else:
            label = "all" if self.k is None else f"k={self.k}"
        return label + (" mean" if self.mean else "")


def base_family(model: nn.Module) -> str:
    if isinstance(model, FlexTok):
        return "token_set" if model.token_set else "1d"
    if isinstance(model, GridAutoencoder):
        return "grid_vq" if model.is_quantized else "grid_kl"
    raise UserError(f"holds a '{getattr(model, 'model_type', type(model).__name__)}' model, not a tokenizer")


def decoder_sampling(model: nn.Module, settings: EvalConfig) -> SamplingConfig | None:
    """A generative decoder's settings: the tokenizer's own, with the fields eval's `decoder_sampling` sets;
    None for the deterministic grid decoders."""
    if not isinstance(model, FlexTok):
        return None
    return settings.decoder_sampling.apply(model.config.sampling)


def check_resolution(model: nn.Module, data: DataConfig, what: str = "tokenizer") -> None:
    if model.resolution != data.resolution:
        raise UserError(f"{what} has resolution {model.resolution}, but data.resolution is {data.resolution}")


@dataclass
class TokenizerUnderTest:
    """A loaded tokenizer entry: the model, its identity, family, decoding settings and optional BPE codec."""

    entry: EvalTokenizerConfig
    model: nn.Module
    fingerprint: str
    settings: EvalConfig
    codec: BPECodec | None = None
    codec_fingerprint: str | None = None

    @property
    def family(self) -> str:
        return base_family(self.model) + ("+bpe" if self.codec is not None else "")

    @property
    def sampling(self) -> SamplingConfig | None:
        return decoder_sampling(self.model, self.settings)

    def decoding(self, mode: Mode) -> SamplingConfig | None:
        """The decoder settings of a row: its sampler's, or for the posterior mean one unguided step from
        t = 1 (E[x0 | tokens] is the conditional model's estimate; guidance would extrapolate past it)."""
        if self.sampling is None:
            return None
        return dataclasses.replace(self.sampling, steps=1, guidance_scale=1.0) if mode.mean else self.sampling

    @property
    def prefix_lengths(self) -> list[int]:
        """The prefix lengths of a 1D tokenizer's rows (decoded together), else none."""
        if self.codec is not None or base_family(self.model) != "1d":
            return []
        return powers_of_two_upto(self.model.num_registers)

    @property
    def has_mean(self) -> bool:
        """Whether one step from pure noise estimates E[x0 | tokens]: a velocity (rectified flow) or
        v-prediction does; eps-prediction divides by sqrt(alpha_bar(1)) ~ 0.003 there, which is no estimate."""
        config = self.model.config
        return config.decoder == "rectified_flow" or config.prediction == "v"

    def modes(self) -> list[Mode]:
        family = base_family(self.model)
        if family not in ("1d", "token_set"):
            return [Mode()]
        ks = [None] if family == "token_set" else powers_of_two_upto(self.model.num_registers)
        modes = [Mode(k=k) for k in ks] + ([Mode(k=k, mean=True) for k in ks] if self.has_mean else [])
        if family == "token_set":
            return modes
        target = self.settings.adaptive_psnr if self.entry.adaptive_psnr is None else self.entry.adaptive_psnr
        return modes + ([Mode(target_psnr=target)] if target is not None else [])

    def tokenize(self, images: torch.Tensor, mode: Mode, seed: int) -> list[torch.Tensor]:
        if self.sampling is None:
            return self.model.tokenize(images)
        return self.model.tokenize(images, k=mode.k, target_psnr=mode.target_psnr, seed=seed,
                                   **dataclasses.asdict(self.sampling))

    def detokenize(self, tokens: list[torch.Tensor], mode: Mode, seed: int) -> torch.Tensor:
        decoding = self.decoding(mode)
        if decoding is None:
            return self.model.detokenize(tokens)
        return self.model.detokenize(tokens, seed=seed, **dataclasses.asdict(decoding))

    def describe(self, mode: Mode) -> dict[str, Any]:
        """The row's fixed columns: what was measured and how bits are counted."""
        if self.codec is not None:
            vocab, basis = self.codec.vocab_size, "post-BPE tokens x log2(BPE vocab)"
        elif self.model.vocab_size and base_family(self.model) == "token_set":
            vocab, basis = self.model.vocab_size, "log2 C(vocab + tokens - 1, tokens): an unordered multiset"
        elif self.model.vocab_size:
            vocab, basis = self.model.vocab_size, "tokens x log2(vocab)"
        else:
            vocab, basis = None, "latent elements x 16 bits (float16 KL latents)"
        if mode.target_psnr is not None:
            basis += " + log2(allowed lengths) for the length"
        kind = "deterministic" if self.sampling is None else "mean" if mode.mean else "sample"
        return {"name": self.entry.name, "family": self.family, "path": self.entry.path, "bpe": self.entry.bpe,
                "mode": mode.label, "decoding": kind, "k": mode.k, "target_psnr": mode.target_psnr,
                "vocab_size": vocab, "bits_basis": basis, "decoder": self.decoding(mode)}

    def identity(self, mode: Mode, ctx: EvalContext) -> dict[str, Any]:
        """What this row's numbers depend on (its cache key): weights, mode, held-out pixels, decoding
        settings (the decoder's noise also depends on the seed and batch composition)."""
        decoder = self.decoding(mode)
        decoding = None if decoder is None else {**dataclasses.asdict(decoder), "seed": ctx.cfg.seed,
                                                 "batch_size": self.settings.batch_size}
        return {"tokenizer": self.fingerprint, "mode": dataclasses.asdict(mode), "held_out": ctx.held_out_key,
                "decoder": decoding}

    def token_identity(self, mode: Mode, ctx: EvalContext) -> str:
        """What a row's tokens depend on: the tokenizer, the prefix or adaptive target (whose choice decodes
        with the sampler's settings), the held-out images; not whether the row decodes a sample or a mean."""
        decoder = dataclasses.asdict(self.sampling) if self.sampling and mode.target_psnr is not None else None
        return json.dumps({"tokenizer": self.fingerprint, "k": mode.k, "target_psnr": mode.target_psnr,
                           "held_out": ctx.held_out_key, "decoder": decoder, "seed": ctx.cfg.seed}, sort_keys=True)


def open_tokenizer(entry: EvalTokenizerConfig, ctx: EvalContext) -> TokenizerUnderTest:
    """Load and check an entry; every failure says what is wrong, and the caller names the entry."""
    model, fingerprint = ctx.model(entry.path)
    base_family(model)
    check_resolution(model, ctx.cfg.data)
    tested = TokenizerUnderTest(entry, model, fingerprint, ctx.settings)
    if entry.bpe is None:
        return tested
    if not model.vocab_size:
        raise UserError(f"bpe {entry.bpe}: BPE needs integer codes, but this is a KL tokenizer (continuous latents)")
    tested.codec, tested.codec_fingerprint = open_codec(entry.bpe)
    if tested.codec.codebook_size != model.vocab_size:
        raise UserError(f"bpe {entry.bpe}: codec is for {tested.codec.codebook_size} codes, the tokenizer has "
                        f"{model.vocab_size}")
    return tested


class Reconstruction:
    """Held-out tokens and decodings of one (tokenizer, mode), each computed on first use only, so a row
    whose metrics are all cached never runs the tokenizer.

    Batch b is tokenized and decoded with seed + b and the same batch composition: FlexTok's adaptive
    length is chosen with exactly the noise its final decoding then uses."""

    def __init__(self, tested: TokenizerUnderTest, mode: Mode, ctx: EvalContext) -> None:
        self.tested, self.mode, self.ctx = tested, mode, ctx
        self.memo_key = tested.token_identity(mode, ctx)

    @cached_property
    def tokens(self) -> list[list[torch.Tensor]]:
        """Per batch, the tokens of each image; shared within a run by entries with the same tokenizer."""
        if self.memo_key not in self.ctx.token_memo:
            batches, seed = self.ctx.held_out.images.split(self.ctx.settings.batch_size), self.ctx.cfg.seed
            self.ctx.token_memo[self.memo_key] = [self.tested.tokenize(images.to(self.ctx.device), self.mode, seed + b)
                                                  for b, images in enumerate(batches)]
        return self.ctx.token_memo[self.memo_key]

    @cached_property
    def images(self) -> torch.Tensor:
        if self.tested.prefix_lengths and self.mode.k in self.tested.prefix_lengths:
            return self._prefix_images().pop(self.mode.k)  # handed over once: the memo does not keep it
        return torch.cat([self.tested.detokenize(tokens, self.mode, self.ctx.cfg.seed + b).float().cpu()
                          for b, tokens in enumerate(self.tokens)])

    def _prefix_images(self) -> dict[int, torch.Tensor]:
        """Every prefix row (k = 1, 2, ..., R) of this tokenizer and decoding (sample or mean), decoded at
        once: each batch's tokens go through the decoder in one pass for all k, with the noise the per-k
        decodings would use (`FlexTok.detokenize_prefixes`). Memoized for the rows that follow (a row that
        asks again after taking its images decodes all prefixes once more)."""
        ks = self.tested.prefix_lengths
        key = json.dumps({"prefixes": self.tested.token_identity(Mode(k=max(ks)), self.ctx), "mean": self.mode.mean})
        if self.mode.k not in self.ctx.prefix_memo.get(key, {}):
            full = Reconstruction(self.tested, Mode(k=max(ks), mean=self.mode.mean), self.ctx).tokens
            decoding = dataclasses.asdict(self.tested.decoding(self.mode))
            per_batch = [self.tested.model.detokenize_prefixes(tokens, ks, seed=self.ctx.cfg.seed + b, **decoding)
                         for b, tokens in enumerate(full)]
            self.ctx.prefix_memo[key] = {k: torch.cat([images[k].float().cpu() for images in per_batch]) for k in ks}
        return self.ctx.prefix_memo[key]


def rate_record(tested: TokenizerUnderTest, mode: Mode, batches: list[list[torch.Tensor]]) -> dict[str, Any]:
    """Tokens and bits per image; BPE counts come from encoding the codes, checked to decode back exactly.
    A token set pays the multiset's cost; an adaptive length pays for naming its length."""
    sequences = [t for batch in batches for t in batch]
    if tested.codec is None:
        counts, bits_per_token = np.array([len(t) for t in sequences]), float(tested.model.bits_per_token)
    else:
        counts, bits_per_token = bpe_counts(tested, sequences), math.log2(tested.codec.vocab_size)
    bits = counts.mean() * bits_per_token
    if tested.codec is None and base_family(tested.model) == "token_set":
        bits = float(np.mean([multiset_bits(tested.model.vocab_size, int(n)) for n in counts]))
        bits_per_token = bits / counts.mean()  # what each token of a multiset costs on average
    record = {
        "tokens_per_image": float(counts.mean()), "tokens_min": int(counts.min()), "tokens_max": int(counts.max()),
        "bits_per_token": bits_per_token,
    }
    if mode.target_psnr is not None:
        bits += length_code_bits(len(powers_of_two_upto(tested.model.num_registers)))
        lengths, images = np.unique([len(t) for t in sequences], return_counts=True)
        record["length_counts"] = {str(k): int(n) for k, n in zip(lengths, images)}
    return {**record, "bits_per_image": float(bits)}


def bpe_counts(tested: TokenizerUnderTest, sequences: list[torch.Tensor]) -> np.ndarray:
    codes = [t.cpu().numpy() for t in sequences]
    ids = tested.codec.encode_flat(codes)
    for i, (original, decoded) in enumerate(zip(codes, tested.codec.decode_batch(ids))):
        if not np.array_equal(np.asarray(decoded).reshape(-1), original):
            raise ValueError(f"bpe {tested.entry.bpe}: held-out image {i} does not decode back to its codes (lossy)")
    return np.array([len(i) for i in ids])


def quality_record(metric: Callable, name: str, rec: Reconstruction, originals: torch.Tensor) -> dict[str, Any]:
    values = metric(rec.images, originals)
    record = {name: values.mean().item(), f"{name}_ci": list(bootstrap_interval(values.double().numpy()))}
    if name == "psnr":  # kept per image so that rows can be compared paired (`tail.doublings`)
        record["psnr_per_image"] = values.tolist()
    if name == "psnr" and rec.mode.target_psnr is not None:  # how often the adaptive target was reached
        record["target_met"] = (values >= rec.mode.target_psnr).float().mean().item()
    return record


def entropy_record(rec: Reconstruction) -> dict[str, Any]:
    """Each register position's plug-in code entropy over the held-out images (the tokens the rows decode)."""
    codes = np.stack([t.cpu().numpy() for batch in rec.tokens for t in batch])
    return {"code_entropy_bits": code_entropy_bits(codes)}


@torch.no_grad()
def lpips_record(rec: Reconstruction, ctx: EvalContext) -> dict[str, Any]:
    model, bs = ctx.lpips[0], ctx.settings.batch_size
    pairs = zip(rec.images.split(bs), ctx.held_out.images.split(bs))
    distances = [model(x.to(ctx.device), y.to(ctx.device)).cpu() for x, y in pairs]
    return {"lpips": torch.cat(distances).mean().item()}


def rfid_record(rec: Reconstruction, ctx: EvalContext) -> dict[str, Any]:
    fake = compute_feature_stats(ctx.backbone, rec.images.split(ctx.settings.batch_size))
    result = fid_from_stats(ctx.held_out_stats, fake)
    kid = kernel_inception_distance(ctx.held_out_stats.features, fake.features, seed=ctx.cfg.seed)
    spread = ctx.spread_fids(rec.images, "held_out")
    return {"rfid": result.value, "rfid_backbone": result.backbone, "rfid_num_real": result.num_real,
            "rfid_num_fake": result.num_fake, "rkid": kid.value, "rkid_std": kid.std,
            "rfid_backbones": [result.value, *spread] if spread else None}


def evaluate_mode(tested: TokenizerUnderTest, mode: Mode, ctx: EvalContext) -> tuple[TokenizerRow, torch.Tensor]:
    """One report row (metrics from cache where present) and the reconstructions for the image grid."""
    originals = ctx.held_out.images
    base = tested.identity(mode, ctx)
    rec = Reconstruction(tested, mode, ctx)
    jobs: dict[str, tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = {
        "rate": ({"bpe": tested.codec_fingerprint}, lambda: rate_record(tested, mode, rec.tokens)),
        # "per_image" keys psnr records anew: older ones lack the per-image values
        "psnr": ({"per_image": True}, lambda: quality_record(psnr, "psnr", rec, originals)),
        "ssim": ({}, lambda: quality_record(ssim, "ssim", rec, originals)),
        "rfid": ({"backbone": ctx.backbone.name, **ctx.spread_key}, lambda: rfid_record(rec, ctx)),
    }
    if ctx.lpips is not None:
        jobs["lpips"] = ({"lpips_weights": ctx.lpips[1]}, lambda: lpips_record(rec, ctx))
    if tested.prefix_lengths and mode.k == tested.prefix_lengths[-1] and not mode.mean:  # all R positions, once
        jobs["code_entropy"] = ({}, lambda: entropy_record(rec))
    values, computed = {}, []
    for metric, (extra, compute) in jobs.items():
        value, fresh = ctx.cache.record({**base, **extra, "metric": metric}, compute)
        values.update(value)
        computed += [metric] if fresh else []
    index = ctx.preview_index
    preview, fresh = ctx.cache.images({**base, "metric": "preview", "rows": index.tolist()}, lambda: rec.images[index])
    row = TokenizerRow(**tested.describe(mode), **values, computed=computed + (["preview"] if fresh else []))
    return row, preview
