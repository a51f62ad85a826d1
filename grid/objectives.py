"""Training objectives: one nn.Module per tokenizer family, `forward(images, step) -> (loss, logs)`.

The objective owns everything trained alongside the model (e.g. a PatchGAN discriminator) so the
trainer optimizes `objective.parameters()` with one optimizer and one backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .schema import LossConfig

__all__ = ["GridObjective", "PatchDiscriminator"]


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
    """Reconstruction (L1/L2, optional LPIPS) + KL or quantizer loss + optional hinge-GAN after a start step."""

    def __init__(self, model: nn.Module, loss: LossConfig):
        super().__init__()
        self.model, self.cfg = model, loss
        self.lpips = self._load_lpips(loss) if loss.lpips > 0 else None
        self.discriminator = PatchDiscriminator() if loss.adversarial > 0 else None

    @staticmethod
    def _load_lpips(loss: LossConfig) -> nn.Module:
        from base.lpips import LPIPS

        return LPIPS.from_pretrained(loss.lpips_weights)  # None: FLEXTOK_LPIPS_WEIGHTS, else a how-to error

    def forward(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        recon, out = self.model(images)
        logs: dict[str, float] = {}
        loss = images.new_zeros(())
        for name, weight, value in (
            ("l1", self.cfg.l1, lambda: (recon - images).abs().mean()),
            ("l2", self.cfg.l2, lambda: F.mse_loss(recon, images)),
            ("lpips", self.cfg.lpips, lambda: self.lpips(recon, images).mean()),
        ):
            if weight > 0:
                term = value()
                loss = loss + weight * term
                logs[name] = term.item()
        if "kl" in out:
            kl = out["kl"].mean()
            loss = loss + self.model.config.kl_weight * kl
            logs["kl"] = kl.item()
        else:
            loss = loss + out["aux_loss"]
            logs["quant_loss"] = out["aux_loss"].item()
            logs.update(self.model.codebook_usage(out["indices"]))
        if self.discriminator is not None and step >= self.cfg.adversarial_start:
            loss = loss + self._adversarial(images, recon, logs)
        return loss, logs

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
