"""Tail diagnostics on hand-made inputs with known answers: per-position code entropy, paired PSNR gains per
prefix step, the prior's bits per position, and the report section built from them (present only when a 1D
tokenizer is in the report; prior columns only when a prior is)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from base.schema import SamplingConfig
from evaluation.bootstrap import bootstrap_interval, paired_difference_interval
from evaluation.report import summary_markdown
from evaluation.rows import EvaluationResult, PriorRow, SamplerSettings, TokenizerRow
from evaluation.tail import code_entropy_bits, doublings, group_means, position_groups, tail_diagnostics
from priors import DiscretePrior, PriorConfig

IMAGES = 40


def test_code_entropy_of_uniform_constant_and_known_columns():
    vocab = 8
    uniform = np.tile(np.arange(vocab), 5)  # every code equally often
    codes = np.stack([uniform, np.zeros_like(uniform), np.repeat([0, 1], len(uniform) // 2), uniform[::-1]], axis=1)
    assert code_entropy_bits(codes) == pytest.approx([math.log2(vocab), 0.0, 1.0, math.log2(vocab)])
    skewed = np.array([[0], [0], [0], [1]])  # p = 3/4, 1/4
    assert code_entropy_bits(skewed) == pytest.approx([-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))])
    with pytest.raises(ValueError, match="images, positions"):
        code_entropy_bits(np.zeros(4))


def test_paired_interval_holds_the_difference_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(0)
    before = rng.normal(20.0, 5.0, IMAGES)  # images vary a lot
    after = before + 1.0 + rng.normal(0.0, 0.1, IMAGES)  # every image gains about 1 dB
    low, high = paired_difference_interval(before, after)
    assert low < (after - before).mean() < high and low < 1.0 < high
    # unpaired: each model's images resampled on their own, as two separate intervals would treat them
    draws = rng.integers(0, IMAGES, size=(2, 1000, IMAGES))
    unpaired = after[draws[0]].mean(1) - before[draws[1]].mean(1)
    unpaired_width = np.subtract(*np.percentile(unpaired, [97.5, 2.5]))
    assert high - low < unpaired_width / 5
    assert (low, high) == bootstrap_interval(after - before)  # the paired bootstrap is the difference's bootstrap
    with pytest.raises(ValueError, match="same images"):
        paired_difference_interval(before, after[:-1])


def test_position_groups_follow_the_prefix_steps():
    assert position_groups(8) == [(1, 1), (2, 2), (3, 4), (5, 8)]
    assert position_groups(6) == [(1, 1), (2, 2), (3, 4), (5, 6)]  # the last step ends at R
    assert position_groups(1) == [(1, 1)]
    assert group_means([1.0, 2.0, 3.0, 5.0, 0.0, 0.0, 0.0, 8.0], 8) == [1.0, 2.0, 4.0, 2.0]


def test_position_bits_are_each_tokens_conditional_bits():
    """-log2 p(t_i | t_<i), by brute force over every sequence of a 3-code vocabulary; they sum to the
    sequence's bits and accumulate to the prefix bits."""
    torch.manual_seed(0)
    prior = DiscretePrior(PriorConfig(dim=32, depth=1, heads=2), vocab_size=3, max_length=3).eval()
    everything = torch.tensor(list(itertools.product(range(3), repeat=3)))
    with torch.no_grad():
        full = prior.nll_bits(everything)
        positions = prior.position_nll_bits(everything)
        prefixes = prior.prefix_nll_bits(everything, [1, 2, 3])
    assert positions.shape == (27, 3)
    marginal = lambda row, k: torch.exp2(-full[(everything[:, :k] == everything[row, :k]).all(1)]).sum()  # noqa: E731
    for row in range(27):
        for i in range(3):
            conditional = marginal(row, i + 1) / (marginal(row, i) if i else 1.0)
            assert positions[row, i].item() == pytest.approx(-math.log2(conditional.item()), abs=1e-4)
    torch.testing.assert_close(positions.sum(1), full)
    torch.testing.assert_close(positions.cumsum(1), prefixes)
    variable = DiscretePrior(PriorConfig(dim=32, depth=1, heads=2), vocab_size=3, max_length=3, variable_length=True)
    with pytest.raises(ValueError, match="fixed-length ordered"):
        variable.position_nll_bits(everything)


def tokenizer_row(name: str, family: str, k: int | None, decoding: str, per_image: np.ndarray | None,
                  target_psnr: float | None = None, entropy: list[float] | None = None) -> TokenizerRow:
    psnr = 0.0 if per_image is None else float(per_image.mean())
    return TokenizerRow(
        name=name, family=family, path=f"runs/{name}", bpe=None, mode="row", decoding=decoding, k=k,
        target_psnr=target_psnr, vocab_size=16, bits_basis="tokens x log2(vocab)", decoder=None,
        tokens_per_image=float(k or 4), tokens_min=k or 4, tokens_max=k or 4, bits_per_token=4.0,
        bits_per_image=4.0 * (k or 4), psnr=psnr, ssim=0.5, rfid=1.0, rfid_backbone="b", rfid_num_real=IMAGES,
        rfid_num_fake=IMAGES, psnr_ci=[psnr, psnr], ssim_ci=[0.5, 0.5], rkid=0.0, rkid_std=0.0,
        target_met=None if target_psnr is None else 1.0, psnr_per_image=None if per_image is None else
        per_image.tolist(), code_entropy_bits=entropy)


