"""Writes an `EvaluationResult` as runs/<name>/report/: report.json, report.csv, summary.md, the
rate-distortion plots and the image grids.

Every FID in a report comes from one backbone (the cache keys include its name), and each table, axis
label and JSON row names it, so a dataset-classifier FID can never pass for an Inception FID.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from base.files import atomic_write_text
from base.visualize import class_columns, save_image_grid

from .ablation import Comparison, comparisons
from .ablation import csv_rows as ablation_csv_rows
from .plots import (
    plot_ablation,
    plot_adaptive_lengths,
    plot_codec_rate_distortion,
    plot_generation,
    plot_modelability,
    plot_tail,
    plot_tradeoff,
    save_codec_examples,
    save_reconstruction_grid,
)
from .rows import CodecRow, EvaluationResult, PriorRow, SamplerSettings, TokenizerRow
from .tail import TailDiagnostics, csv_rows, group_means, position_groups, tail_diagnostics

__all__ = ["summary_markdown", "write_report"]

CSV_COLUMNS = (
    "name", "family", "mode", "decoding", "k", "target_psnr", "tokens_per_image", "tokens_min", "tokens_max",
    "bits_per_token", "bits_per_image", "bits_basis", "vocab_size", "psnr", "psnr_ci_low", "psnr_ci_high", "ssim",
    "ssim_ci_low", "ssim_ci_high", "rfid", "rfid_backbone", "rfid_num_real", "rfid_num_fake", "rkid", "rkid_std",
    "lpips", "target_met", "decoder_steps", "decoder_guidance_scale", "decoder_guidance_interval", "path", "bpe",
    "error",
)


def write_report(result: EvaluationResult, directory: str | Path) -> list[Path]:
    """Write every report file into `directory`; returns their paths."""
    directory = Path(directory)
    rows = result.tokenizer_rows
    backbone = result.meta["fid"]["backbone"]
    compared, tails = comparisons(result), tail_diagnostics(result)  # bootstraps: computed once for every file
    paths = [
        atomic_write_text(directory / "report.json", json.dumps(_json_report(result, compared, tails), indent=2)),
        atomic_write_text(directory / "report.csv", _csv_text(result)),
        atomic_write_text(directory / "summary.md", summary_markdown(result, compared=compared, tails=tails)),
    ]
    if rows:
        paths.append(plot_tradeoff(rows, "tokens_per_image", "tokens per image", backbone,
                                   directory / "rate_distortion.png"))
        paths.append(plot_tradeoff(rows, "bits_per_image", "bits per image", backbone,
                                   directory / "bits_distortion.png"))
        paths.append(save_reconstruction_grid(result, directory / "reconstructions.png"))
        if any(r.adaptive for r in rows):
            paths.append(plot_adaptive_lengths(rows, directory / "adaptive_lengths.png"))
    if result.prior_rows:
        paths.append(plot_generation(result.prior_rows, backbone, directory / "generation.png"))
        if rows and any(r.nll_bits_per_image is not None for r in result.prior_rows):
            paths.append(plot_modelability(result, directory / "modelability.png"))
    if tails:
        paths.append(atomic_write_text(directory / "tail.csv", _tail_csv_text(tails)))
        paths.append(plot_tail(tails, directory / "tail.png"))
    if compared:
        paths.append(atomic_write_text(directory / "ablation.csv", _ablation_csv_text(compared)))
        paths.append(plot_ablation(compared, directory / "ablation.png"))
    if result.codec_rows:
        paths.append(atomic_write_text(directory / "codec.csv", _codec_csv_text(result)))
        paths.append(plot_codec_rate_distortion(result.codec_rows, backbone, result.codec_meta["tile"],
                                                directory / "codec_rate_distortion.png"))
        if any(r.family == "jpeg" for r in result.codec_rows):
            paths.append(save_codec_examples(result, directory / "codec_examples.png"))
    for stale in directory.glob("samples_*.png"):  # grids of priors no longer in the config
        if stale.stem.removeprefix("samples_") not in result.samples:
            stale.unlink()
    for name, (samples, labels) in result.samples.items():
        columns, titles = class_columns(samples, labels)
        paths.append(save_image_grid(columns, directory / f"samples_{name}.png", titles))
    return paths


def _json_report(result: EvaluationResult, compared: list[Comparison],
                 tails: list[TailDiagnostics]) -> dict[str, Any]:
    rows = lambda items: [dataclasses.asdict(item) for item in items]  # noqa: E731
    tokenizers = [{k: v for k, v in row.items() if k != "psnr_per_image"} for row in rows(result.tokenizer_rows)]
    priors = [{k: v for k, v in row.items() if k != "nll_per_image"} for row in rows(result.prior_rows)]
    ablation = [{k: v for k, v in row.items() if k != "full"} for row in rows(compared)]
    return {"meta": result.meta, "tokenizers": tokenizers, "priors": priors,
            "codec": {**result.codec_meta, "rows": rows(result.codec_rows)}, "errors": rows(result.errors),
            "tail": rows(tails), "ablation": ablation}


def _csv_text(result: EvaluationResult) -> str:
    """One row per tokenizer x mode; failed entries and rows too, with their error."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(row.flat() for row in result.tokenizer_rows)
    writer.writerows(dataclasses.asdict(e) for e in result.errors if e.kind == "tokenizer")
    return buffer.getvalue()


