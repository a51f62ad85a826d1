"""The typed records an evaluation produces and a report reads: one row per tokenizer x mode, one per
prior, one per failure, and the whole result."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from base.errors import UserError
from base.hub import HUB_PREFIX
from base.schema import SamplingConfig

__all__ = ["CodecRow", "ErrorRow", "EvaluationResult", "PriorRow", "SamplerSettings", "TokenizerRow", "same_model"]


def same_model(a: str, b: str) -> bool:
    """Whether two model references (a prior's `tokenizer`, a tokenizer row's `path`) name the same model: the
    same hub id, or folders that resolve to the same place however they are written."""
    if a == b:
        return True
    if a.startswith(HUB_PREFIX) or b.startswith(HUB_PREFIX):
        return False
    return Path(a).resolve() == Path(b).resolve()

@dataclass
class TokenizerRow:
    """One tokenizer at one token mode: its rate, its held-out reconstruction quality, how it decoded."""

    name: str
    family: str  # 1d, token_set, grid_vq, grid_kl; "+bpe" when measured through a BPE codec
    path: str
    bpe: Optional[str]
    mode: str  # k=<n>, adaptive@<target>dB, or all; " mean" appended for posterior-mean decodings
    decoding: str  # "sample" or "mean" (a generative decoder's posterior mean), or "deterministic" (grid)
    k: Optional[int]
    target_psnr: Optional[float]
    vocab_size: Optional[int]
    bits_basis: str  # how bits per image are counted
    decoder: Optional[SamplingConfig]  # generative decoders' steps and guidance; None for grid decoders
    tokens_per_image: float
    tokens_min: int
    tokens_max: int
    bits_per_token: float
    bits_per_image: float
    psnr: float
    ssim: float
    rfid: float
    rfid_backbone: str
    rfid_num_real: int
    rfid_num_fake: int
    psnr_ci: list[float]  # 95% bootstrap interval over the held-out images
    ssim_ci: list[float]
    rkid: float  # KID between the held-out images and their reconstructions (same backbone as rFID)
    rkid_std: float  # its spread over subsets
    lpips: Optional[float] = None
    target_met: Optional[float] = None  # adaptive rows: share of images that reached the target PSNR
    length_counts: Optional[dict[str, int]] = None  # adaptive rows: images per chosen length
    rfid_backbones: Optional[list[float]] = None  # rFID under each backbone of eval.fid_seeds (the first: rfid)
    psnr_per_image: Optional[list[float]] = None  # for paired comparisons of rows; left out of report.json
    code_entropy_bits: Optional[list[float]] = None  # 1D k = R rows: each position's held-out code entropy
    computed: list[str] = field(default_factory=list)  # metrics computed in this run (the rest came from cache)

    @property
    def adaptive(self) -> bool:
        return self.target_psnr is not None

    def flat(self) -> dict[str, Any]:
        """The row as one level of columns (the decoder's settings as decoder_steps, decoder_guidance_scale)."""
        nested = ("decoder", "psnr_ci", "ssim_ci", "length_counts", "psnr_per_image", "code_entropy_bits",
                  "rfid_backbones")
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in nested}
        for metric in ("psnr", "ssim"):
            out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = getattr(self, f"{metric}_ci")
        out["decoder_steps"] = self.decoder.steps if self.decoder else None
        out["decoder_guidance_scale"] = self.decoder.guidance_scale if self.decoder else None
        out["decoder_guidance_interval"] = self.decoder.guidance_interval if self.decoder else None
        return out


@dataclass
class SamplerSettings:
    """Every setting a prior's gFID depends on; stated next to it in the report and part of its cache key."""

    samples: int
    seed: int
    batch_size: int
    labels: str  # "classes 0..C-1 in turn" or "unconditional"
    flow: bool  # a flow prior: `sampling.steps` Euler steps; else temperature / top-k / top-p
    sampling: SamplingConfig  # the prior's
    decoder: Optional[SamplingConfig]  # the tokenizer's generative decoder; None for grid decoders


@dataclass
class PriorRow:
    """One prior: held-out bits per image (the modelability axis), gFID and sampling speed."""

    name: str
    path: str
    kind: str  # discrete or flow
    tokens: str  # the token mode it models: full, prefix, adaptive, bpe
    target_psnr: Optional[float]  # adaptive priors: the target that set their lengths
    tokenizer: str
    tokenizer_family: str
    bpe: Optional[str]
    num_classes: int
    sampler: SamplerSettings
    nll_bits_per_image: Optional[float]  # None for flow priors (no discrete likelihood)
    flow_val_loss: Optional[float]  # flow priors' fixed-noise velocity loss instead
    nll_prefix_bits: Optional[dict[str, float]]  # ordered 1D streams: held-out bits of the first k tokens, by k
    nll_images: int
    tokens_per_image: float
    gfid: float
    gfid_backbone: str
    gfid_num_real: int
    gfid_num_fake: int
    gkid: float  # KID of the samples against the training reference
    gkid_std: float
    sampling_seconds: float
    sampling_images_per_s: float
    nll_position_bits: Optional[list[float]] = None  # ordered 1D streams: held-out bits of each position
    nll_per_image: Optional[list[float]] = None  # for paired comparisons of priors; left out of report.json
    gfid_backbones: Optional[list[float]] = None  # gFID under each backbone of eval.fid_seeds (the first: gfid)
    computed: list[str] = field(default_factory=list)


