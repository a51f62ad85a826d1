"""evaluate.py end to end on tiny untrained models: report files and schema, bits-per-image arithmetic per
family, cached results reused (and only new rows computed), failing entries reported, determinism."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import evaluate
from base.classifier import ClassifierConfig, DatasetClassifier
from base.config import load_config
from base.data import load_images
from base.errors import ConfigError
from base.fingerprint import fingerprint_model
from base.lpips import LPIPS, LPIPS_WEIGHTS_ENV, lpips_state_dict_shapes
from base.schema import DataConfig, SamplingConfig
from bpe_image import BPECodec
from evaluation.schema import ExperimentConfig
from evaluation.tail import code_entropy_bits
from flextok import FlexTok
from flextok.schema import FlexTokConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig, QuantizerConfig
from priors import DiscretePrior, FlowPrior, PriorConfig

DATA = {"source": "builtin:skimage", "resolution": 16, "crops_per_photo": 8, "eval_crops_per_photo": 4}
FSQ = QuantizerConfig(fsq_levels=[8, 5])  # 40 codes
NUM_IMAGES, GFID_SAMPLES, TRAIN_IMAGES = 8, 12, 48
SMALL_PRIOR = dict(dim=32, depth=1, heads=2)


def images(split: str) -> torch.Tensor:
    return load_images(DataConfig(**DATA), split).images


def save_tokenizers(root: Path) -> dict[str, torch.nn.Module]:
    """A quantized and a KL grid autoencoder, a pixel-space FlexTok (R=8), and a VQ at the wrong resolution."""
    torch.manual_seed(0)
    models = {
        "vq": GridAutoencoder(GridConfig(channels=16, bottleneck="quantized", quantizer=FSQ), resolution=16),
        "kl": GridAutoencoder(GridConfig(channels=16, bottleneck="kl"), resolution=16),
        "oned": FlexTok.from_config(FlexTokConfig(
            input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32,
            decoder_depth=1, decoder_heads=2, quantizer=FSQ, sampling=SamplingConfig(steps=2)), 16),
        "vq32": GridAutoencoder(GridConfig(channels=16, bottleneck="quantized", quantizer=FSQ), resolution=32),
    }
    models["oned"].to_target(images("train")[:8])  # what training does first: fix the target scale
    for name, model in models.items():
        model.eval().save_pretrained(root / name)
    return models


def save_codecs(root: Path, models: dict[str, torch.nn.Module]) -> None:
    train = images("train")
    codes_1d = torch.stack(models["oned"].tokenize(train)).numpy()
    BPECodec.train(codes_1d, codebook_size=40, vocab_size=48, mode="1d").save_pretrained(root / "bpe_1d")
    grids = torch.stack(models["vq"].tokenize(train)).reshape(-1, 4, 4).numpy()
    BPECodec.train(grids, codebook_size=40, vocab_size=48, mode="2d").save_pretrained(root / "bpe_grid")


def save_priors(root: Path, models: dict[str, torch.nn.Module]) -> None:
    """A class-conditional GPT on the 1D tokens, a GPT on their BPE ids, and a flow prior on KL latents."""
    torch.manual_seed(0)
    oned, kl = fingerprint_model(models["oned"]), fingerprint_model(models["kl"])
    DiscretePrior(PriorConfig(tokenizer=str(root / "oned"), num_classes=6, **SMALL_PRIOR), 40, 8,
                  tokenizer_hash=oned).save_pretrained(root / "prior_1d")
    codec = BPECodec.from_pretrained(root / "bpe_1d")
    DiscretePrior(PriorConfig(tokenizer=str(root / "oned"), tokens="bpe", bpe=str(root / "bpe_1d"), **SMALL_PRIOR),
                  codec.vocab_size, 8, variable_length=True, tokenizer_hash=oned).save_pretrained(root / "prior_bpe")
    FlowPrior(PriorConfig(tokenizer=str(root / "kl"), kind="flow", **SMALL_PRIOR), 16, 4,
              tokenizer_hash=kl).save_pretrained(root / "prior_kl")


def tokenizer_entries(root: Path) -> list[dict[str, str]]:
    return [
        {"name": "oned", "path": str(root / "oned")},
        {"name": "oned+bpe", "path": str(root / "oned"), "bpe": str(root / "bpe_1d")},
        {"name": "vq", "path": str(root / "vq")},
        {"name": "vq+bpe", "path": str(root / "vq"), "bpe": str(root / "bpe_grid")},
        {"name": "kl", "path": str(root / "kl")},
        {"name": "missing", "path": str(root / "no_such_checkpoint")},
        {"name": "wrong_res", "path": str(root / "vq32")},
    ]


def prior_entries(root: Path) -> list[dict[str, str]]:
    return [
        {"name": "prior_1d", "path": str(root / "prior_1d")},
        {"name": "prior_bpe", "path": str(root / "prior_bpe")},
        {"name": "prior_kl", "path": str(root / "prior_kl")},
    ]


def write_config(root: Path, name: str, tokenizers: list[dict], priors: list[dict], cache: str = "cache") -> Path:
    config = {
        "name": name, "out_dir": str(root / "runs"), "data": DATA,
        "eval": {
            "tokenizers": tokenizers, "priors": priors, "num_images": NUM_IMAGES, "train_images": TRAIN_IMAGES,
            "classifier_steps": 20, "adaptive_psnr": 12.0, "gfid_samples": GFID_SAMPLES, "batch_size": 8,
            "grid_rows": 4, "cache_dir": str(root / cache),
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, overrides: list[str] = ()) -> tuple[int, dict]:
    with pytest.MonkeyPatch.context() as patch:  # LPIPS only where a test passes weights
        patch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
        code = evaluate.main(["--config", str(config), *overrides])
    report = load_config(config, overrides, cls=ExperimentConfig).run_dir / "report" / "report.json"
    return code, json.loads(report.read_text())


def rows_by_key(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["mode"]): r for r in report["tokenizers"]}


def without_timings(rows: list[dict]) -> list[dict]:
    skip = ("computed", "sampling_seconds", "sampling_images_per_s")
    return [{k: v for k, v in r.items() if k not in skip} for r in rows]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[Path, dict[str, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("evaluate")
    models = save_tokenizers(root)
    save_codecs(root, models)
    save_priors(root, models)
    return root, models


@pytest.fixture(scope="module")
def first_run(artifacts) -> tuple[Path, int, dict]:
    root, _ = artifacts
    config = write_config(root, "full", tokenizer_entries(root), prior_entries(root))
    code, report = run(config)
    return config, code, report


def test_report_files_schema_and_error_rows(first_run):
    config, code, report = first_run
    assert code == 1  # the report is complete, but two entries failed
    directory = load_config(config, cls=ExperimentConfig).run_dir / "report"
    for name in ("report.json", "report.csv", "summary.md", "config.yaml"):
        assert (directory / name).is_file(), name
    for name in ("rate_distortion", "bits_distortion", "reconstructions", "samples_prior_1d", "samples_prior_bpe",
                 "samples_prior_kl", "generation", "modelability", "adaptive_lengths"):
        with Image.open(directory / f"{name}.png") as png:
            assert png.width > 100 and png.height > 50, name
    with Image.open(directory / "reconstructions.png") as png:  # 16 px images in 64 px cells, 2 px apart
        grid = np.asarray(png.convert("L"))
    columns = (grid.shape[1] - 2) // 66
    assert columns == 4 + 2 + 1  # oned at k = 1..8, vq and kl, the original
    # no column title reaches into the gaps between columns
    assert (grid[:, [66 * j + d for j in range(1, columns) for d in range(2)]] == 255).all()

    rows = rows_by_key(report)
    ks = ["k=1", "k=2", "k=4", "k=8"]
    modes_1d = ks + [f"{k} mean" for k in ks] + ["adaptive@12dB"]
    expected = [(n, m) for n in ("oned", "oned+bpe") for m in modes_1d] + [("vq", "all"), ("vq+bpe", "all"),
                                                                            ("kl", "all")]
    assert list(rows) == expected
    backbone = report["meta"]["fid"]["backbone"]
    assert backbone.startswith("dataset_classifier:") and report["meta"]["fid"]["kind"] == "dataset_classifier"
    # the held-out photographs are classes the classifier never saw: no accuracy to state
    assert report["meta"]["fid"]["classifier"]["test_accuracy"] is None
    for row in rows.values():
        assert all(math.isfinite(row[m]) for m in ("psnr", "ssim", "rfid", "tokens_per_image", "bits_per_image"))
        assert row["rfid_backbone"] == backbone
        assert (row["rfid_num_real"], row["rfid_num_fake"]) == (NUM_IMAGES, NUM_IMAGES)
        assert row["psnr_ci"][0] <= row["psnr"] <= row["psnr_ci"][1] and row["ssim_ci"][0] <= row["ssim"]
        assert math.isfinite(row["rkid"]) and row["rkid_std"] >= 0
    assert {key: row["decoding"] for key, row in rows.items() if key[0] == "oned"} == {
        ("oned", m): "mean" if m.endswith("mean") else "sample" for m in modes_1d}
    assert rows[("oned", "k=8 mean")]["decoder"]["steps"] == 1 and rows[("vq", "all")]["decoding"] == "deterministic"
    assert {r["family"] for r in rows.values()} == {"1d", "1d+bpe", "grid_vq", "grid_vq+bpe", "grid_kl"}
    # BPE is lossless: its rows show the underlying tokenizer's reconstructions
    for mode in modes_1d:
        assert rows[("oned+bpe", mode)]["psnr"] == rows[("oned", mode)]["psnr"]
    assert rows[("vq+bpe", "all")]["rfid"] == rows[("vq", "all")]["rfid"]

    priors = {r["name"]: r for r in report["priors"]}
    assert list(priors) == ["prior_1d", "prior_bpe", "prior_kl"]
    for prior in priors.values():
        assert math.isfinite(prior["gfid"]) and prior["gfid_backbone"] == backbone and math.isfinite(prior["gkid"])
        assert (prior["gfid_num_fake"], prior["gfid_num_real"]) == (GFID_SAMPLES, TRAIN_IMAGES)
        assert prior["sampling_images_per_s"] > 0 and prior["nll_images"] == NUM_IMAGES
    assert priors["prior_1d"]["nll_bits_per_image"] > 0 and priors["prior_bpe"]["nll_bits_per_image"] > 0
    assert priors["prior_kl"]["nll_bits_per_image"] is None and priors["prior_kl"]["flow_val_loss"] > 0
    # the ordered 1D stream's prior also gives the bits of each prefix k; BPE and KL streams have none
    prefix_bits = priors["prior_1d"]["nll_prefix_bits"]
    assert list(prefix_bits) == ["1", "2", "4", "8"] and list(prefix_bits.values()) == sorted(prefix_bits.values())
    assert prefix_bits["8"] == pytest.approx(priors["prior_1d"]["nll_bits_per_image"], rel=1e-5)
    assert priors["prior_bpe"]["nll_prefix_bits"] is None and priors["prior_kl"]["nll_prefix_bits"] is None
    assert priors["prior_1d"]["sampler"]["labels"] == "classes 0..5 in turn"
    kl_sampler, oned_sampler = priors["prior_kl"]["sampler"], priors["prior_1d"]["sampler"]
    assert kl_sampler["flow"] and kl_sampler["sampling"]["steps"] == 25 and kl_sampler["decoder"] is None
    assert not oned_sampler["flow"] and oned_sampler["decoder"]["steps"] == 2  # the 1D tokenizer's own setting

    errors = {e["name"]: e["error"] for e in report["errors"]}
    assert set(errors) == {"missing", "wrong_res"}
    assert "no_such_checkpoint" in errors["missing"] and "model not found" in errors["missing"]
    assert "resolution 32" in errors["wrong_res"] and "data.resolution is 16" in errors["wrong_res"]

    with open(directory / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) + 2 and {r["name"] for r in table if r["error"]} == {"missing", "wrong_res"}
    summary = (directory / "summary.md").read_text()
    assert backbone in summary and "never with Inception FID" in summary
    assert f"{GFID_SAMPLES} / {TRAIN_IMAGES}" in summary and f"first {NUM_IMAGES} images" in summary
    assert "## Errors" in summary and "`wrong_res`" in summary and "`missing`" in summary
    assert "bits of the first k tokens" in summary
    assert summary.count("| `prior_1d` |") == 1 + 4  # the priors table, then one row per prefix k


def test_bits_per_image_per_family(artifacts, first_run):
    root, models = artifacts
    rows = rows_by_key(first_run[2])
    bits_per_code = math.log2(40)
    for k in (1, 2, 4, 8):
        assert rows[("oned", f"k={k}")]["tokens_per_image"] == k
        assert rows[("oned", f"k={k}")]["bits_per_image"] == pytest.approx(k * bits_per_code)
    adaptive = rows[("oned", "adaptive@12dB")]
    assert 1 <= adaptive["tokens_min"] <= adaptive["tokens_per_image"] <= adaptive["tokens_max"] <= 8
    counts = {int(k): n for k, n in adaptive["length_counts"].items()}
    assert sum(counts.values()) == NUM_IMAGES and set(counts) <= {1, 2, 4, 8}
    assert sum(k * n for k, n in counts.items()) / NUM_IMAGES == pytest.approx(adaptive["tokens_per_image"])
    length_code = 2  # which of 4 lengths (1, 2, 4, 8)
    assert adaptive["bits_per_image"] == pytest.approx(adaptive["tokens_per_image"] * bits_per_code + length_code)
    assert rows[("vq", "all")]["bits_per_image"] == pytest.approx(16 * bits_per_code)  # 4x4 codes
    kl = rows[("kl", "all")]
    assert (kl["tokens_per_image"], kl["bits_per_image"]) == (16, 16 * 4 * 16)  # 4x4 latents, 4 channels, 16 bits
    assert "16 bits" in kl["bits_basis"] and kl["vocab_size"] is None

    held_out = images("test")[:NUM_IMAGES]
    codec_1d = BPECodec.from_pretrained(root / "bpe_1d")
    codes = models["oned"].tokenize(held_out)
    for k in (1, 2, 4, 8):
        count = np.mean([len(codec_1d.encode(c[:k].numpy())) for c in codes])
        row = rows[("oned+bpe", f"k={k}")]
        assert row["tokens_per_image"] == pytest.approx(count)
        assert row["bits_per_image"] == pytest.approx(count * math.log2(codec_1d.vocab_size))
    codec_2d = BPECodec.from_pretrained(root / "bpe_grid")
    count = np.mean([len(codec_2d.encode(g.reshape(4, 4).numpy())) for g in models["vq"].tokenize(held_out)])
    assert rows[("vq+bpe", "all")]["bits_per_image"] == pytest.approx(count * math.log2(codec_2d.vocab_size))
    assert rows[("vq+bpe", "all")]["tokens_per_image"] < 16  # merges happened: the count is post-BPE


def test_tail_diagnostics_of_the_1d_tokenizer(artifacts, first_run):
    """One tail per 1D tokenizer (not its BPE entry): R code entropies (those of the held-out codes), a PSNR
    gain per prefix step and decoding matching the rows, the prior's bits per position summing to its bits
    per image; in report.json, tail.csv, tail.png and the summary."""
    root, models = artifacts
    config, _, report = first_run
    (tail,) = report["tail"]
    assert (tail["tokenizer"], tail["registers"], tail["vocab_size"], tail["images"]) == ("oned", 8, 40, NUM_IMAGES)
    assert tail["entropy_ceiling_bits"] == pytest.approx(math.log2(NUM_IMAGES))  # 8 images < 40 codes
    codes = torch.stack(models["oned"].tokenize(images("test")[:NUM_IMAGES])).numpy()
    assert tail["code_entropy_bits"] == pytest.approx(code_entropy_bits(codes))
    rows = rows_by_key(report)
    steps = [(d["decoding"], d["k"], d["next_k"]) for d in tail["doublings"]]
    assert steps == [(dec, k, 2 * k) for dec in ("sample", "mean") for k in (1, 2, 4)]
    for d in tail["doublings"]:
        suffix = " mean" if d["decoding"] == "mean" else ""
        gain = rows[("oned", f"k={d['next_k']}{suffix}")]["psnr"] - rows[("oned", f"k={d['k']}{suffix}")]["psnr"]
        assert d["gain_db"] == pytest.approx(gain, abs=1e-4) and d["images"] == NUM_IMAGES
        assert d["gain_ci"][0] <= d["gain_db"] <= d["gain_ci"][1]
    prior_bits = tail["prior_bits"]["prior_1d"]
    assert list(tail["prior_bits"]) == ["prior_1d"] and len(prior_bits) == 8 and min(prior_bits) > 0
    prior = next(p for p in report["priors"] if p["name"] == "prior_1d")
    assert sum(prior_bits) == pytest.approx(prior["nll_bits_per_image"], rel=1e-5)
    assert all("psnr_per_image" not in r for r in report["tokenizers"])  # kept in the rows, not in the JSON

    directory = load_config(config, cls=ExperimentConfig).run_dir / "report"
    with open(directory / "tail.csv") as f:
        quantities = [r["quantity"] for r in csv.DictReader(f)]
    assert quantities == ["code_entropy_bits"] * 8 + ["prior_bits"] * 8 + ["psnr_gain_db"] * 6
    with Image.open(directory / "tail.png") as png:
        assert png.width > 100 and png.height > 50
    section = (directory / "summary.md").read_text().split("## Tail diagnostics")[1].split("\n## ")[0]
    assert "### `oned`" in section and "`prior_1d` bits/position" in section and "oned+bpe" not in section
    assert [line.split(" | ")[1] for line in section.splitlines() if line.startswith("| ")][1:] == \
        ["1", "2", "3–4", "5–8"]


def test_second_run_recomputes_nothing(first_run, monkeypatch):
    config, code, report = first_run

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached result")

    import evaluation.prior_rows as prior_rows
    import evaluation.tokenizer_rows as tokenizer_rows

    for module, names in ((tokenizer_rows, ("psnr", "ssim", "fid_from_stats")),
                          (prior_rows, ("fid_from_stats", "generate_images", "build_token_dataset"))):
        for name in names:
            monkeypatch.setattr(module, name, fail)
    for cls in (FlexTok, GridAutoencoder):
        monkeypatch.setattr(cls, "tokenize", fail)
        monkeypatch.setattr(cls, "detokenize", fail)
    again_code, again = run(config)
    assert again_code == code
    assert all(r["computed"] for r in report["tokenizers"] + report["priors"])  # the first run computed them
    assert all(r["computed"] == [] for r in again["tokenizers"] + again["priors"])
    for kind in ("tokenizers", "priors"):  # cached rows keep even the timings measured when they were computed
        assert [{**r, "computed": []} for r in report[kind]] == again[kind]


def test_a_new_tokenizer_computes_only_its_rows(artifacts, first_run):
    root, _ = artifacts
    torch.manual_seed(1)
    GridAutoencoder(GridConfig(channels=16, bottleneck="quantized", quantizer=FSQ), resolution=16).eval() \
        .save_pretrained(root / "vq_other")
    entries = tokenizer_entries(root) + [{"name": "vq_other", "path": str(root / "vq_other")}]
    _, report = run(write_config(root, "more", entries, []))
    computed = {r["name"]: r["computed"] for r in report["tokenizers"]}
    assert computed.pop("vq_other") == ["rate", "psnr", "ssim", "rfid", "preview"]
    assert all(c == [] for c in computed.values())


def test_results_are_deterministic_for_a_seed(artifacts, first_run):
    """A fresh cache (the dataset classifier retrained too) reproduces every number but timings."""
    root, _ = artifacts
    entries = [e for e in tokenizer_entries(root) if e["name"] in ("oned", "vq")]
    priors = [e for e in prior_entries(root) if e["name"] == "prior_1d"]
    _, fresh = run(write_config(root, "fresh", entries, priors, cache="cache_fresh"))
    first = first_run[2]
    assert fresh["meta"]["fid"]["backbone"] == first["meta"]["fid"]["backbone"]
    assert all(r["computed"] for r in fresh["tokenizers"])
    kept = [r for r in first["tokenizers"] if r["name"] in ("oned", "vq")]
    assert without_timings(fresh["tokenizers"]) == without_timings(kept)
    assert without_timings(fresh["priors"]) == without_timings(first["priors"][:1])


def test_lpips_is_measured_when_local_weights_are_given(artifacts, first_run):
    root, _ = artifacts
    assert all(r["lpips"] is None for r in first_run[2]["tokenizers"]) and first_run[2]["meta"]["lpips"] is None
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.rand if key.startswith("lins.") else torch.randn)(shape, generator=generator) * 0.05
             for key, shape in lpips_state_dict_shapes().items()}  # non-negative lins, as trained ones are
    LPIPS(state).save_weights(root / "lpips.safetensors")
    config = write_config(root, "lpips", [{"name": "vq", "path": str(root / "vq")}], [])
    code, report = run(config, overrides=[f"eval.lpips_weights={root / 'lpips.safetensors'}"])
    (row,) = report["tokenizers"]
    assert code == 0 and row["lpips"] > 0 and row["computed"] == ["lpips"]  # the other metrics were cached
    assert report["meta"]["lpips"]["weights"] == str(root / "lpips.safetensors")


def test_a_saved_classifier_is_the_backbone_of_every_rerun(artifacts, first_run, capsys):
    """eval.fid_classifier: no classifier is trained; two fresh caches give the same backbone and rFID."""
    root, _ = artifacts
    torch.manual_seed(3)
    DatasetClassifier(ClassifierConfig(num_classes=2, width=8, feature_dim=16)).save_pretrained(root / "fid_net")
    entries = [{"name": "vq", "path": str(root / "vq")}]
    reports = [run(write_config(root, f"saved{i}", entries, [], cache=f"cache_saved{i}"),
                   [f"eval.fid_classifier={root / 'fid_net'}"])[1] for i in range(2)]
    backbones = {r["meta"]["fid"]["backbone"] for r in reports}
    assert len(backbones) == 1 and backbones.pop().startswith("dataset_classifier:weights-")
    assert reports[0]["meta"]["fid"]["classifier"]["saved"] == str(root / "fid_net")
    assert reports[0]["tokenizers"][0]["rfid"] == reports[1]["tokenizers"][0]["rfid"]
    assert reports[0]["meta"]["fid"]["backbone"] != first_run[2]["meta"]["fid"]["backbone"]
    config = write_config(root, "not_a_classifier", entries, [], cache="cache_saved0")
    assert evaluate.main(["--config", str(config), f"eval.fid_classifier={root / 'vq'}"]) == 2
    assert "eval.fid_classifier" in capsys.readouterr().err


def test_fid_seeds_give_each_fid_its_spread_over_backbones(artifacts, first_run):
    root, _ = artifacts
    entries = [{"name": "vq", "path": str(root / "vq")}]
    priors = [e for e in prior_entries(root) if e["name"] == "prior_1d"]
    config = write_config(root, "spread", entries, priors)  # the first run's cache: its first backbone is reused
    code, report = run(config, ["eval.fid_seeds=3"])
    (row,), (prior,) = report["tokenizers"], report["priors"]
    first = {r["name"]: r for r in first_run[2]["tokenizers"]}["vq"]
    assert code == 0 and len(report["meta"]["fid"]["spread_backbones"]) == 2
    assert len(row["rfid_backbones"]) == 3 and row["rfid_backbones"][0] == row["rfid"] == first["rfid"]
    assert len(set(row["rfid_backbones"])) == 3  # other seeds, other classifiers, other FIDs
    assert len(prior["gfid_backbones"]) == 3 and prior["gfid_backbones"][0] == prior["gfid"]
    summary = (config.parent / "runs" / "spread" / "report" / "summary.md").read_text()
    assert "2 more classifiers" in summary and "backbones)" in summary
    assert evaluate.main(["--config", str(config), "eval.fid_seeds=2", f"eval.fid_classifier={root / 'vq'}"]) == 2


@pytest.mark.parametrize("entry, message", [
    ({"name": "a"}, "'eval.tokenizers[0].path' must be set"),
    ({"name": "a b", "path": "x"}, "'eval.tokenizers[0].name' must be"),
    ({"name": "a", "path": "x", "colour": 1}, "unknown key 'eval.tokenizers[0].colour'"),
])
def test_config_errors_name_the_key(tmp_path, entry, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"eval": {"tokenizers": [entry]}}))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, cls=ExperimentConfig)
    assert evaluate.main(["--config", str(path)]) == 2


def test_duplicate_names_and_empty_config_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump({"eval": {"tokenizers": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}}))
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(path, cls=ExperimentConfig)
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"name": "e", "out_dir": str(tmp_path)}))
    assert evaluate.main(["--config", str(empty)]) == 2
