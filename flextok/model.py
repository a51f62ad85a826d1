"""FlexTok-style adaptive 1D tokenizer: images -> R coarse-to-fine register tokens -> images from any prefix.

Input is the latent grid of a frozen grid KL autoencoder (embedded, so a saved tokenizer is self-contained)
or raw pixels. Encoder: `RegisterEncoder` (causal over registers). Codes: a linear map then FSQ / VQ / LFQ.
Decoder: rectified flow or diffusion over the same patches, conditioned on the registers, of which
nested dropout keeps a random prefix in training (the rest become a learned mask token; all-mask is the
null condition for classifier-free guidance).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from base.config import check, from_dict
from base.errors import ConfigError, UserError
from base.hub import HubMixin, register_model
from base.metrics import psnr
from base.patching import patchify, unpatchify
from base.schema import SamplingConfig
from base.teachers import Alignment, load_teacher
from grid.autoencoder import GridAutoencoder
from grid.bottlenecks import Quantizer, code_dim
from grid.schema import GridConfig, RepaConfig

from .decoders import DecoderEstimate, DecoderTrunk, build_decoder
from .joint_prior import JointPrior, scale_gradient
from .nested_dropout import apply_nested_dropout, powers_of_two_upto, sample_keep_counts
from .register_encoder import RegisterEncoder
from .schema import FlexTokConfig, PixelLossConfig, PriorLossConfig

__all__ = ["FlexTok", "FlexTokArgs", "FlexTokObjective", "image_seed", "pixel_t_weights"]


def image_seed(seed: int, index: int) -> int:
    """The noise seed of image `index` of a held-out set evaluated with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def moments(x: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of `x` in float64: sums of these over batches give their pooled std."""
    x = x.detach().double()
    return torch.stack([x.new_tensor(float(x.numel())), x.sum(), x.square().sum()])


@dataclasses.dataclass
class FlexTokArgs:
    """`FlexTok`'s constructor arguments besides its config (saved beside it in `config.json`): the image
    side, and the embedded grid autoencoder's config (input: latents)."""

    resolution: int = 32
    autoencoder_config: GridConfig | None = None

    def __post_init__(self):
        check(self.resolution > 0, "resolution' must be positive", self.resolution)


@register_model("flextok")
class FlexTok(HubMixin, nn.Module):
    config_class = FlexTokConfig
    args_class = FlexTokArgs

    def __init__(self, config: FlexTokConfig, resolution: int = 32, autoencoder_config: dict | None = None):
        nn.Module.__init__(self)
        HubMixin.__init__(self, config, resolution=resolution, autoencoder_config=autoencoder_config)
        self.resolution = resolution
        if config.input == "latents":
            if autoencoder_config is None:
                raise ValueError("input 'latents' needs the grid autoencoder's config")
            grid = from_dict(GridConfig, autoencoder_config, "autoencoder_config")
            self.autoencoder = GridAutoencoder(grid, resolution)
            self.autoencoder.requires_grad_(False).eval()
            channels, side = self.autoencoder.config.latent_channels, self.autoencoder.grid_size
        else:
            self.autoencoder = None
            channels, side = 3, resolution
        p = config.patch_size
        if side % p:
            raise ConfigError(f"flextok.patch_size: {p} does not divide the {side}x{side} input grid")
        self.channels, self.grid, r = channels, side // p, config.num_registers
        patch_dim = channels * p * p
        q_dim = code_dim(config.quantizer)
        self.encoder = RegisterEncoder(
            patch_dim=patch_dim, grid=self.grid, num_registers=r, dim=config.dim, depth=config.depth,
            heads=config.heads, mlp_ratio=config.mlp_ratio, causal_registers=not config.token_set,
        )
        self.to_code = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, q_dim))
        self.quantizer = Quantizer(config.quantizer, q_dim)
        self.code_to_cond = nn.Linear(q_dim, config.decoder_dim)
        # Token sets carry no register position, so the decoder cannot see their order. Otherwise unit scale,
        # like the encoder's registers: at 0.02 the decoder could not tell registers apart (a code means the
        # same at every position) and learned far slower on CPU runs (measured).
        self.register_pos = None if config.token_set else nn.Parameter(torch.randn(r, config.decoder_dim))
        self.mask_token = nn.Parameter(torch.zeros(config.decoder_dim))
        trunk = DecoderTrunk(
            patch_dim, self.grid, config.decoder_dim, config.decoder_depth, config.decoder_heads, config.mlp_ratio
        )
        self.decoder = build_decoder(config.decoder, trunk, config.prediction, config.time_logit_mean)
        # 1/std of the targets, measured on the first global training batch so flow noise and data share a
        # scale (the trainer: `target_moments` of every rank's images, then `fit_target_scale`)
        self.register_buffer("target_scale", torch.zeros(()))

    @classmethod
    def from_config(cls, config: FlexTokConfig, resolution: int) -> "FlexTok":
        """A fresh tokenizer; with input 'latents' it embeds the frozen autoencoder saved at `config.autoencoder`."""
        if config.input == "pixels":
            return cls(config, resolution)
        if config.autoencoder is None:
            raise UserError("flextok.autoencoder: set the path of a trained grid KL autoencoder (input: latents)")
        ae = GridAutoencoder.from_pretrained(config.autoencoder)
        if ae.is_quantized or ae.resolution != resolution:
            raise UserError(
                f"flextok.autoencoder: {config.autoencoder} must be a KL autoencoder at resolution {resolution} "
                f"(got bottleneck={ae.config.bottleneck}, resolution={ae.resolution})"
            )
        model = cls(config, resolution, autoencoder_config=dataclasses.asdict(ae.config))
        model.autoencoder.load_state_dict(ae.state_dict())
        return model

    def extra_config(self) -> dict:
        ae = None if self.autoencoder is None else dataclasses.asdict(self.autoencoder.config)
        return {"resolution": self.resolution, "autoencoder_config": ae}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen: never in training mode (no posterior sampling)
        return self

    @property
    def num_registers(self) -> int:
        return self.config.num_registers

    @property
    def tokens_per_image(self) -> int:
        return self.config.num_registers

    @property
    def token_set(self) -> bool:
        return self.config.token_set

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.vocab_size)

    def to_target(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the patch sequence the decoder generates (scaled latents or pixels). An unfitted
        target scale (a model trained outside the trainer) is fitted on this first batch."""
        x0 = self._unscaled_target(images)
        if self.target_scale == 0:
            self.fit_target_scale(moments(x0).tolist())
        return x0 * self.target_scale

    def _unscaled_target(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            grid = images if self.autoencoder is None else self.autoencoder.encode(images)["latents"]
        return patchify(grid, self.config.patch_size)

    @torch.no_grad()
    def target_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(count, sum, sum of squares) of the unscaled targets of `images`, float64: summed over a step's
        micro-batches and ranks, `fit_target_scale` gets the whole global batch's spread."""
        return moments(self._unscaled_target(images))

    def fit_target_scale(self, pooled: Sequence[float]) -> None:
        """Set the target scale to 1 / the std (n - 1 denominator, at least 1e-3) of pooled `moments`."""
        n, total, squares = pooled
        variance = max(squares - total * total / n, 0.0) / max(n - 1, 1)
        self.target_scale.fill_(1.0 / max(math.sqrt(variance), 1e-3))

    def from_target(self, x0: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Target patches -> images (through the frozen autoencoder's decoder for input 'latents'), clamped
        to [-1, 1] unless `clamp` is false (a training loss on them keeps its gradient outside that range)."""
        grid = unpatchify(x0 / self.target_scale, self.config.patch_size, self.channels, self.grid)
        out = grid if self.autoencoder is None else self.autoencoder.decode(grid)
        return out.clamp(-1, 1) if clamp else out

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> (quantized codes [B, R, q], indices [B, R], quantizer aux loss)."""
        return self.encode_targets(self.to_target(images))

    def encode_targets(self, x0: torch.Tensor, return_patches: bool = False) -> tuple[torch.Tensor, ...]:
        """Target patches (scaled latents or pixels) -> (codes, indices, aux loss); with `return_patches` also
        the encoder's last-layer patch tokens [B, N, dim] (REPA's encoder side)."""
        registers, patches = self.encoder(x0, return_patches=True)
        codes = self.quantizer(self.to_code(registers))
        return (*codes, patches) if return_patches else codes

    def condition(self, codes: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Quantized codes [B, R, q] + keep counts [B] -> decoder condition tokens [B, R, D]."""
        cond = self.code_to_cond(codes)
        if self.register_pos is not None:
            cond = cond + self.register_pos
        return apply_nested_dropout(cond, keep, self.mask_token)

    def null_condition(self, batch: int) -> torch.Tensor:
        return self.mask_token.expand(batch, self.num_registers, -1)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, k: int | None = None, target_psnr: float | None = None,
                 target_mse: float | None = None, seed: int = 0, **sampling) -> list[torch.Tensor]:
        """Images [B,3,H,W] in [-1,1] -> per image a 1D LongTensor of R tokens (or its first k).

        Adaptive length: `target_psnr` (pixel space, dB) or `target_mse` (scaled target space: latents
        or pixels) picks per image the shortest prefix among 1, 2, 4, ..., R whose decoding meets it, decoded
        with the same `sampling` fields (`steps`, `guidance_scale`, ...) and `seed` that a later `detokenize`
        call should use.
        """
        images = self._fit_images(images)
        _, indices, _ = self.encode(images)
        if self.token_set:
            indices = indices.sort(dim=1).values
        tokens = list(indices.cpu().unbind(0))
        if target_psnr is not None or target_mse is not None:
            return self._adaptive(images, tokens, target_psnr, target_mse, self.decoding(**sampling), seed)
        if k is not None:
            if self.token_set and k != self.num_registers:
                raise ValueError(f"token sets have a fixed size of {self.num_registers}; got k={k}")
            if not 1 <= k <= self.num_registers:
                raise ValueError(f"k must be in 1..{self.num_registers}, got {k}")
            tokens = [t[:k] for t in tokens]
        return tokens

    @torch.no_grad()
    def detokenize(self, tokens: list[torch.Tensor], seed: int = 0, **sampling) -> torch.Tensor:
        """Token sequences of any lengths 1..R (in one call) -> images; deterministic for a given seed.
        `sampling` replaces fields of `config.sampling` (`steps=25`, `guidance_scale=7.5`, ...)."""
        return self.from_target(self.sample_targets(tokens, self.decoding(**sampling), seed))

    def decoding(self, **fields) -> SamplingConfig:
        """This tokenizer's decoding settings with the given `SamplingConfig` fields replaced (None keeps one)."""
        return dataclasses.replace(self.config.sampling, **{k: v for k, v in fields.items() if v is not None})

    @torch.no_grad()
    def detokenize_prefixes(self, tokens: list[torch.Tensor], ks: list[int], seed: int = 0,
                            image_seeds: list[int] | None = None, **sampling) -> dict[int, torch.Tensor]:
        """The images of every prefix length k in `ks` of each sequence, decoded in one batched pass; k's
        images equal `detokenize([t[:k] for t in tokens], seed)` (each image gets the same noise for every
        k), up to floating-point summation order. Memory grows with len(ks) x len(tokens) rows.
        `image_seeds` (one per sequence, replacing `seed`) seed each image's noise on its own."""
        prefixes = [t[:k] for k in ks for t in tokens]
        targets = self.sample_targets(prefixes, self.decoding(**sampling), seed, repeats=len(ks),
                                      image_seeds=image_seeds)
        return dict(zip(ks, self.from_target(targets).split(len(tokens))))

    @torch.no_grad()
    def eval_reconstructions(self, images: torch.Tensor, seed: int = 0, first: int = 0) -> dict[str, torch.Tensor]:
        """Reconstructions from every prefix length 1, 2, 4, ..., R (token sets: all R tokens). `images` are
        a held-out set's images `first`, `first` + 1, ...: image i decodes from noise seeded by
        `image_seed(seed, i)`, so a set evaluated in chunks gets the reconstructions of one big batch."""
        tokens = self.tokenize(images)
        ks = [self.num_registers] if self.token_set else powers_of_two_upto(self.num_registers)
        seeds = [image_seed(seed, first + i) for i in range(len(tokens))]
        decoded = self.detokenize_prefixes(tokens, ks, image_seeds=seeds)
        return {f"k={k}": images for k, images in decoded.items()}

    def sample_targets(self, tokens: list[torch.Tensor], sampling: SamplingConfig | None = None,
                       seed: int = 0, repeats: int = 1, image_seeds: list[int] | None = None) -> torch.Tensor:
        """Token lists -> decoded target patches (before `from_target`), for callers that stay in latent
        space. `repeats`: the rows are that many groups of the same images (see `detokenize_prefixes`);
        `image_seeds`: one noise seed per image instead of one `seed` for the batch."""
        indices, keep = self._pack(tokens)
        codes = self.quantizer.codes_from_indices(indices)
        cond = self.condition(codes, keep)
        if image_seeds is None:
            generator = torch.Generator(device=indices.device).manual_seed(seed)
        else:
            generator = [torch.Generator(device=indices.device).manual_seed(s) for s in image_seeds]
        n_patches, patch_dim = self.grid**2, self.channels * self.config.patch_size**2
        return self.decoder.sample(cond, self.null_condition(len(tokens)), (len(tokens), n_patches, patch_dim),
                                   sampling or self.config.sampling, generator, repeats)

    def _pack(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate and pad variable-length token lists to [B, R] indices plus keep counts [B]."""
        if len(tokens) == 0:
            raise ValueError("detokenize needs at least one token sequence")
        device = self.mask_token.device
        r = self.num_registers
        indices = torch.zeros(len(tokens), r, dtype=torch.long, device=device)
        keep = torch.zeros(len(tokens), dtype=torch.long, device=device)
        for i, t in enumerate(tokens):
            t = torch.as_tensor(t)
            if t.ndim != 1 or len(t) == 0 or len(t) > r:
                raise ValueError(f"image {i}: expected 1..{r} tokens in a 1D tensor, got shape {tuple(t.shape)}")
            if self.token_set and len(t) != r:
                raise ValueError(f"image {i}: a token set has exactly {r} tokens, got {len(t)}")
            if t.dtype.is_floating_point or t.min() < 0 or t.max() >= self.vocab_size:
                raise ValueError(f"image {i}: token ids must be integers in [0, {self.vocab_size})")
            indices[i, : len(t)] = t.to(device)
            keep[i] = len(t)
        return indices, keep

    def _adaptive(self, images, tokens, target_psnr, target_mse, sampling, seed) -> list[torch.Tensor]:
        """Shortest prefix (1, 2, 4, ..., R) meeting the target. Every pass decodes the whole batch so that
        each image keeps its own noise row, exactly as in a later `detokenize(result, seed=seed)` call."""
        if self.token_set:
            raise ValueError("adaptive length needs ordered tokens; token sets have a fixed size")
        chosen = [self.num_registers] * len(tokens)
        pending = set(range(len(tokens)))
        targets = self.to_target(images) if target_mse is not None else None
        for k in powers_of_two_upto(self.num_registers)[:-1]:
            x0 = self.sample_targets([t[:k] for t in tokens], sampling, seed)
            if target_mse is not None:
                ok = F.mse_loss(x0, targets, reduction="none").flatten(1).mean(1) <= target_mse
            else:
                ok = psnr(self.from_target(x0), images) >= target_psnr
            for i in sorted(pending):
                if ok[i]:
                    chosen[i] = k
                    pending.discard(i)
            if not pending:
                break
        return [t[:k] for t, k in zip(tokens, chosen)]

    def _fit_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            warnings.warn(f"resizing images from {tuple(images.shape[-2:])} to {self.resolution}x{self.resolution}")
            images = F.interpolate(images, size=(self.resolution,) * 2, mode="bicubic", align_corners=False)
            images = images.clamp(-1, 1)
        return images.to(self.mask_token.device)


def pixel_t_weights(t: torch.Tensor, cfg: PixelLossConfig) -> torch.Tensor:
    """w(t) of the pixel term per decoder row [B]: 1 - t or 1 (`t_weighting`), 0 above `t_max`."""
    w = 1 - t if cfg.t_weighting == "one_minus_t" else torch.ones_like(t)
    return w * (t <= cfg.t_max)


class FlexTokObjective(nn.Module):
    """Decoder loss on nested-dropout prefixes (plus the quantizer's auxiliary loss). With
    `prefixes_per_example` n > 1 the encoder runs once and the decoder scores n prefixes of each image (each
    with its own keep count, noise and t) in one batched call: the encoder is causal over registers, so one
    pass gives every prefix its codes. Optional terms, each off at weight 0: `pixel_loss` (the decoded x̂0
    against the image), `prior_loss` (a jointly trained causal prior's NLL of the codes) and `repa` (the
    decoder's hidden state aligned with a frozen teacher's features of the clean image)."""

    def __init__(self, model: FlexTok, *, pixel_loss: PixelLossConfig | None = None,
                 prior_loss: PriorLossConfig | None = None, repa: RepaConfig | None = None):
        super().__init__()
        self.model = model
        self.pixel_cfg = pixel_loss or PixelLossConfig()
        self.prior_cfg = prior_loss or PriorLossConfig()
        self.repa_cfg = repa or RepaConfig()
        self.repa_layer = self._repa_layer() if self.repa_cfg.weight > 0 else None
        self.alignment = self._build_alignment() if self.repa_cfg.weight > 0 else None
        self.lpips = self._load_lpips() if self.pixel_cfg.weight > 0 and self.pixel_cfg.lpips > 0 else None
        self.joint_prior = self._build_joint_prior() if self.prior_cfg.weight > 0 else None

    def _load_lpips(self) -> nn.Module:
        from base.lpips import LPIPS

        return LPIPS.for_training(self.pixel_cfg.lpips_weights, "pixel_loss.lpips_weights")

    def _build_joint_prior(self) -> JointPrior:
        m, cfg = self.model, self.prior_cfg
        if m.token_set:
            raise ConfigError("prior_loss.weight: a causal prior needs ordered tokens, and flextok.token_set is "
                              "true (an order-free set would need a set prior)")
        return JointPrior(code_dim=code_dim(m.config.quantizer), num_positions=m.num_registers, dim=cfg.dim,
                          depth=cfg.depth, heads=cfg.heads)

    def forward(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.model
        x0 = m.to_target(images)
        codes, indices, aux, patches = m.encode_targets(x0, return_patches=True)
        estimate = self._decoder_estimate(x0, codes)
        loss = estimate.loss + aux
        used = torch.bincount(indices.flatten(), minlength=m.vocab_size) > 0
        logs = {"decoder_loss": estimate.loss.item(), "codebook_used": used.float().mean().item()}
        if self.pixel_cfg.weight > 0:
            term = self._pixel_loss(images, estimate)
            loss = loss + self.pixel_cfg.weight * term
            logs["pixel_loss"] = term.item()
        if self.joint_prior is not None:
            nll = self._prior_loss(codes, indices)
            loss = loss + nll  # weight 1 for the prior itself; the encoder sees prior_loss.weight (see there)
            logs["prior_loss_bits"] = nll.item() / math.log(2)
        if self.alignment is not None:
            term = self._repa_loss(images, estimate.hidden, patches)
            loss = loss + self.repa_cfg.weight * term
            logs["repa_loss"] = term.item()
        return loss, logs

    def _decoder_estimate(self, x0: torch.Tensor, codes: torch.Tensor) -> DecoderEstimate:
        """The decoder's loss averaged over `prefixes_per_example` copies of the batch (one for a token set),
        stacked copy after copy, with each row's x̂0 and t."""
        n = self.model.config.decoder_rows_per_image
        keep = self._keep_counts(n * len(x0), x0.device)
        cond = self.model.condition(codes.repeat(n, 1, 1), keep)
        return self.model.decoder.estimate(x0.repeat(n, 1, 1), cond, layer=self.repa_layer)

    def _repa_layer(self) -> int:
        """The decoder block whose output REPA aligns: `repa.layer`, else a third of the depth (at least 1)."""
        depth, layer = self.model.config.decoder_depth, self.repa_cfg.layer
        if layer is None:
            return max(1, depth // 3)
        if layer > depth:
            raise ConfigError(f"repa.layer: {layer} is not a decoder block (flextok.decoder_depth is {depth}: "
                              f"use 1..{depth})")
        return layer

    def _build_alignment(self) -> Alignment:
        return self.alignment_for(load_teacher(self.repa_cfg.teacher), self.model, self.repa_cfg)

    @staticmethod
    def alignment_for(teacher: nn.Module, model: FlexTok, repa: RepaConfig) -> Alignment:
        """`teacher` (frozen) with a projector for the decoder's hidden state, and with `repa.encoder` one for
        the encoder's patch tokens (`--plan` builds them around a teacher on the meta device)."""
        c = model.config
        widths = {"decoder": c.decoder_dim, **({"encoder": c.dim} if repa.encoder else {})}
        return Alignment(teacher, model.resolution, widths)

    def _repa_loss(self, images: torch.Tensor, hidden: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """REPA: the decoder's projected hidden state on every row (each copy of the batch at its own noise
        level) against the teacher's features of the clean images, plus with `repa.encoder` the encoder's
        projected patch tokens against the same features."""
        targets = self.alignment.targets(images)
        loss = self.alignment.loss("decoder", hidden, targets)
        if self.repa_cfg.encoder:
            loss = loss + self.alignment.loss("encoder", patches, targets)
        return loss

    def _pixel_loss(self, images: torch.Tensor, estimate: DecoderEstimate) -> torch.Tensor:
        """Mean over the decoder's rows of w(t) x (l1·L1 + l2·L2 + lpips·LPIPS) between the decoded x̂0
        (unclamped; through the frozen KL decoder, which gets no gradient of its own) and the row's image."""
        cfg = self.pixel_cfg
        images = images.repeat(len(estimate.t) // len(images), 1, 1, 1)  # the decoder's rows, copy after copy
        decoded = self.model.from_target(estimate.x0_hat, clamp=False)
        distance = images.new_zeros(len(images))
        if cfg.l1 > 0:
            distance = distance + cfg.l1 * (decoded - images).abs().flatten(1).mean(1)
        if cfg.l2 > 0:
            distance = distance + cfg.l2 * (decoded - images).square().flatten(1).mean(1)
        if self.lpips is not None:
            distance = distance + cfg.lpips * self.lpips(decoded, images)
        return (pixel_t_weights(estimate.t, cfg) * distance).mean()

    def _prior_loss(self, codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The joint prior's mean NLL per token (nats) of the batch's codes. One pass, two weights: the
        prior's parameters get the NLL's gradient as is, the codes (so the encoder) `prior_loss.weight` times
        it (`scale_gradient`); two detached terms would run the prior twice."""
        quantizer = self.model.quantizer
        with torch.no_grad():  # every code vector: constant for FSQ and LFQ, the current codebook for VQ
            codebook = quantizer.codes_from_indices(torch.arange(quantizer.codebook_size, device=codes.device)[None])
        nll = self.joint_prior(scale_gradient(codes, self.prior_cfg.weight), indices, codebook[0])
        return nll.mean()

    def _keep_counts(self, rows: int, device: torch.device) -> torch.Tensor:
        """Per row the number of registers kept: all for token sets, else nested dropout's draw; 0 (the
        all-mask null condition, for classifier-free guidance) for `cond_dropout` of the rows."""
        m, cfg = self.model, self.model.config
        if cfg.token_set:
            keep = torch.full((rows,), m.num_registers, device=device)
        else:
            keep = sample_keep_counts(rows, m.num_registers, cfg.nested_dropout,
                                      keep_all_fraction=cfg.keep_all_fraction, device=device)
        null = torch.rand(rows, device=device) < cfg.cond_dropout
        return torch.where(null, torch.zeros_like(keep), keep)
