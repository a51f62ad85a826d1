"""The codec rows of the evaluation (`evaluation.codec_rows`): our codec and JPEG/WebP on whole held-out images,
bits per pixel from real file bytes, file size against the prior's NLL, the lowest-rate verdict, the report's
codec table and plots, and the cache. Tiny untrained models: the measurement, not the quality, is under test."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from base.config import load_config, save_config
from base.data import tensor_to_uint8
from base.errors import ConfigError
from base.fingerprint import fingerprint_model
from base.schema import SamplingConfig
from codec import OVERHEAD_BYTES, CodecSettings, ImageCodec
from evaluation.codec_rows import (
    BASELINES,
    CodecImages,
    lowest_rate_verdict,
    patches,
    run_codec,
)
from evaluation.context import EvalContext
from evaluation.report import write_report
from evaluation.rows import EvaluationResult
from evaluation.run import describe_run
from evaluation.schema import ExperimentConfig
from flextok import FlexTok
from flextok.schema import FlexTokConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig, QuantizerConfig
from priors import DiscretePrior, PriorConfig

DATA = {"source": "builtin:skimage", "resolution": 16, "crops_per_photo": 4, "eval_crops_per_photo": 4}
FSQ = QuantizerConfig(fsq_levels=[8, 5])  # 40 codes
SMALL_PRIOR = dict(dim=32, depth=1, heads=2)
JPEG_QUALITIES = [1, 10, 50, 90]
CODEC = {"priors": ["prior_1d", "prior_grid"], "ks": [1, 2, 8], "target_psnrs": [8.5],
         "jpeg_qualities": JPEG_QUALITIES, "webp_qualities": [0, 50], "num_images": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A 1D tokenizer and a grid FSQ autoencoder at 16 px, an (untrained) prior over each, and an eval config."""
    root = tmp_path_factory.mktemp("codec_eval")
    torch.manual_seed(0)
    oned = FlexTok.from_config(FlexTokConfig(
        input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32, decoder_depth=1,
        decoder_heads=2, quantizer=FSQ, sampling=SamplingConfig(steps=2)), 16)
    oned.to_target(torch.rand(8, 3, 16, 16) * 2 - 1)  # what training does first: fix the target scale
    vq = GridAutoencoder(GridConfig(channels=16, bottleneck="quantized", quantizer=FSQ), resolution=16)
    for name, model in (("oned", oned), ("vq", vq)):
        model.eval().save_pretrained(root / name)
    DiscretePrior(PriorConfig(tokenizer=str(root / "oned"), **SMALL_PRIOR), 40, 8,
                  tokenizer_hash=fingerprint_model(oned)).save_pretrained(root / "prior_1d")
    DiscretePrior(PriorConfig(tokenizer=str(root / "vq"), **SMALL_PRIOR), 40, 16,
                  tokenizer_hash=fingerprint_model(vq)).save_pretrained(root / "prior_grid")
    write_config(root)
    return root


def write_config(root: Path, **codec) -> Path:
    priors = [{"name": n, "path": str(root / n)} for n in ("prior_1d", "prior_grid")]
    config = {"name": "codec", "out_dir": str(root / "runs"), "data": DATA, "eval": {
        "priors": priors, "num_images": 8, "train_images": 24, "classifier_steps": 10, "batch_size": 8,
        "cache_dir": str(root / "cache"), "codec": {**CODEC, **codec}}}
    path = root / "codec.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluate_codec(root: Path, **codec) -> tuple[EvalContext, EvaluationResult]:
    cfg = load_config(write_config(root, **codec), cls=ExperimentConfig)
    ctx = EvalContext(cfg, progress=False)
    result = EvaluationResult(describe_run(cfg, ctx), ctx.held_out.images[:1])
    run_codec(ctx, result)
    return ctx, result


@pytest.fixture(scope="module")
def first(root):
    ctx, result = evaluate_codec(root)
    paths = write_report(result, root / "report")
    return ctx, result, paths


def rows_of(result, name):
    return {r.setting: r for r in result.codec_rows if r.name == name}


def test_rows_for_every_family_from_real_bytes(first):
    ctx, result, _ = first
    assert not result.errors, result.errors
    assert set(rows_of(result, "prior_1d")) == {"k=1", "k=2", "k=8", "adaptive@8.5dB"}
    assert set(rows_of(result, "prior_grid")) == {"all"}
    assert {r.family for r in result.codec_rows} == {"1d", "grid_vq", "jpeg", "webp"}
    images = CodecImages(ctx)
    assert images.pixels == 8 * 16 * 16 and all(r.images == 8 and r.pixels == images.pixels for r in result.codec_rows)
    jpeg = rows_of(result, "jpeg")["q=10"]  # the same files again, their bytes counted here
    fmt, options = BASELINES["jpeg"]
    total = 0
    for x, gray in zip(images.images, images.gray):
        buffer = io.BytesIO()
        img = Image.fromarray(tensor_to_uint8(x[None])[0])
        (img.convert("L") if gray else img).save(buffer, format=fmt, quality=10, **options)
        total += len(buffer.getvalue())
    assert jpeg.file_bytes == total and jpeg.bits_per_pixel == pytest.approx(8 * total / images.pixels)
    codec = ImageCodec.open(ctx.settings.priors[0].path)
    ours = sum(len(codec.compress_image(x, g, CodecSettings(k=2))[0]) for x, g in zip(images.images, images.gray))
    assert rows_of(result, "prior_1d")["k=2"].file_bytes == ours


