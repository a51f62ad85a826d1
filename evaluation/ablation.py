"""An ablation's comparisons: every tokenizer entry of a report against `eval.baseline`, over the same
held-out images.

Per entry and operating point (decoding, k) that both have: the PSNR difference with a paired bootstrap
interval (both rows' per-image PSNRs resampled together). Per entry: the dB each prefix doubling buys, rFID and
rKID at its full length, its prior's held-out bits per image (paired over the images too), gFID and gKID, and
what its training cost (`training.json` beside the saved model: steps, images, seconds of training steps)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from base.training import TRAINING_RECORD

from .bootstrap import bootstrap_interval, paired_difference_interval
from .rows import EvaluationResult, PriorRow, TokenizerRow, same_model
from .tail import Doubling, doublings

__all__ = ["Comparison", "Effect", "comparisons", "csv_rows", "training_record"]


@dataclass
class Effect:
    """One operating point of an entry against the baseline's same point: mean PSNR and its difference."""

    decoding: str  # mean, sample or deterministic
    k: Optional[int]  # None: the entry's only (full-length) rate
    psnr: float
    baseline_psnr: float
    delta_db: float  # mean over the images of PSNR - baseline PSNR
    delta_ci: list[float]  # 95% paired bootstrap interval
    images: int


@dataclass
class Comparison:
    """One tokenizer entry against the baseline (the baseline itself too, with no effects)."""

    tokenizer: str
    baseline: str
    effects: list[Effect] = field(default_factory=list)
    doublings: list[Doubling] = field(default_factory=list)  # its own PSNR gain per prefix doubling
    full: Optional[TokenizerRow] = None  # its full-length row (posterior mean preferred): rFID, rKID, rate
    prior: Optional[str] = None  # the prior over its full token stream, if the report has one
    nll_bits: Optional[float] = None
    nll_ci: Optional[list[float]] = None  # 95% bootstrap interval of the mean bits per image
    nll_delta_bits: Optional[float] = None  # against the baseline's prior, paired over the same images
    nll_delta_ci: Optional[list[float]] = None
    gfid: Optional[float] = None
    gfid_backbones: Optional[list[float]] = None  # under each backbone of eval.fid_seeds
    gkid: Optional[float] = None
    gkid_std: Optional[float] = None
    training: Optional[dict[str, Any]] = None  # its training.json, if the saved model has one


def training_record(path: str) -> dict[str, Any] | None:
    """A saved model's `training.json` (what its training cost), or None (a hub id, or saved elsewhere)."""
    record = Path(path) / TRAINING_RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def _points(rows: list[TokenizerRow]) -> dict[tuple[str, Optional[int]], TokenizerRow]:
    return {(r.decoding, r.k): r for r in rows if not r.adaptive and r.psnr_per_image}


def _full_row(rows: list[TokenizerRow]) -> TokenizerRow | None:
    order = {"mean": 0, "deterministic": 1, "sample": 2}
    fixed = [r for r in rows if not r.adaptive]
    return min(fixed, key=lambda r: (-r.tokens_per_image, order[r.decoding]), default=None)


def _prior_of(result: EvaluationResult, row: TokenizerRow | None) -> PriorRow | None:
    """The prior over a tokenizer's full token stream (no BPE), the first one listed."""
    if row is None:
        return None
    return next((p for p in result.prior_rows
                 if same_model(p.tokenizer, row.path) and p.bpe is None and p.tokens == "full"), None)


def comparisons(result: EvaluationResult) -> list[Comparison]:
    """The baseline first, then every other tokenizer entry (BPE entries excluded: their reconstructions are
    their tokenizer's), when `eval.baseline` is set and its rows were measured. Rows pair over the same
    held-out images (one evaluation's); a pair whose image counts differ is left out."""
    baseline = result.meta.get("settings", {}).get("baseline")
    entries = {}
    for row in result.tokenizer_rows:
        if row.bpe is None:
            entries.setdefault(row.name, []).append(row)
    if not baseline or baseline not in entries:
        return []
    base_rows = entries.pop(baseline)
    base_points, base_prior = _points(base_rows), _prior_of(result, _full_row(base_rows))
    found = []
    for name, rows in [(baseline, base_rows), *entries.items()]:
        full, prior = _full_row(rows), _prior_of(result, _full_row(rows))
        comparison = Comparison(name, baseline, doublings=doublings(rows), full=full, prior=prior and prior.name,
                                training=training_record(rows[0].path))
        if name != baseline:
            for key, row in _points(rows).items():
                if key in base_points and len(row.psnr_per_image) == len(base_points[key].psnr_per_image):
                    before, after = np.array(base_points[key].psnr_per_image), np.array(row.psnr_per_image)
                    comparison.effects.append(Effect(key[0], key[1], row.psnr, base_points[key].psnr,
                                                     float((after - before).mean()),
                                                     list(paired_difference_interval(before, after)), len(after)))
        if prior is not None and prior.nll_per_image:
            values = np.array(prior.nll_per_image)
            comparison.nll_bits, comparison.nll_ci = float(values.mean()), list(bootstrap_interval(values))
            if name != baseline and base_prior is not None and len(base_prior.nll_per_image or []) == len(values):
                before = np.array(base_prior.nll_per_image)
                comparison.nll_delta_bits = float((values - before).mean())
                comparison.nll_delta_ci = list(paired_difference_interval(before, values))
        if prior is not None:
            comparison.gfid, comparison.gfid_backbones = prior.gfid, prior.gfid_backbones
            comparison.gkid, comparison.gkid_std = prior.gkid, prior.gkid_std
        found.append(comparison)
    return found


def csv_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """Long format: one row per operating point's PSNR difference, one for the prior's bits."""
    rows = [{"tokenizer": comparison.tokenizer, "baseline": comparison.baseline, "quantity": "psnr_delta_db",
             "decoding": e.decoding, "k": e.k, "value": e.delta_db, "ci_low": e.delta_ci[0], "ci_high": e.delta_ci[1],
             "images": e.images} for e in comparison.effects]
    if comparison.nll_delta_bits is not None:
        rows.append({"tokenizer": comparison.tokenizer, "baseline": comparison.baseline,
                     "quantity": "prior_nll_delta_bits", "value": comparison.nll_delta_bits,
                     "ci_low": comparison.nll_delta_ci[0], "ci_high": comparison.nll_delta_ci[1]})
    return rows
