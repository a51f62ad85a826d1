"""Codec rows (issue #23): the image codec (`codec.ImageCodec`, one per discrete prior in `eval.codec.priors`)
against JPEG and WebP (Pillow) on whole held-out images, in bits per pixel of real files.

Every codec gets the same input, which is also the reference: the eval split's images as they are, or the
held-out photographs resized so that their long side is `max_side` (Lanczos), as 8-bit pixels. Reconstructions
are 8-bit too (what a PNG or JPEG file gives). PSNR, SSIM and LPIPS are per whole image; rFID/rKID are patch
FID/KID: non-overlapping tiles at the tokenizer resolution cut from the reconstructions against the same tiles
of the originals, with the eval's backbone. Our rows also state the file bytes against the prior's NLL of the
coded tokens, the bit-exact round trip of every image, and encode/decode speed beside the machine's matmul speed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import PIL
import torch
from PIL import Image
from tqdm import tqdm

from base.data import manifest_photos, pil_to_tensor, tensor_to_uint8, to_rgb
from base.errors import UserError
from base.metrics import psnr, ssim
from base.runtime import matmul_gflops
from codec import OVERHEAD_BYTES, CodecSettings, ImageCodec, measure_image, summarize

from .bootstrap import bootstrap_interval
from .cache import tensor_digest
from .context import EvalContext
from .frechet import FeatureStats, compute_feature_stats, fid_from_stats
from .kid import kernel_inception_distance
from .prior_rows import PriorUnderTest, open_prior
from .rows import CodecRow, EvaluationResult
from .schema import EvalCodecConfig
from .tokenizer_rows import base_family

__all__ = ["BASELINES", "CodecImages", "codec_settings", "lowest_rate_verdict", "patches", "run_codec"]

# Pillow's strongest settings at each quality: optimized Huffman tables, WebP's slowest method
BASELINES = {"jpeg": ("JPEG", {"optimize": True}), "webp": ("WEBP", {"method": 6})}


def as_8bit(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [-1, 1], rounded to the 8-bit values a file holds."""
    return pil_to_tensor(Image.fromarray(tensor_to_uint8(image[None])[0]))


def long_side(img: Image.Image, side: int) -> Image.Image:
    """`img` resized (Lanczos) so that its long side is `side` pixels."""
    scale = side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)


def patches(image: torch.Tensor, side: int) -> torch.Tensor:
    """The non-overlapping side x side tiles of [3, H, W] (a remainder narrower than `side` is left out)."""
    rows, cols = image.shape[1] // side, image.shape[2] // side
    tiles = image[:, : rows * side, : cols * side].unfold(1, side, side).unfold(2, side, side)
    return tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, side, side)


class CodecImages:
    """The whole images every codec codes (8-bit, [3, H, W] in [-1, 1]) and what every row shares about them."""

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx, settings = ctx, ctx.settings.codec
        if settings.images == "held_out":
            self.images = [as_8bit(x) for x in ctx.held_out.images[: settings.num_images]]
        else:
            kind, _, manifest = ctx.cfg.data.source.partition(":")
            if kind != "photos":
                raise UserError(f"eval.codec.images: 'photos' needs data.source photos:<manifest>, got "
                                f"{ctx.cfg.data.source!r}")
            _, contents = manifest_photos(ctx.cfg.data, manifest, ctx.cfg.data.eval_split)
            self.images = [pil_to_tensor(long_side(to_rgb(Image.open(io.BytesIO(data))), settings.max_side))
                           for data in contents[: settings.num_images]]
        if len(self.images) < 2:
            raise UserError(f"eval.codec: {len(self.images)} image(s) to code; FID needs at least 2")
        self.gray = [bool((x[0] == x[1]).all() and (x[1] == x[2]).all()) for x in self.images]
        self.key = hashlib.sha256("".join(map(tensor_digest, self.images)).encode()).hexdigest()
        self.side = ctx.cfg.data.resolution
        self.pixels = sum(x.shape[1] * x.shape[2] for x in self.images)

    @cached_property
    def reference(self) -> FeatureStats:
        """Backbone statistics of the originals' tiles: the real side of every patch FID."""
        return self.patch_stats(self.images)

    def patch_stats(self, images: list[torch.Tensor]) -> FeatureStats:
        tiles = torch.cat([patches(x, self.side) for x in images])
        if len(tiles) < 2:
            raise UserError(f"eval.codec: {len(tiles)} tile(s) of {self.side} px in the images; FID needs 2")
        return compute_feature_stats(self.ctx.backbone, tiles.split(self.ctx.settings.batch_size))

    def quality(self, reconstructions: list[torch.Tensor]) -> dict[str, Any]:
        """PSNR and SSIM per whole image (means, 95% bootstrap intervals), LPIPS, patch FID/KID."""
        ctx, record = self.ctx, {}
        for name, metric in (("psnr", psnr), ("ssim", ssim)):
            values = torch.stack([metric(r[None], x[None])[0] for r, x in zip(reconstructions, self.images)])
            record[name], record[f"{name}_ci"] = values.mean().item(), list(bootstrap_interval(values.double().numpy()))
        if ctx.lpips is not None:
            with torch.no_grad():
                distances = [ctx.lpips[0](r[None].to(ctx.device), x[None].to(ctx.device)).item()
                             for r, x in zip(reconstructions, self.images)]
            record["lpips"] = float(np.mean(distances))
        fake = self.patch_stats(reconstructions)
        fid = fid_from_stats(self.reference, fake)
        kid = kernel_inception_distance(self.reference.features, fake.features, seed=ctx.cfg.seed)
        return {**record, "rfid": fid.value, "rfid_backbone": fid.backbone, "patches": fid.num_fake,
                "rkid": kid.value, "rkid_std": kid.std}

    def cache_key(self) -> dict[str, Any]:
        """What every codec record depends on besides the codec: the images, the backbone, LPIPS weights."""
        ctx = self.ctx
        return {"images": self.key, "tile": self.side, "backbone": ctx.backbone.name,
                "lpips": ctx.lpips[1] if ctx.lpips else None}


