"""Training objectives: one nn.Module per tokenizer family, `forward(images, step) -> (loss, logs)`.

The objective owns everything trained alongside the model (e.g. a PatchGAN discriminator) so the
trainer optimizes `objective.parameters()` with one optimizer and one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from base.errors import ConfigError
from base.teachers import Alignment, load_teacher

from .schema import EquivarianceConfig, LossConfig, RepaConfig

__all__ = ["GridObjective", "PatchDiscriminator", "SpatialTransform", "equivariance_transforms"]

# the pixel-wise reconstruction terms (LossConfig.l1, .l2); LPIPS needs its network and lives on the objective
_PIXEL_TERMS = {"l1": lambda recon, images: (recon - images).abs().mean(), "l2": F.mse_loss}


@dataclass(frozen=True)
class SpatialTransform:
    """tau of an equivariance loss, applied alike to images and latent grids [B, C, H, W]: downscale by
    `factor` (average pooling, so a decoded downscaled latent is compared with the downscaled image), then
    rotate by `quarter_turns` x 90 degrees."""

    factor: int = 1
    quarter_turns: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            x = F.avg_pool2d(x, self.factor)
        return torch.rot90(x, self.quarter_turns, dims=(2, 3)) if self.quarter_turns % 4 else x


def equivariance_transforms(cfg: EquivarianceConfig) -> list[SpatialTransform]:
    """The transforms `cfg` draws from, each as likely: every downscale factor, and the three rotations."""
    turns = (1, 2, 3) if cfg.rotations else ()
    return [SpatialTransform(factor=s) for s in cfg.scales] + [SpatialTransform(quarter_turns=q) for q in turns]


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: a grid of real/fake logits, one per receptive field."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            blocks += [nn.Conv2d(width, nxt, 4, stride=2, padding=1), nn.GroupNorm(32, nxt), nn.LeakyReLU(0.2)]
            width = nxt
        blocks.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GridObjective(nn.Module):
    """Reconstruction (L1/L2, optional LPIPS) + KL or quantizer loss + optional hinge-GAN after a start step
    + optional equivariance term (`EquivarianceConfig`) + optional alignment of the latent grid with a frozen
    teacher (`RepaConfig`, VA-VAE style)."""

    def __init__(self, model: nn.Module, loss: LossConfig, *, equivariance: EquivarianceConfig | None = None,
                 repa: RepaConfig | None = None):
        super().__init__()
        self.model, self.cfg = model, loss
        self.equivariance = equivariance or EquivarianceConfig()
        self.transforms = self._check_equivariance() if self.equivariance.weight > 0 else []
        self.repa = repa or RepaConfig()
        self.alignment = self._build_alignment() if self.repa.weight > 0 else None
        self.lpips = self._load_lpips(loss) if loss.lpips > 0 else None
        self.discriminator = PatchDiscriminator() if loss.adversarial > 0 else None

    @staticmethod
    def _load_lpips(loss: LossConfig) -> nn.Module:
        from base.lpips import LPIPS

        return LPIPS.for_training(loss.lpips_weights, "loss.lpips_weights")  # None: $FLEXTOK_LPIPS_WEIGHTS

    def _check_equivariance(self) -> list[SpatialTransform]:
        if self.cfg.l1 <= 0 and self.cfg.l2 <= 0:
            raise ConfigError("equivariance.weight: the equivariance term uses loss.l1 and loss.l2; set one > 0")
        side = self.model.grid_size
        for s in self.equivariance.scales:
            if side % s:
                raise ConfigError(f"equivariance.scales: {s} does not divide the {side}x{side} latent grid")
        return equivariance_transforms(self.equivariance)

    def _build_alignment(self) -> Alignment:
        """The frozen teacher at `repa.teacher` and a linear map of the latent channels to its channels (a
        1x1 convolution over the grid). `repa.layer` and `repa.encoder` choose 1D-tokenizer features: a grid
        autoencoder has one feature to align, its latent grid, so setting either is a mistake."""
        if self.repa.layer is not None:
            raise ConfigError("repa.layer: a grid autoencoder aligns its latent grid, not a layer; leave it unset")
        if self.repa.encoder:
            raise ConfigError("repa.encoder: a grid autoencoder always aligns its encoder's latent grid; leave it "
                              "false (it is the 1D tokenizer's option)")
        return self.alignment_for(load_teacher(self.repa.teacher), self.model)

    @staticmethod
    def alignment_for(teacher: nn.Module, model: nn.Module) -> Alignment:
        """`teacher` (frozen) with a linear projector of the latent channels (`--plan` builds it around a
        teacher on the meta device)."""
        return Alignment(teacher, model.resolution, {"latents": model.config.latent_channels}, projector=nn.Linear)

    def forward(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        recon, out = self.model(images)
        logs: dict[str, float] = {}
        loss = images.new_zeros(())
        for name, term in self._reconstruction_terms(recon, images).items():
            loss = loss + getattr(self.cfg, name) * term
            logs[name] = term.item()
        if "kl" in out:
            kl = out["kl"].mean()
            loss = loss + self.model.config.kl_weight * kl
            logs["kl"] = kl.item()
        else:
            loss = loss + out["aux_loss"]
            logs["quant_loss"] = out["aux_loss"].item()
            logs.update(self.model.codebook_usage(out["indices"]))
        if self.transforms:
            term = self._equivariance_term(images, out["latents"])
            loss = loss + self.equivariance.weight * term
            logs["equivariance_loss"] = term.item()
        if self.alignment is not None:
            term = self.repa_loss(images, out["latents"])
            loss = loss + self.repa.weight * term
            logs["repa_loss"] = term.item()
        if self.discriminator is not None and step >= self.cfg.adversarial_start:
            loss = loss + self._adversarial(images, recon, logs)
        return loss, logs

    def repa_loss(self, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """1 - cosine similarity, per latent position, between the projected `latents` (KL: the sampled
        posterior in training; quantized: the quantized grid, straight through) and the teacher's features of
        `images`, averaged."""
        features = latents.flatten(2).transpose(1, 2)  # [B, h*w, c], raster order
        return self.alignment.loss("latents", features, self.alignment.targets(images))

    def _reconstruction_terms(self, recon: torch.Tensor, images: torch.Tensor,
                              perceptual: bool = True) -> dict[str, torch.Tensor]:
        """The unweighted reconstruction terms whose weight is > 0 (LPIPS only with `perceptual`)."""
        terms = {name: fn(recon, images) for name, fn in _PIXEL_TERMS.items() if getattr(self.cfg, name) > 0}
        if perceptual and self.lpips is not None:
            terms["lpips"] = self.lpips(recon, images).mean()
        return terms

    def _equivariance_term(self, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """`equivariance_loss` for one random transform on the batch's first `equivariance.fraction`."""
        rows = max(1, round(self.equivariance.fraction * len(images)))
        transform = self.transforms[int(torch.randint(len(self.transforms), ()))]
        return self.equivariance_loss(images[:rows], latents[:rows], transform)

    def equivariance_loss(self, images: torch.Tensor, latents: torch.Tensor,
                          transform: SpatialTransform) -> torch.Tensor:
        """loss.l1 x L1 + loss.l2 x L2 between decode(tau(latents)) and tau(images): 0 when the autoencoder
        reconstructs the images and decoding commutes with tau. `latents` are the encoder's (KL: the sampled
        posterior in training; quantized: the quantized grid, so gradients reach the encoder through the
        straight-through path)."""
        target = transform(images)
        decoded = self.model.decode(transform(latents))
        terms = self._reconstruction_terms(decoded, target, perceptual=False)
        return sum((getattr(self.cfg, name) * term for name, term in terms.items()), images.new_zeros(()))

    def idle_parameters(self, step: int) -> list[str]:
        """Names of the trainable parameters `forward` gives no gradient at `step`: the PatchGAN's before
        `loss.adversarial_start` (the trainer keeps them out of DDP while they are idle)."""
        if self.discriminator is None or step >= self.cfg.adversarial_start:
            return []
        return [f"discriminator.{name}" for name, _ in self.discriminator.named_parameters()]

    def _adversarial(self, images: torch.Tensor, recon: torch.Tensor, logs: dict[str, float]) -> torch.Tensor:
        # The generator term sees frozen (detached) discriminator weights and the discriminator term sees
        # detached reconstructions, so one backward pass trains both players in opposite directions.
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_loss = -functional_call(self.discriminator, frozen, (recon,)).mean()
        d_loss = (
            F.relu(1.0 - self.discriminator(images)).mean() + F.relu(1.0 + self.discriminator(recon.detach())).mean()
        )
        logs["g_adv"], logs["d_loss"] = g_loss.item(), d_loss.item()
        return self.cfg.adversarial * g_loss + d_loss