TAIL_CSV_COLUMNS = ("tokenizer", "quantity", "source", "position", "k", "next_k", "value", "ci_low", "ci_high")


def _tail_csv_text(tails: list[TailDiagnostics]) -> str:
    """Long format: per tokenizer, one row per position and quantity (code entropy, each prior's bits), one
    per prefix step and decoding (PSNR gained)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, TAIL_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(row for tail in tails for row in csv_rows(tail))
    return buffer.getvalue()


ABLATION_CSV_COLUMNS = ("tokenizer", "baseline", "quantity", "decoding", "k", "value", "ci_low", "ci_high", "images")


def _ablation_csv_text(compared: list[Comparison]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ABLATION_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(row for comparison in compared for row in ablation_csv_rows(comparison))
    return buffer.getvalue()


CODEC_CSV_COLUMNS = (
    "name", "family", "setting", "k", "target_psnr", "quality", "images", "pixels", "patches", "file_bytes",
    "bits_per_pixel", "psnr", "psnr_ci_low", "psnr_ci_high", "ssim", "ssim_ci_low", "ssim_ci_high", "rfid",
    "rfid_backbone", "rkid", "rkid_std", "lpips", "model_bits", "payload_overhead_bits", "header_bytes",
    "round_trip_exact", "encode_images_per_s", "decode_images_per_s", "encode_tiles_per_s", "decode_tiles_per_s",
    "matmul_gflops", "error",
)


def _codec_csv_text(result: EvaluationResult) -> str:
    """The codec table (its own columns, so its own file): one row per codec setting, failures with their error."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CODEC_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(row.flat() for row in result.codec_rows)
    writer.writerows({"name": e.name, "setting": e.mode, "error": e.error} for e in result.errors if e.kind == "codec")
    return buffer.getvalue()


def _fmt(value: Any, spec: str) -> str:
    """A number for a table cell; a dash where nothing was measured."""
    return "—" if value is None else format(value, spec)


def _fid_text(value: float | None, backbones: list[float] | None) -> str:
    """A FID, with its standard deviation over the eval.fid_seeds backbones where there are several."""
    if value is None:
        return "—"
    if not backbones:
        return f"{value:.2f}"
    spread = float(np.std(backbones, ddof=1))
    return f"{value:.2f} (sd {spread:.2f}, {len(backbones)} backbones)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _decoder_text(decoder) -> str:
    text = f"{decoder.steps} steps, guidance {decoder.guidance_scale:g}"
    low, high = decoder.guidance_interval
    guided = decoder.guidance_scale not in (0.0, 1.0)
    return text + (f" at t in [{low:g}, {high:g}]" if guided and (low, high) != (0.0, 1.0) else "")


