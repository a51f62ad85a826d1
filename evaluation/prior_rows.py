"""Prior rows: held-out NLL in bits per image (the modelability axis), gFID from seeded samples, and
sampling speed, for every prior entry with the tokenizer (and BPE codec) its tokens belong to."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from base.data import data_settings
from base.errors import UserError
from bpe_image import BPECodec, open_codec
from flextok.nested_dropout import powers_of_two_upto
from priors import DiscretePrior, FlowPrior, build_token_dataset, generate_images
from priors.pairing import check_tokenizer

from .context import EvalContext
from .frechet import compute_feature_stats, fid_from_stats
from .kid import kernel_inception_distance
from .rows import PriorRow, SamplerSettings
from .schema import EvalPriorConfig
from .tokenizer_rows import base_family, check_resolution, decoder_sampling

__all__ = ["PriorUnderTest", "evaluate_prior", "open_prior"]

SAMPLE_PREVIEW = 32  # samples kept per prior for its PNG grid


@dataclass
class PriorUnderTest:
    """A loaded prior with the tokenizer (and BPE codec) its tokens belong to."""

    entry: EvalPriorConfig
    prior: DiscretePrior | FlowPrior
    fingerprint: str
    tokenizer_path: str
    tokenizer: nn.Module
    tokenizer_fingerprint: str
    codec: BPECodec | None = None
    codec_fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return self.prior.config.num_classes

    def sampler(self, ctx: EvalContext) -> SamplerSettings:
        """Every setting a gFID depends on, stated next to it in the report."""
        settings, classes = ctx.settings, self.num_classes
        return SamplerSettings(
            samples=settings.gfid_samples, seed=ctx.cfg.seed, batch_size=settings.batch_size,
            labels=f"classes 0..{classes - 1} in turn" if classes else "unconditional",
            flow=isinstance(self.prior, FlowPrior), sampling=settings.prior_sampling.apply(self.prior.config.sampling),
            decoder=decoder_sampling(self.tokenizer, settings),
        )


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
    check_tokenizer(prior, tokenizer_fingerprint, tokenizer_path)
    tested = PriorUnderTest(entry, prior, fingerprint, tokenizer_path, tokenizer, tokenizer_fingerprint)
    if prior.config.tokens == "bpe":
        tested.codec, tested.codec_fingerprint = open_codec(prior.config.bpe)
    return tested


def prefix_lengths(tested: PriorUnderTest) -> list[int]:
    """The prefix lengths k = 1, 2, 4, ..., R whose bits a prior's NLL record also gives: for a discrete prior
    over an ordered 1D tokenizer's full, fixed-length stream (the coarse-to-fine operating points); else none."""
    ordered = base_family(tested.tokenizer) == "1d" and tested.codec is None
    if isinstance(tested.prior, FlowPrior) or tested.prior.config.tokens != "full" or not ordered:
        return []
    return powers_of_two_upto(tested.tokenizer.num_registers)


@torch.no_grad()
def nll_record(tested: PriorUnderTest, ctx: EvalContext) -> dict[str, Any]:
    """Held-out bits per image under the null condition (held-out images may belong to unseen classes), and
    for ordered 1D streams the bits of each prefix k (`prefix_lengths`) and of each position.

    A flow prior has no discrete likelihood: its fixed-noise validation loss is reported instead."""
    data = build_token_dataset(tested.tokenizer, tested.prior.config, ctx.cfg.data, ctx.cfg.data.eval_split,
                               ctx.token_cache, limit=ctx.settings.num_images, seed=ctx.cfg.seed,
                               device=ctx.device, progress=False)
    flow = isinstance(tested.prior, FlowPrior)
    ks = prefix_lengths(tested)
    values, positions = [], []
    for start in range(0, len(data), ctx.settings.batch_size):
        batch = data.batch(np.arange(start, min(start + ctx.settings.batch_size, len(data))))
        inputs = {k: v.to(ctx.device) for k, v in batch.items() if k != "labels"}
        if flow:
            values.append(tested.prior.validation_loss(**inputs, seed=ctx.cfg.seed))
        elif ks:  # one pass for all three: per position, its prefix sums, and the whole sequence's sum
            positions.append(tested.prior.position_nll_bits(inputs["tokens"]))
            values.append(positions[-1].sum(1))
        else:
            values.append(tested.prior.nll_bits(**inputs))
    per_image = torch.cat(values)
    mean = per_image.mean().item()
    position_bits = torch.cat(positions).mean(0) if ks else None
    prefix_bits = dict(zip(map(str, ks), position_bits.cumsum(0)[[k - 1 for k in ks]].tolist())) if ks else None
    return {"nll_bits_per_image": None if flow else mean, "flow_val_loss": mean if flow else None,
            "nll_prefix_bits": prefix_bits, "nll_position_bits": None if position_bits is None else
            position_bits.tolist(), "nll_per_image": None if flow else per_image.tolist(), "nll_images": len(data),
            "tokens_per_image": float(data.lengths.mean())}