def test_jpeg_bits_fall_with_quality(first):
    _, result, _ = first
    jpeg = rows_of(result, "jpeg")
    bpp = [jpeg[f"q={q}"].bits_per_pixel for q in JPEG_QUALITIES]
    assert bpp == sorted(bpp) and bpp[0] < bpp[-1], bpp
    assert jpeg["q=1"].psnr < jpeg["q=90"].psnr


def test_our_bytes_are_the_prior_nll_plus_header(first):
    _, result, _ = first
    ours = [r for r in result.codec_rows if r.ours]
    k8 = rows_of(result, "prior_1d")["k=8"]
    assert rows_of(result, "prior_1d")["k=1"].file_bytes < k8.file_bytes
    for r in ours:
        assert r.header_bytes == OVERHEAD_BYTES and r.round_trip_exact == r.images
        payload_bits = 8 * (r.file_bytes - r.images * OVERHEAD_BYTES)
        assert payload_bits - r.model_bits == pytest.approx(r.payload_overhead_bits)
        # the range coder: within 1% of the model's bits, plus at most two 32-bit words to end each file
        assert -0.01 * r.model_bits <= r.payload_overhead_bits <= 0.01 * r.model_bits + 64 * r.images, r
        assert r.encode_images_per_s > 0 and r.decode_tiles_per_s > 0 and r.matmul_gflops > 0


def test_summary_states_the_lowest_rate_verdict_and_plots_exist(first, root):
    _, result, paths = first
    verdict = lowest_rate_verdict(result.codec_rows)
    jpeg_floor = min(r.bits_per_pixel for r in result.codec_rows if r.family == "jpeg")
    assert verdict["jpeg"]["setting"] == "q=1" and verdict["jpeg"]["bits_per_pixel"] == jpeg_floor
    cheaper = [r for r in result.codec_rows if r.ours and r.bits_per_pixel <= jpeg_floor]
    assert verdict["best"]["rfid"] == min(r.rfid for r in cheaper)  # untrained models: all ours are cheaper
    summary = (root / "report" / "summary.md").read_text()
    outcome = "met" if verdict["met"] else "not met"
    assert f"Lowest-rate target **{outcome}**" in summary and "## Codec" in summary
    assert re.search(r"\d+/\d+ files decoded to bit-exact tokens", summary)
    for name in ("codec_rate_distortion.png", "codec_examples.png", "codec.csv"):
        assert (root / "report" / name) in paths and (root / "report" / name).stat().st_size > 0, name
    assert len((root / "report" / "codec.csv").read_text().splitlines()) == 1 + len(result.codec_rows)


def test_second_run_hits_the_cache(first, root):
    _, result, _ = first
    _, again = evaluate_codec(root)
    assert [r.computed for r in again.codec_rows] == [[] for _ in again.codec_rows]
    assert [r.flat() | {"computed": None} for r in again.codec_rows] == \
        [r.flat() | {"computed": None} for r in result.codec_rows]


def test_photos_need_a_photo_source_one_line_error(root):
    _, result = evaluate_codec(root, images="photos")
    (error,) = result.errors
    assert error.kind == "codec" and "data.source photos:<manifest>" in error.error and "\n" not in error.error


def test_codec_priors_must_name_eval_priors(root):
    with pytest.raises(ConfigError, match="codec.priors"):
        load_config(write_config(root, priors=["nope"]), cls=ExperimentConfig)


def test_patches_are_non_overlapping_tiles():
    image = torch.arange(3 * 40 * 50, dtype=torch.float32).reshape(3, 40, 50)
    tiles = patches(image, 16)
    assert tiles.shape == (2 * 3, 3, 16, 16)
    assert torch.equal(tiles[4], image[:, 16:32, 16:32])  # row 1, column 1 in raster order


def test_studies_measure_the_codec_of_every_discrete_prior(tmp_path):
    import study

    discrete = ["prior_1d", "prior_1d_set", "prior_1d_bpe", "prior_fsq_f4_1000", "prior_fsq_f8_1000",
                "prior_fsq_f8_64"]
    for name, images in (("study_fmnist", "held_out"), ("study_photos", "photos")):
        config, experiment = study.load_study(Path(study.ROOT) / "configs" / f"{name}.yaml")
        stages, _ = study.study_stages(config, experiment, [])
        save_config(stages[-1].resolved(1.0), tmp_path / "eval.yaml")  # the file evaluate.py is given
        cfg = load_config(tmp_path / "eval.yaml", cls=ExperimentConfig)
        assert cfg.eval.codec.priors == discrete and cfg.eval.codec.images == images
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": str(Path(study.ROOT) / "configs/fmnist.yaml"), "stages": [
        {"name": "t", "kind": "tokenizer", "steps": 2}], "codec_priors": ["t"]}))
    with pytest.raises(ConfigError, match="codec_priors"):
        study.load_study(bad)