def _tokenizer_table(rows: list[TokenizerRow]) -> str:
    header = ["tokenizer", "family", "mode", "decoding", "tokens/img", "bits/img", "bits counted as",
              "PSNR dB [95% CI]", "SSIM [95% CI]", "LPIPS", "rFID", "rKID", "decoder"]
    body = []
    for r in rows:
        tokens = f"{r.tokens_per_image:.2f}".removesuffix(".00")
        tokens += f" ({r.tokens_min}–{r.tokens_max})" if r.tokens_min != r.tokens_max else ""
        psnr = f"{r.psnr:.2f} [{r.psnr_ci[0]:.2f}, {r.psnr_ci[1]:.2f}]"
        psnr += f" (target met {r.target_met:.0%})" if r.adaptive else ""
        ssim = f"{r.ssim:.3f} [{r.ssim_ci[0]:.3f}, {r.ssim_ci[1]:.3f}]"
        decoder = _decoder_text(r.decoder) if r.decoder else "—"
        body.append([f"`{r.name}`", r.family, r.mode, r.decoding, tokens, _fmt(r.bits_per_image, ".0f"),
                     r.bits_basis, psnr, ssim, _fmt(r.lpips, ".3f"), _fid_text(r.rfid, r.rfid_backbones),
                     f"{r.rkid:.3g} ± {r.rkid_std:.2g}", decoder])
    return _table(header, body)


def _sampler_text(s: SamplerSettings) -> str:
    parts = [s.labels]
    if s.labels != "unconditional":
        parts.append(f"guidance {s.sampling.guidance_scale:g}")
    if s.flow:
        parts.append(f"{s.sampling.steps} Euler steps")
    else:
        parts.append(f"temperature {s.sampling.temperature:g}, top-k {s.sampling.top_k}, top-p {s.sampling.top_p:g}")
    if s.decoder is not None:
        parts.append(f"decoder {_decoder_text(s.decoder)}")
    return "; ".join(parts + [f"seed {s.seed}, batch {s.batch_size}"])


def _prior_table(rows: list[PriorRow]) -> str:
    header = ["prior", "tokens of", "held-out NLL bits/img", "tokens/img", "gFID", "gKID", "samples / reference",
              "images/s", "sampler"]
    body = []
    for r in rows:
        flow = r.nll_bits_per_image is None
        nll = f"— (flow prior; velocity loss {r.flow_val_loss:.4f})" if flow else f"{r.nll_bits_per_image:.1f}"
        source = f"{r.tokenizer_family} ({r.tokens}{', ' + r.bpe if r.bpe else ''})"
        body.append([f"`{r.name}`", source, f"{nll} (n={r.nll_images})", _fmt(r.tokens_per_image, ".1f"),
                     _fid_text(r.gfid, r.gfid_backbones), f"{r.gkid:.3g} ± {r.gkid_std:.2g}",
                     f"{r.gfid_num_fake} / {r.gfid_num_real}",
                     _fmt(r.sampling_images_per_s, ".1f"), _sampler_text(r.sampler)])
    return _table(header, body)


def _prefix_table(result: EvaluationResult) -> str:
    """Per ordered 1D prior and prefix k: the bits of the first k tokens beside the reconstruction from them."""
    header = ["prior", "k", "held-out bits of the first k tokens", "tokens x log2(vocab)", "PSNR dB", "decoding"]
    body = [[f"`{prior.name}`", str(k), f"{bits:.1f}", _fmt(row.bits_per_image, ".0f"), f"{row.psnr:.2f}", row.decoding]
            for prior in result.prior_rows for k, bits, row in result.prefix_points(prior)]
    return _table(header, body) if body else ""