class Sampling:
    """The gFID samples of one prior, generated on first use, with the time generation took."""

    def __init__(self, tested: PriorUnderTest, sampler: SamplerSettings, ctx: EvalContext) -> None:
        self.tested, self.sampler, self.ctx = tested, sampler, ctx
        n, classes = sampler.samples, tested.num_classes
        self.labels = torch.arange(n) % classes if classes else None

    @cached_property
    def run(self) -> tuple[torch.Tensor, float]:
        s, tested = self.sampler, self.tested
        chunks = []
        started = time.perf_counter()
        for b, start in enumerate(range(0, s.samples, s.batch_size)):
            count = min(s.batch_size, s.samples - start)
            labels = None if self.labels is None else self.labels[start : start + count]
            chunks.append(generate_images(tested.prior, tested.tokenizer, labels, num_samples=count,
                                          sampling=s.sampling, decoder_sampling=s.decoder, seed=s.seed + b,
                                          codec=tested.codec))
        return torch.cat(chunks).float(), time.perf_counter() - started

    def record(self) -> dict[str, Any]:
        images, seconds = self.run
        fake = compute_feature_stats(self.ctx.backbone, images.split(self.sampler.batch_size))
        result = fid_from_stats(self.ctx.reference_stats, fake)
        kid = kernel_inception_distance(self.ctx.reference_stats.features, fake.features, seed=self.sampler.seed)
        spread = self.ctx.spread_fids(images, "reference")
        return {"gfid_backbones": [result.value, *spread] if spread else None,
                "gfid": result.value, "gfid_backbone": result.backbone, "gfid_num_real": result.num_real,
                "gfid_num_fake": result.num_fake, "gkid": kid.value, "gkid_std": kid.std, "sampling_seconds": seconds,
                "sampling_images_per_s": len(images) / seconds}


def evaluate_prior(entry: EvalPriorConfig, ctx: EvalContext) -> tuple[PriorRow, torch.Tensor, torch.Tensor | None]:
    """One prior row, plus a preview of its samples and their labels."""
    tested = open_prior(entry, ctx)
    sampler = tested.sampler(ctx)
    base = {"prior": tested.fingerprint, "tokenizer": tested.tokenizer_fingerprint, "bpe": tested.codec_fingerprint}
    sampling = Sampling(tested, sampler, ctx)
    gfid_inputs = {**base, "sampler": sampler, "backbone": ctx.backbone.name, "reference": ctx.reference_key,
                   "timed_on": {"device": str(ctx.device), "threads": torch.get_num_threads()}}  # images/s is measured
    # "positions" and "per_image" key nll records anew: older ones lack the per-position and per-image bits
    nll_inputs = {**base, "metric": "nll", "prefixes": prefix_lengths(tested), "held_out": ctx.held_out_key,
                  "data": data_settings(ctx.cfg.data), "positions": True, "per_image": True}
    nll, nll_fresh = ctx.cache.record(nll_inputs, lambda: nll_record(tested, ctx))
    gfid, gfid_fresh = ctx.cache.record({**gfid_inputs, **ctx.spread_key, "metric": "gfid"}, sampling.record)
    count = min(SAMPLE_PREVIEW, sampler.samples)
    preview, preview_fresh = ctx.cache.images({**gfid_inputs, "metric": "samples", "count": count},
                                              lambda: sampling.run[0][:count])
    fresh = {"nll": nll_fresh, "gfid": gfid_fresh, "samples": preview_fresh}
    config = tested.prior.config
    row = PriorRow(
        name=entry.name, path=entry.path, kind=config.kind, tokens=config.tokens,
        target_psnr=config.target_psnr if config.tokens == "adaptive" else None, tokenizer=tested.tokenizer_path,
        tokenizer_family=base_family(tested.tokenizer) + ("+bpe" if config.bpe else ""), bpe=config.bpe,
        num_classes=tested.num_classes, sampler=sampler,
        **nll, **gfid, computed=[name for name, was_fresh in fresh.items() if was_fresh],
    )
    labels = None if sampling.labels is None else sampling.labels[:count]
    return row, preview, labels