@dataclass
class CodecRow:
    """One image codec at one setting on whole held-out images: real file bytes against quality. Ours (a
    prior's `codec.ImageCodec`) also states its bytes against the prior's NLL, the round trip and its speed."""

    name: str  # the eval.priors entry, or jpeg / webp
    family: str  # 1d, 1d+bpe, token_set, grid_vq, ... (the prior's tokens), or jpeg / webp
    setting: str  # k=<n>, adaptive@<t>dB, own (the prior's stream), q=<quality>
    k: Optional[int]
    target_psnr: Optional[float]
    quality: Optional[int]
    images: int
    pixels: int  # over all images
    patches: int  # non-overlapping tiles at the tokenizer resolution: the samples of patch FID/KID
    file_bytes: int  # over all images: whole files, headers included
    bits_per_pixel: float
    psnr: float
    psnr_ci: list[float]  # 95% bootstrap interval over the images
    ssim: float
    ssim_ci: list[float]
    rfid: float  # patch FID: reconstruction tiles vs original tiles
    rfid_backbone: str
    rkid: float
    rkid_std: float
    lpips: Optional[float] = None
    model_bits: Optional[float] = None  # ours: the prior's NLL of the coded tokens (+ pow2 length codes), all images
    payload_overhead_bits: Optional[float] = None  # ours: 8 x payload bytes - model bits, all images
    header_bytes: Optional[int] = None  # ours: bytes per file beyond the payload (header and CRC)
    round_trip_exact: Optional[int] = None  # ours: images whose tokens decoded back bit-exact
    encode_images_per_s: Optional[float] = None
    decode_images_per_s: Optional[float] = None
    encode_tiles_per_s: Optional[float] = None
    decode_tiles_per_s: Optional[float] = None
    matmul_gflops: Optional[float] = None  # this machine's fp32 matmul speed when the speeds were measured
    computed: list[str] = field(default_factory=list)

    @property
    def ours(self) -> bool:
        return self.family not in ("jpeg", "webp")

    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("psnr_ci", "ssim_ci")}
        for metric in ("psnr", "ssim"):
            out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = getattr(self, f"{metric}_ci")
        return out


@dataclass
class ErrorRow:
    """An entry (or one mode of it) that could not be measured, and why."""

    kind: str  # tokenizer, prior or codec
    name: str
    path: str
    mode: Optional[str]
    error: str


@dataclass
class EvaluationResult:
    """Everything a report shows: rows, errors, shared settings, and the images of its PNG grids."""

    meta: dict[str, Any]
    originals: torch.Tensor  # the held-out images shown in reconstructions.png
    tokenizer_rows: list[TokenizerRow] = field(default_factory=list)
    prior_rows: list[PriorRow] = field(default_factory=list)
    errors: list[ErrorRow] = field(default_factory=list)
    previews: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (tokenizer, mode) -> images
    samples: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)  # prior -> images
    codec_rows: list[CodecRow] = field(default_factory=list)
    codec_meta: dict[str, Any] = field(default_factory=dict)  # images, speed machine, the lowest-rate verdict
    codec_examples: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (name, setting) -> image

    def reconstruction_of(self, prior: PriorRow, k: int | None = None) -> TokenizerRow | None:
        """The tokenizer row whose tokens a prior models (with `k`: its first k tokens): same tokenizer and
        codec, the prior's token count (adaptive priors: the adaptive row), the posterior mean preferred where
        the decoder is generative."""
        matches = [r for r in self.tokenizer_rows if same_model(r.path, prior.tokenizer) and r.bpe == prior.bpe
                   and r.adaptive == (prior.tokens == "adaptive") and r.target_psnr == prior.target_psnr]
        if k is not None:
            matches = [r for r in matches if r.k == k]
        elif prior.tokens != "adaptive":
            matches = [r for r in matches if abs(r.tokens_per_image - prior.tokens_per_image) < 1e-6 or r.bpe]
        order = {"mean": 0, "deterministic": 1, "sample": 2}
        return min(matches, key=lambda r: (order[r.decoding], -r.tokens_per_image), default=None)

    def prefix_points(self, prior: PriorRow) -> list[tuple[int, float, TokenizerRow]]:
        """(k, bits of the first k tokens, the reconstruction from k tokens) for each prefix a prior's NLL
        record holds whose reconstruction row exists."""
        points = []
        for k, bits in (prior.nll_prefix_bits or {}).items():
            row = self.reconstruction_of(prior, int(k))
            if row is not None:
                points.append((int(k), bits, row))
        return points

    def fail(self, kind: str, name: str, path: str, err: Exception, mode: str | None = None) -> None:
        """Record one failed entry (or row) by name and path, and say so right away."""
        message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        self.errors.append(ErrorRow(kind, name, path, mode, message))
        where = f"{kind} '{name}' ({path}{', ' + mode if mode else ''})"
        tqdm.write(f"error: {where}: {message}", file=sys.stderr)