def prior_row(name: str, tokenizer: str, positions: list[float] | None) -> PriorRow:
    sampler = SamplerSettings(samples=4, seed=0, batch_size=4, labels="unconditional", flow=False,
                              sampling=SamplingConfig(), decoder=None)
    return PriorRow(
        name=name, path=f"runs/{name}", kind="discrete", tokens="full", target_psnr=None, tokenizer=tokenizer,
        tokenizer_family="1d", bpe=None, num_classes=0, sampler=sampler, nll_bits_per_image=sum(positions or [1.0]),
        flow_val_loss=None, nll_prefix_bits=None, nll_images=IMAGES, tokens_per_image=4.0, gfid=1.0,
        gfid_backbone="b", gfid_num_real=4, gfid_num_fake=4, gkid=0.0, gkid_std=0.0, sampling_seconds=1.0,
        sampling_images_per_s=4.0, nll_position_bits=positions)


def result_with(tokenizer_rows: list[TokenizerRow], prior_rows: list[PriorRow] = ()) -> EvaluationResult:
    meta = {"name": "t", "seed": 0, "device": "cpu", "torch_threads": 1, "lpips": None,
            "data": {"source": "s", "resolution": 16, "eval_split": "test", "train_split": "train",
                     "held_out_images": IMAGES},
            "fid": {"backbone": "b", "note": "a test backbone"}}
    return EvaluationResult(meta, torch.zeros(1, 3, 16, 16), list(tokenizer_rows), list(prior_rows))


def one_d_rows(rng: np.random.Generator) -> tuple[list[TokenizerRow], dict[int, np.ndarray]]:
    """A 1D tokenizer with R = 4 (k = 1, 2, 4): sample rows, posterior-mean rows 1 dB better, an adaptive row."""
    base = rng.normal(15.0, 4.0, IMAGES)
    psnrs = {1: base, 2: base + 2.0 + rng.normal(0, 0.2, IMAGES), 4: base + 2.5 + rng.normal(0, 0.2, IMAGES)}
    rows = [tokenizer_row("oned", "1d", k, "sample", p, entropy=[3.0, 2.0, 1.0, 0.5] if k == 4 else None)
            for k, p in psnrs.items()]
    rows += [tokenizer_row("oned", "1d", k, "mean", p + 1.0) for k, p in psnrs.items()]
    rows.append(tokenizer_row("oned", "1d", None, "sample", base + 5.0, target_psnr=20.0))
    return rows, psnrs


def test_doublings_pair_consecutive_prefix_rows_per_decoding():
    rows, psnrs = one_d_rows(np.random.default_rng(1))
    found = {(d.decoding, d.k, d.next_k): d for d in doublings(rows)}
    assert set(found) == {(dec, k, n) for dec in ("sample", "mean") for k, n in ((1, 2), (2, 4))}  # no adaptive
    for decoding in ("sample", "mean"):
        for k, n in ((1, 2), (2, 4)):
            d = found[(decoding, k, n)]
            assert d.gain_db == pytest.approx((psnrs[n] - psnrs[k]).mean()) and d.images == IMAGES
            assert d.gain_ci[0] < d.gain_db < d.gain_ci[1]
    assert found[("sample", 1, 2)].gain_ci[0] > 1.5 and found[("sample", 2, 4)].gain_ci[1] < 1.0
    missing = [r for r in rows if r.k != 2]  # a failed k = 2 row: the step spans 1 -> 4
    assert [(d.k, d.next_k) for d in doublings(missing) if d.decoding == "sample"] == [(1, 4)]


def test_tail_section_with_and_without_priors_and_1d_tokenizers():
    rows, _ = one_d_rows(np.random.default_rng(2))
    grid = tokenizer_row("vq", "grid_vq", None, "deterministic", np.full(IMAGES, 20.0))
    bpe = tokenizer_row("oned+bpe", "1d+bpe", 4, "sample", np.full(IMAGES, 20.0))
    prior = prior_row("gpt", "runs/oned", [4.0, 3.0, 2.0, 0.0])
    other = prior_row("gpt_other", "runs/elsewhere", [1.0, 1.0, 1.0, 1.0])  # over a tokenizer not in the report

    (tail,) = tail_diagnostics(result_with(rows + [grid, bpe], [prior, other]))  # BPE and grid rows: no tail
    assert (tail.tokenizer, tail.registers, tail.vocab_size, tail.images) == ("oned", 4, 16, IMAGES)
    assert tail.codebook_bits == 4.0 and tail.entropy_ceiling_bits == 4.0  # log2 16 < log2 40
    assert tail.code_entropy_bits == [3.0, 2.0, 1.0, 0.5] and tail.prior_bits == {"gpt": [4.0, 3.0, 2.0, 0.0]}
    summary = summary_markdown(result_with(rows + [grid], [prior]))
    section = summary.split("## Tail diagnostics")[1]
    assert "### `oned`" in section and "`gpt` bits/position" in section
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| step | positions | dB gained, sample [95% CI] | dB gained, mean [95% CI] |")
    assert [line.split(" | ")[:2] for line in table[1:]] == [["| k = 1", "1"], ["| 1 → 2", "2"], ["| 2 → 4", "3–4"]]
    assert table[3].endswith("| 0.75 | 1.00 |")  # positions 3-4: entropy (1 + 0.5) / 2, prior (2 + 0) / 2
    assert table[1].split(" | ")[2] == "—"  # nothing measured before the first token

    no_prior = summary_markdown(result_with(rows))
    assert "## Tail diagnostics" in no_prior and "bits/position |" in no_prior and "`gpt`" not in no_prior
    assert "## Tail diagnostics" not in summary_markdown(result_with([grid, bpe], [other]))
    assert tail_diagnostics(result_with([grid])) == []