def _codec_table(rows: list[CodecRow]) -> str:
    header = ["codec", "family", "setting", "bits/pixel", "bytes/image", "PSNR dB [95% CI]", "SSIM [95% CI]",
              "LPIPS", "patch FID", "patch KID", "payload - NLL (bits/file)", "exact round trips",
              "encode img/s (tiles/s)", "decode img/s (tiles/s)"]
    body = []
    for r in sorted(rows, key=lambda r: (r.name, r.bits_per_pixel)):
        per_file = "—" if r.model_bits is None else f"{r.payload_overhead_bits / r.images:+.1f} (+{r.header_bytes} B)"
        exact = "—" if r.round_trip_exact is None else f"{r.round_trip_exact}/{r.images}"
        speed = lambda images, tiles: f"{images:.1f}" + ("" if tiles is None else f" ({tiles:.0f})")  # noqa: E731
        body.append([f"`{r.name}`", r.family, r.setting, f"{r.bits_per_pixel:.4g}", f"{r.file_bytes / r.images:.1f}",
                     f"{r.psnr:.2f} [{r.psnr_ci[0]:.2f}, {r.psnr_ci[1]:.2f}]",
                     f"{r.ssim:.3f} [{r.ssim_ci[0]:.3f}, {r.ssim_ci[1]:.3f}]", _fmt(r.lpips, ".3f"), f"{r.rfid:.2f}",
                     f"{r.rkid:.3g} ± {r.rkid_std:.2g}", per_file, exact,
                     speed(r.encode_images_per_s, r.encode_tiles_per_s),
                     speed(r.decode_images_per_s, r.decode_tiles_per_s)])
    return _table(header, body)


def _codec_verdict(verdict: dict[str, Any] | None) -> str:
    """The issue's lowest-rate target, said in words: met or not."""
    if verdict is None:
        return "- Lowest-rate target: not assessed (no JPEG row)."
    j, best = verdict["jpeg"], verdict["best"]
    at = f"JPEG's lowest rate ({j['setting']}: {j['bits_per_pixel']:.4g} bpp, patch FID " \
         f"{j['rfid']:.2f}, KID {j['rkid']:.3g})"
    if best is None:
        line = f"- Lowest-rate target **not met**: no codec here reaches {at} or fewer bits."
    else:
        outcome = "met" if verdict["met"] else "not met"
        line = (f"- Lowest-rate target **{outcome}**: at {at}, the best codec here at no more bits is `{best['name']}` "
                f"{best['setting']} ({best['bits_per_pixel']:.4g} bpp, patch FID {best['rfid']:.2f}, KID "
                f"{best['rkid']:.3g}); met means both its patch FID and KID are no worse than JPEG's.")
    below = verdict["below_jpeg_floor"]
    line += (f" Below JPEG's lowest rate, {len(below)} setting(s) here still give a valid image from a bit-exact "
             f"round trip ({', '.join(below)})." if below else " No setting here goes below JPEG's lowest rate.")
    return line


def _codec_section(result: EvaluationResult) -> list[str]:
    meta, rows = result.codec_meta, result.codec_rows
    ours = [r for r in rows if r.ours]
    source = ("the held-out images as they are" if meta["images"] == "held_out" else
              f"the held-out photographs, whole, resized to a long side of {meta['max_side']} px (Lanczos)")
    lines = ["## Codec", "",
             f"- Images: {meta['count']} whole images, {source}, {meta['pixels']} pixels in all ({meta['gray']} "
             "grayscale: coded as L by JPEG and WebP's input); every codec's input and reference are the same 8-bit "
             "pixels. Bits per pixel: 8 x whole-file bytes / pixels.",
             f"- Patch FID/KID: the non-overlapping {meta['tile']} px tiles of the reconstructions against the same "
             f"tiles of the originals ({rows[0].patches} tiles), with the eval's FID backbone. PSNR, SSIM and LPIPS "
             "are per whole image.",
             "- JPEG: Pillow with optimized Huffman tables (4:2:0 chroma); WebP: Pillow, method 6. Ours: "
             "`codec.ImageCodec` over each prior's tokens, posterior-mean decoding."]
    if ours:
        model = sum(r.model_bits for r in ours)
        overhead = sum(r.payload_overhead_bits for r in ours)
        files = sum(r.images for r in ours)
        exact = sum(r.round_trip_exact for r in ours)
        gflops = next((r.matmul_gflops for r in ours if r.matmul_gflops), None)
        lines += [f"- Size against the prior: over {files} files, payload bits - the prior's NLL bits of the same "
                  f"tokens = {overhead:+.0f} bits ({overhead / model:+.2%} of {model:.0f}; "
                  f"{overhead / files:+.1f} bits per file), plus a {ours[0].header_bytes}-byte header and CRC per "
                  f"file. Round trip: {exact}/{files} files decoded to bit-exact tokens.",
                  f"- Speed (encode: tokenize + prior + range coder; decode: range decoder + prior + decoder, no PNG): "
                  f"on {result.meta['device']} with {result.meta['torch_threads']} torch threads, matmul "
                  f"{_fmt(gflops, '.0f')} GFLOP/s; only meaningful when the evaluation ran alone."]
    return lines + [_codec_verdict(meta["verdict"]), "", _codec_table(rows), "",
                    "Plots: `codec_rate_distortion.png`, `codec_examples.png`; all columns in `codec.csv`.", ""]


