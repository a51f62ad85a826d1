"""Tail diagnostics of ordered 1D tokenizers: what each further register buys and costs.

For every 1D tokenizer in a report: the PSNR gained from each prefix length to the next (k -> 2k), with a
paired bootstrap interval over the same held-out images; each register position's empirical code entropy
(plug-in, over the held-out codes); and for each discrete prior over its full token stream, the held-out bits
of each position. Registers that add little PSNR, carry few distinct codes, or cost the prior few bits show
up here side by side."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from flextok.nested_dropout import powers_of_two_upto

from .bootstrap import paired_difference_interval
from .rows import EvaluationResult, TokenizerRow, same_model

__all__ = ["Doubling", "TailDiagnostics", "code_entropy_bits", "csv_rows", "doublings", "group_means",
           "position_groups", "tail_diagnostics"]


@dataclass
class Doubling:
    """The PSNR gained by decoding the first `next_k` tokens instead of the first `k` (k -> 2k; the last step
    ends at R when R is not a power of two)."""

    decoding: str  # mean or sample (a generative decoder's two rows)
    k: int
    next_k: int
    gain_db: float  # mean over the held-out images of PSNR(next_k) - PSNR(k)
    gain_ci: list[float]  # 95% paired bootstrap interval: both rows' per-image PSNRs resampled together
    images: int


@dataclass
class TailDiagnostics:
    """One 1D tokenizer's tail: per prefix step its PSNR gain, per register position its code entropy and
    each prior's bits. Per-position lists are indexed by position - 1."""

    tokenizer: str  # the eval.tokenizers entry
    path: str
    registers: int
    vocab_size: int
    images: int  # held-out images the entropies come from
    codebook_bits: float  # log2(vocab_size): the entropy of uniform codes
    entropy_ceiling_bits: float  # min(log2 V, log2 images): the most a plug-in estimate can show
    code_entropy_bits: list[float] | None  # None when the row holding them failed
    doublings: list[Doubling] = field(default_factory=list)
    prior_bits: dict[str, list[float]] = field(default_factory=dict)  # prior name -> held-out bits per position


def code_entropy_bits(codes: np.ndarray) -> list[float]:
    """Plug-in entropy in bits of each column of `codes` [images, positions]: the empirical code histogram
    of each position. Biased low when images are few next to the codebook (it cannot exceed log2 images)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) == 0:
        raise ValueError(f"expected codes of shape [images, positions], got {codes.shape}")
    entropies = []
    for column in codes.T:
        p = np.unique(column, return_counts=True)[1] / len(column)
        entropies.append(float((p * np.log2(1 / p)).sum()))  # not -sum(p log p): no -0.0
    return entropies


def position_groups(registers: int) -> list[tuple[int, int]]:
    """The positions (first, last, 1-based) each prefix step k -> 2k adds: 1, 2, 3-4, 5-8, ..., up to R."""
    ks = powers_of_two_upto(registers)
    return [(start + 1, end) for start, end in zip([0] + ks[:-1], ks)]


def group_means(values: list[float], registers: int) -> list[float]:
    """`values` per position averaged over each of `position_groups`."""
    return [float(np.mean(values[first - 1 : last])) for first, last in position_groups(registers)]


def doublings(rows: list[TokenizerRow]) -> list[Doubling]:
    """The PSNR gain of each consecutive pair of prefix rows of one tokenizer, per decoding, where both rows
    kept their per-image PSNRs."""
    found = []
    for decoding in dict.fromkeys(r.decoding for r in rows):
        by_k = {r.k: r for r in rows if r.decoding == decoding and r.k is not None and not r.adaptive
                and r.psnr_per_image}
        ks = sorted(by_k)
        for k, next_k in pairwise(ks):
            before, after = np.array(by_k[k].psnr_per_image), np.array(by_k[next_k].psnr_per_image)
            if len(before) != len(after):  # not the same images: nothing to pair
                continue
            found.append(Doubling(decoding, k, next_k, float((after - before).mean()),
                                  list(paired_difference_interval(before, after)), len(before)))
    return found


def _of_tokenizer(result: EvaluationResult, name: str) -> TailDiagnostics | None:
    rows = [r for r in result.tokenizer_rows if r.name == name]
    ks = [r.k for r in rows if r.k is not None]
    if not ks:  # only its adaptive row was measured
        return None
    entropy = next((r.code_entropy_bits for r in rows if r.code_entropy_bits), None)
    priors = {p.name: p.nll_position_bits for p in result.prior_rows
              if same_model(p.tokenizer, rows[0].path) and p.nll_position_bits}
    found = doublings(rows)
    if entropy is None and not found and not priors:
        return None
    images, vocab = result.meta["data"]["held_out_images"], rows[0].vocab_size
    return TailDiagnostics(name, rows[0].path, max(ks), vocab, images, math.log2(vocab),
                           min(math.log2(vocab), math.log2(images)), entropy, found, priors)


def tail_diagnostics(result: EvaluationResult) -> list[TailDiagnostics]:
    """One entry per 1D tokenizer of the report (BPE entries excluded: their reconstructions are the
    underlying tokenizer's) with anything to show."""
    names = dict.fromkeys(r.name for r in result.tokenizer_rows if r.family == "1d")
    return [tail for name in names if (tail := _of_tokenizer(result, name)) is not None]


def csv_rows(tail: TailDiagnostics) -> list[dict]:
    """The tail of one tokenizer as long-format rows: one per position and quantity, one per prefix step."""
    rows = [{"quantity": "code_entropy_bits", "source": "held-out codes", "position": i + 1, "value": value}
            for i, value in enumerate(tail.code_entropy_bits or [])]
    rows += [{"quantity": "prior_bits", "source": prior, "position": i + 1, "value": value}
             for prior, bits in tail.prior_bits.items() for i, value in enumerate(bits)]
    rows += [{"quantity": "psnr_gain_db", "source": d.decoding, "k": d.k, "next_k": d.next_k, "value": d.gain_db,
              "ci_low": d.gain_ci[0], "ci_high": d.gain_ci[1]} for d in tail.doublings]
    return [{"tokenizer": tail.tokenizer, **row} for row in rows]