@dataclass
class Coded:
    """One codec setting run over every image: its record (bytes, and ours: NLL, round trip, speed) and the
    8-bit reconstructions, computed on first use only."""

    run: Callable[[], tuple[dict[str, Any], list[torch.Tensor]]]

    @cached_property
    def outcome(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return self.run()


def codec_settings(tested: PriorUnderTest, settings: EvalCodecConfig) -> list[tuple[str, CodecSettings]]:
    """(label, settings) of a prior's codec rows: an ordered 1D stream at each k it models (and adaptive
    targets for a full stream); any other prior codes its own stream."""
    config = tested.prior.config
    ordered = base_family(tested.tokenizer) == "1d" and tested.codec is None
    if ordered and config.tokens in ("full", "prefix"):
        rows = [(f"k={k}", CodecSettings(k=k)) for k in settings.ks if k <= tested.prior.max_length]
        if config.tokens == "full":
            rows += [(f"adaptive@{t:g}dB", CodecSettings(target_psnr=t)) for t in settings.target_psnrs]
        return rows
    if config.tokens == "adaptive":
        return [(f"adaptive@{config.target_psnr:g}dB", CodecSettings())]
    return [("all", CodecSettings())]


def ours(codec: ImageCodec, settings: CodecSettings, images: CodecImages,
         speed: Callable[[], float]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    measured = [measure_image(codec, x, gray, settings, f"image {i}")
                for i, (x, gray) in enumerate(zip(images.images, images.gray))]
    total = summarize([m for m, _ in measured])
    record = {
        "file_bytes": total["file_bytes"], "model_bits": total["model_bits"],
        "payload_overhead_bits": total["payload_bits"] - total["model_bits"], "header_bytes": OVERHEAD_BYTES,
        "round_trip_exact": total["round_trip_exact"], "matmul_gflops": speed(),
        **{key: total[key] for key in ("encode_images_per_s", "decode_images_per_s", "encode_tiles_per_s",
                                       "decode_tiles_per_s")},
    }
    return record, [as_8bit(image) for _, image in measured]


def pillow(name: str, quality: int, images: CodecImages) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """A Pillow format at `quality` on every image (grayscale images as L, where JPEG codes no chroma)."""
    fmt, options = BASELINES[name]
    total, reconstructions, encode_s, decode_s = 0, [], 0.0, 0.0
    for image, gray in zip(images.images, images.gray):
        img = Image.fromarray(tensor_to_uint8(image[None])[0])
        started, buffer = time.perf_counter(), io.BytesIO()
        (img.convert("L") if gray else img).save(buffer, format=fmt, quality=quality, **options)
        encode_s += time.perf_counter() - started
        started = time.perf_counter()
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            reconstructions.append(pil_to_tensor(to_rgb(decoded)))
        decode_s += time.perf_counter() - started
        total += len(buffer.getvalue())
    n = len(images.images)
    return {"file_bytes": total, "encode_images_per_s": n / encode_s, "decode_images_per_s": n / decode_s}, \
        reconstructions


def make_row(ctx: EvalContext, images: CodecImages, inputs: dict[str, Any], coded: Coded,
             describe: dict[str, Any]) -> tuple[CodecRow, torch.Tensor]:
    """A row from cache where present, and the first image's reconstruction (the examples figure)."""
    record, fresh = ctx.cache.record({**inputs, "metric": "codec"},
                                     lambda: {**coded.outcome[0], **images.quality(coded.outcome[1])})
    example, example_fresh = ctx.cache.images({**inputs, "metric": "codec_example"},
                                              lambda: coded.outcome[1][0][None])
    row = CodecRow(**describe, images=len(images.images), pixels=images.pixels,
                   bits_per_pixel=8 * record["file_bytes"] / images.pixels, **record,
                   computed=(["codec"] if fresh else []) + (["example"] if example_fresh else []))
    return row, example[0]


def lowest_rate_verdict(rows: list[CodecRow]) -> dict[str, Any] | None:
    """The issue's lowest-rate target: at JPEG's lowest reachable bits per pixel, the best of our rows at no
    more bits (lowest patch FID) against JPEG's patch FID and KID; and our rows below JPEG's floor."""
    jpeg = [r for r in rows if r.family == "jpeg"]
    if not jpeg:
        return None
    floor = min(jpeg, key=lambda r: r.bits_per_pixel)
    cheaper = [r for r in rows if r.ours and r.bits_per_pixel <= floor.bits_per_pixel]
    best = min(cheaper, key=lambda r: (r.rfid, r.rkid), default=None)
    below = [r for r in rows if r.ours and r.bits_per_pixel < floor.bits_per_pixel and r.round_trip_exact == r.images]
    pick = lambda r: None if r is None else {  # noqa: E731
        "name": r.name, "setting": r.setting, "bits_per_pixel": r.bits_per_pixel, "rfid": r.rfid, "rkid": r.rkid}
    return {"jpeg": pick(floor), "best": pick(best),
            "met": best is not None and best.rfid <= floor.rfid and best.rkid <= floor.rkid,
            "below_jpeg_floor": [f"{r.name} {r.setting}" for r in below],
            "lowest_bits_per_pixel": min((r.bits_per_pixel for r in rows if r.ours), default=None)}


def run_codec(ctx: EvalContext, result: EvaluationResult) -> None:
    """Every codec row of `eval.codec` into `result` (failures as error rows), with its verdict."""
    settings = ctx.settings.codec
    if not settings.priors:
        return
    try:
        images = CodecImages(ctx)
    except Exception as err:  # noqa: BLE001 - reported like any failed entry; the rest of the report stands
        result.fail("codec", "images", settings.images, err)
        return
    speed = functools.cache(matmul_gflops)  # measured once, only if a row is computed
    timed_on = {"device": str(ctx.device), "threads": torch.get_num_threads()}  # speeds are measured
    jobs = []
    entries = {e.name: e for e in ctx.settings.priors}
    for name in settings.priors:
        entry = entries[name]
        try:
            tested = open_prior(entry, ctx)
            codec = ImageCodec(tested.tokenizer, tested.prior, tested.codec, tested.codec_fingerprint, str(ctx.device),
                               (tested.tokenizer_path, entry.path))
            family = base_family(tested.tokenizer) + ("+bpe" if tested.codec is not None else "")
            base = {"prior": tested.fingerprint, "tokenizer": tested.tokenizer_fingerprint,
                    "bpe": tested.codec_fingerprint, "timed_on": timed_on}
            for label, s in codec_settings(tested, settings):
                run = lambda c=codec, s=s: ours(c, s, images, speed)  # noqa: E731
                jobs.append((entry, {**base, "settings": s}, run, {
                    "name": name, "family": family, "setting": label, "k": s.k, "target_psnr": s.target_psnr,
                    "quality": None}))
        except Exception as err:  # noqa: BLE001
            result.fail("codec", name, entry.path, err)
    for family, qualities in (("jpeg", settings.jpeg_qualities), ("webp", settings.webp_qualities)):
        for q in qualities:
            inputs = {"format": family, "quality": q, "options": BASELINES[family][1], "pillow": PIL.__version__,
                      "timed_on": timed_on}
            jobs.append((None, inputs, lambda f=family, q=q: pillow(f, q, images), {
                "name": family, "family": family, "setting": f"q={q}", "k": None, "target_psnr": None,
                "quality": q}))
    for entry, inputs, run, describe in tqdm(jobs, desc="codec", unit="row", disable=not ctx.progress):
        try:
            row, example = make_row(ctx, images, {**inputs, **images.cache_key()}, Coded(run), describe)
            result.codec_rows.append(row)
            result.codec_examples[(row.name, row.setting)] = example
        except Exception as err:  # noqa: BLE001
            result.fail("codec", describe["name"], entry.path if entry else describe["family"], err,
                        describe["setting"])
    result.codec_examples[("original", "")] = images.images[0]
    result.codec_meta = {
        "images": settings.images, "count": len(images.images), "max_side": settings.max_side,
        "pixels": images.pixels, "tile": images.side, "gray": sum(images.gray),
        "verdict": lowest_rate_verdict(result.codec_rows),
    }