def _tail_table(tail: TailDiagnostics) -> str:
    """One row per prefix step k -> 2k: the positions it adds, the PSNR it gains per decoding, and those
    positions' code entropy and prior bits (each averaged over the positions)."""
    decodings = list(dict.fromkeys(d.decoding for d in tail.doublings))
    gains = {(d.decoding, d.k, d.next_k): d for d in tail.doublings}
    header = ["step", "positions", *[f"dB gained, {d} [95% CI]" for d in decodings]]
    columns = ([["code entropy bits/position", tail.code_entropy_bits]] if tail.code_entropy_bits else [])
    columns += [[f"`{prior}` bits/position", bits] for prior, bits in tail.prior_bits.items()]
    header += [name for name, _ in columns]
    means = [group_means(values, tail.registers) for _, values in columns]
    body = []
    for i, (first, last) in enumerate(position_groups(tail.registers)):
        cells = ["k = 1" if first == 1 else f"{first - 1} → {last}", str(first) if first == last else f"{first}–{last}"]
        for decoding in decodings:
            d = gains.get((decoding, first - 1, last))
            cells.append("—" if d is None else f"{d.gain_db:+.2f} [{d.gain_ci[0]:+.2f}, {d.gain_ci[1]:+.2f}]")
        body.append(cells + [f"{values[i]:.2f}" for values in means])
    return _table(header, body)


def _tail_section(tails: list[TailDiagnostics]) -> list[str]:
    lines = ["## Tail diagnostics", "",
             "What each further register of a 1D tokenizer buys and costs on the held-out images. Per step k → 2k: "
             "the PSNR gained (mean over images; 95% paired bootstrap interval, both rows' per-image PSNRs "
             "resampled together), and for the positions the step adds, their plug-in code entropy (each "
             "position's histogram of held-out codes) and each prior's held-out bits, averaged over those "
             "positions. Every position's values: `report.json` (`tail`) and `tail.csv`; plot: `tail.png`.", ""]
    for tail in tails:
        lines += [f"### `{tail.tokenizer}`", "",
                  f"{tail.registers} registers, {tail.vocab_size} codes (log2 V = {tail.codebook_bits:.2f} bits); "
                  f"from {tail.images} held-out images a plug-in entropy shows at most "
                  f"{tail.entropy_ceiling_bits:.2f} bits.", "", _tail_table(tail), ""]
    return lines


def _interval_text(value: float, ci: list[float] | None, spec: str, sign: str = "") -> str:
    return f"{value:{sign}{spec}} [{ci[0]:{sign}{spec}}, {ci[1]:{sign}{spec}}]" if ci else f"{value:{sign}{spec}}"


