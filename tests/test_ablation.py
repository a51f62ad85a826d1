"""An ablation against `eval.baseline` on hand-made rows with known answers: paired PSNR differences per
operating point, the priors' paired bits, training records, the report's section, CSV and plot; nothing of it
without a baseline."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from test_tail_diagnostics import IMAGES, prior_row, result_with, tokenizer_row

from base.training import TRAINING_RECORD
from evaluation.ablation import comparisons
from evaluation.report import summary_markdown, write_report


def entry_rows(name: str, base: np.ndarray, gain: float, path: str | None = None):
    """A 1D tokenizer with k = 1, 2, 4: mean rows `gain` dB above `base` + 2 log2(k), samples 1 dB lower."""
    rows = []
    for k in (1, 2, 4):
        for decoding, offset in (("mean", 0.0), ("sample", -1.0)):
            row = tokenizer_row(name, "1d", k, decoding, base + gain + offset + 2.0 * np.log2(k))
            rows.append(dataclasses.replace(row, path=path or row.path))
    return rows


def ablation_result(tmp_path, baseline: str | None = "base"):
    rng = np.random.default_rng(0)
    images = rng.normal(18.0, 4.0, IMAGES)  # the images vary far more than the entries differ
    noise = lambda: rng.normal(0.0, 0.1, IMAGES)  # noqa: E731
    folders = {name: tmp_path / name for name in ("base", "better", "worse")}
    for name, folder in folders.items():
        folder.mkdir(parents=True)
    (folders["better"] / TRAINING_RECORD).write_text(json.dumps({"steps": 10, "images": 640, "step_seconds": 4.0,
                                                                 "images_per_s": 160.0, "matmul_gflops": 150.0}))
    rows = (entry_rows("base", images, 0.0, str(folders["base"])) + entry_rows("better", images + noise(), 0.5,
            str(folders["better"])) + entry_rows("worse", images + noise(), -0.3, str(folders["worse"])))
    bits = rng.normal(150.0, 20.0, IMAGES)
    priors = []
    for name, shift in (("base", 0.0), ("better", -10.0)):
        prior = prior_row(f"prior_{name}", str(folders[name]), None)
        per_image = bits + shift + rng.normal(0.0, 1.0, IMAGES)
        priors.append(dataclasses.replace(prior, nll_per_image=per_image.tolist(),
                                          nll_bits_per_image=float(per_image.mean())))
    result = result_with(rows, priors)
    result.meta["settings"] = {"baseline": baseline}
    result.previews = {(r.name, r.mode): result.originals for r in rows}
    return result


def test_each_entry_is_compared_with_the_baseline_paired_over_the_images(tmp_path):
    compared = comparisons(ablation_result(tmp_path))
    assert [c.tokenizer for c in compared] == ["base", "better", "worse"]
    assert compared[0].effects == [] and compared[0].prior == "prior_base"
    for c, gain in ((compared[1], 0.5), (compared[2], -0.3)):
        assert {(e.decoding, e.k) for e in c.effects} == {(d, k) for d in ("mean", "sample") for k in (1, 2, 4)}
        for e in c.effects:
            assert e.delta_db == pytest.approx(gain, abs=0.05) and e.images == IMAGES
            assert e.delta_ci[0] < e.delta_db < e.delta_ci[1]
            assert e.delta_ci[1] - e.delta_ci[0] < 0.2  # paired: the images' 4 dB spread cancels
            assert e.psnr - e.baseline_psnr == pytest.approx(e.delta_db)
        assert [(d.k, d.next_k) for d in c.doublings if d.decoding == "mean"] == [(1, 2), (2, 4)]
        assert c.full.k == 4 and c.full.decoding == "mean"
    better, worse = compared[1], compared[2]
    assert better.nll_delta_bits == pytest.approx(-10.0, abs=0.5) and better.nll_delta_ci[1] < -9.0
    assert better.nll_ci[0] < better.nll_bits < better.nll_ci[1]
    assert worse.prior is None and worse.nll_delta_bits is None  # no prior over its tokens
    assert better.training["steps"] == 10 and compared[0].training is None  # no training.json there


def test_no_baseline_no_ablation(tmp_path):
    assert comparisons(ablation_result(tmp_path, baseline=None)) == []
    result = ablation_result(tmp_path / "b", baseline=None)
    assert "## Ablation" not in summary_markdown(result)
    result = ablation_result(tmp_path / "c", baseline="absent")  # e.g. every row of the baseline failed
    assert comparisons(result) == [] and "No comparison: the baseline `absent`" in summary_markdown(result)


def test_rows_over_other_images_are_not_paired(tmp_path):
    result = ablation_result(tmp_path)
    for row in result.tokenizer_rows:
        if row.name == "worse" and row.k == 4:
            row.psnr_per_image = row.psnr_per_image[:-1]
    worse = comparisons(result)[2]
    assert {e.k for e in worse.effects} == {1, 2}


def test_the_report_has_the_ablation_section_csv_and_plot(tmp_path):
    result = ablation_result(tmp_path)
    text = summary_markdown(result)
    assert "## Ablation against the baseline" in text and "paired bootstrap" in text
    section = text.split("## Ablation against the baseline")[1].split("\n## ")[0]
    better = next(line for line in section.splitlines() if line.startswith("| `better`") and "[" in line)
    assert "+0.5" in better  # k = 1, 2, 4 differences of about +0.5 dB
    assert any(line.startswith("| `better` | `prior_better`") and "-10" in line for line in section.splitlines())
    paths = write_report(result, tmp_path / "report")
    names = {p.name for p in paths}
    assert {"ablation.csv", "ablation.png"} <= names
    csv_text = (tmp_path / "report" / "ablation.csv").read_text().splitlines()
    assert csv_text[0].startswith("tokenizer,baseline,quantity")
    assert sum(line.startswith("better,base,psnr_delta_db") for line in csv_text) == 6
    assert sum(",prior_nll_delta_bits," in line for line in csv_text) == 1
    assert Image.open(tmp_path / "report" / "ablation.png").size[0] > 400
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [a["tokenizer"] for a in report["ablation"]] == ["base", "better", "worse"]
    assert all("nll_per_image" not in p for p in report["priors"])


def test_a_prior_finds_its_tokenizer_however_the_folder_is_written(tmp_path):
    from evaluation.rows import same_model

    result = ablation_result(tmp_path)
    other = str(tmp_path / "base" / ".." / "better")  # the folder of `better`, written another way
    result.prior_rows[1] = dataclasses.replace(result.prior_rows[1], tokenizer=other)
    assert comparisons(result)[1].prior == "prior_better"
    assert same_model("hf:owner/name", "hf:owner/name") and not same_model("hf:owner/name", "owner/name")
    assert not same_model(str(tmp_path / "base"), str(tmp_path / "better"))