def _ablation_section(compared: list[Comparison]) -> list[str]:
    """Two tables: reconstruction (PSNR differences at the baseline's longest three prefixes and full-length
    samples, each doubling's gain, rFID/rKID) and modelability, generation and training cost."""
    baseline = compared[0]
    main = "mean" if any(d.decoding == "mean" for d in baseline.doublings) else "deterministic"
    ks = sorted({e.k for c in compared for e in c.effects if e.decoding == main and e.k is not None})[-3:]
    samples_k = max((e.k for c in compared for e in c.effects if e.decoding == "sample" and e.k), default=None)
    points = [(main, k) for k in ks] + ([("sample", samples_k)] if samples_k else [])
    if any(e.decoding == main and e.k is None for c in compared for e in c.effects):  # single-rate entries
        points.insert(0, (main, None))
    steps = [d for d in baseline.doublings if d.decoding == main][-2:]
    header = ["entry", *[f"{d} k={k}" if k else f"{d}, full" for d, k in points],
              *[f"{d.k} → {d.next_k} ({main})" for d in steps],
              "rFID (full)", "rKID (full)"]
    base_psnr = {(e.decoding, e.k): e.baseline_psnr for c in compared for e in c.effects}
    body = []
    for c in compared:
        effects = {(e.decoding, e.k): e for e in c.effects}
        cells = [f"`{c.tokenizer}`"]
        for key in points:
            e = effects.get(key)
            if c is baseline:  # its own PSNR
                cells.append(_fmt(base_psnr.get(key), ".2f"))
            else:
                cells.append("—" if e is None else _interval_text(e.delta_db, e.delta_ci, ".2f", "+"))
        gains = {(d.k, d.next_k): d for d in c.doublings if d.decoding == main}
        for step in steps:
            d = gains.get((step.k, step.next_k))
            cells.append("—" if d is None else _interval_text(d.gain_db, d.gain_ci, ".2f", "+"))
        full = c.full
        cells += ["—" if full is None else _fid_text(full.rfid, full.rfid_backbones),
                  "—" if full is None else f"{full.rkid:.3g} ± {full.rkid_std:.2g}"]
        body.append(cells)
    cost_header = ["entry", "prior", "held-out bits/img [95% CI]", "Δ bits [paired 95% CI]", "gFID", "gKID",
                   "steps", "training images", "step seconds", "images/s", "matmul GFLOP/s"]
    cost = []
    for c in compared:
        t = c.training or {}
        cost.append([f"`{c.tokenizer}`", f"`{c.prior}`" if c.prior else "—",
                     "—" if c.nll_bits is None else _interval_text(c.nll_bits, c.nll_ci, ".1f"),
                     "—" if c.nll_delta_bits is None else _interval_text(c.nll_delta_bits, c.nll_delta_ci, ".1f", "+"),
                     _fid_text(c.gfid, c.gfid_backbones), "—" if c.gkid is None else f"{c.gkid:.3g} ± {c.gkid_std:.2g}",
                     _fmt(t.get("steps"), "d"), _fmt(t.get("images"), ".0f"), _fmt(t.get("step_seconds"), ".0f"),
                     _fmt(t.get("images_per_s"), ".0f"), _fmt(t.get("matmul_gflops"), ".0f")])
    return ["## Ablation against the baseline", "",
            f"Every entry against `{baseline.tokenizer}` (its row gives its own values). PSNR differences are "
            "means over the same held-out images with 95% paired bootstrap intervals (both entries' per-image "
            "PSNRs resampled together); an interval that excludes 0 is a difference these images resolve. "
            "The doubling columns are each entry's own gain from k to 2k tokens (paired the same way). rFID, "
            "rKID, gFID and gKID are point values with no paired test (KID ± its spread over subsets; FIDs with "
            "their standard deviation over the FID backbones of `eval.fid_seeds`, where several). The prior "
            "columns: the held-out bits per image of each entry's prior over its full token stream, the "
            "difference paired over the images. Training cost from each model's `training.json`: the seconds "
            "of its training steps alone (no evaluation or saving), only comparable between runs made alone on "
            "one machine. All operating points: `ablation.csv`; plot: `ablation.png`.", "",
            _table(header, body), "", _table(cost_header, cost), ""]


def _lpips_line(lpips: dict[str, str] | None) -> str:
    if lpips is None:
        return "- LPIPS: not measured (no local weights: set FLEXTOK_LPIPS_WEIGHTS or eval.lpips_weights)."
    return f"- LPIPS: VGG16 v0.1 from `{lpips['weights']}` (fingerprint {lpips['fingerprint'][:12]})."


def summary_markdown(result: EvaluationResult, *, compared: list[Comparison] | None = None,
                     tails: list[TailDiagnostics] | None = None) -> str:
    """The readable report: what was measured on which data, with which FID backbone and sample counts.
    `compared` and `tails`: the result's `comparisons` and `tail_diagnostics` where already computed."""
    meta, fid = result.meta, result.meta["fid"]
    data = meta["data"]
    n = data["held_out_images"]
    lines = [
        f"# Evaluation: {meta['name']}", "",
        f"- Data: `{data['source']}` at {data['resolution']}x{data['resolution']}; held-out split "
        f"`{data['eval_split']}`, first {n} images (reconstruction metrics, prior NLL). Seed {meta['seed']}.",
        f"- FID backbone: `{fid['backbone']}`: {fid['note']}.",
    ]
    if "classifier" in fid:
        c = fid["classifier"]
        accuracy = ("" if c["test_accuracy"] is None else
                    f"; accuracy {c['test_accuracy']:.1%} on {c['test_images']} held-out images")
        if "saved" in c:
            lines.append(f"  A saved classifier, `{c['saved']}` (the same weights for every rerun), {c['classes']} "
                         f"classes{accuracy}.")
        else:
            lines.append(f"  Classifier trained on {c['train_images']} `{data['train_split']}` images, "
                         f"{c['classes']} classes, {c['steps']} steps{accuracy}.")
    spread = fid.get("spread_backbones") or []
    if spread:
        lines.append(f"  Every rFID and gFID is also computed under {len(spread)} more classifiers, trained alike with "
                     f"seeds {meta['seed'] + 1}..{meta['seed'] + len(spread)} (`eval.fid_seeds`); tables give the "
                     "first backbone's value and the standard deviation over all of them.")
    lines += [
        f"- rFID: {n} held-out images vs their {n} reconstructions. gFID: samples vs a seeded subset of "
        f"`{data['train_split']}` (counts per prior below). FID is biased upward at such small counts: compare "
        "numbers only at equal counts and backbone. KID (cubic-kernel MMD², unbiased at small counts) on the same "
        "features, mean ± spread over 100 subsets of at most half the images; its scale depends on the backbone's "
        "features.",
        "- Decoding: a generative decoder's rows come twice: `sample` (its sampler) and `mean` (one Euler step "
        "from t = 1, its estimate of E[x0 | tokens], the MSE-optimal reconstruction; a perfect posterior sample "
        "has twice its MSE). Grid decoders are deterministic. PSNR and SSIM carry 95% bootstrap intervals over "
        "the held-out images.",
        "- Bits per image: tokens x log2(vocabulary); token sets: log2 C(V + R - 1, R), the cost of an unordered "
        "multiset; adaptive lengths add log2(allowed lengths); BPE rows: the real post-BPE token count x "
        "log2(BPE vocabulary), reconstructions being the underlying tokenizer's (BPE is lossless, checked on "
        "every held-out image); KL rows: latent elements x 16 bits.",
        _lpips_line(meta["lpips"]),
        f"- Sampling speed: prior sampling + decoding, on {meta['device']} (torch threads: {meta['torch_threads']}); "
        "cached speeds were measured on this same device and thread count.",
        "",
    ]
    if result.tokenizer_rows:
        lines += ["## Tokenizers", "", _tokenizer_table(result.tokenizer_rows), ""]
    if result.prior_rows:
        lines += ["## Priors", "", "NLL: unconditional (null class), bits per image including EOS.", "",
                  _prior_table(result.prior_rows), ""]
        prefixes = _prefix_table(result)
        if prefixes:
            lines += ["An ordered 1D stream can stop after any k tokens. Its prior's bits for the first k tokens "
                      "(the prior's exact marginal likelihood of the prefix, no length code: k is the operating "
                      "point) against the reconstruction from those k tokens:", "", prefixes, ""]
    compared = comparisons(result) if compared is None else compared
    if compared:
        lines += _ablation_section(compared)
    elif baseline := meta.get("settings", {}).get("baseline"):
        lines += ["## Ablation against the baseline", "",
                  f"No comparison: the baseline `{baseline}` has no measured rows (see Errors).", ""]
    tails = tail_diagnostics(result) if tails is None else tails
    if tails:
        lines += _tail_section(tails)
    if result.codec_rows:
        lines += _codec_section(result)
    if result.errors:
        lines += ["## Errors", ""]
        lines += [f"- {e.kind} `{e.name}` ({e.path}{', ' + e.mode if e.mode else ''}): {e.error}"
                  for e in result.errors]
        lines.append("")
    return "\n".join(lines)
