"""Convolutional grid autoencoders: the KL and quantized baselines, and the 1D tokenizer's latent space."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from base.config import check
from base.errors import ConfigError
from base.hub import HubMixin, register_model

from .bottlenecks import DiagonalGaussian, Quantizer
from .schema import GridConfig

__all__ = ["ConvDecoder", "ConvEncoder", "GridAutoencoder", "GridAutoencoderArgs", "ResBlock"]


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(_groups(channels_in), channels_in),
            nn.SiLU(),
            nn.Conv2d(channels_in, channels_out, 3, padding=1),
            nn.GroupNorm(_groups(channels_out), channels_out),
            nn.SiLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def _level_channels(cfg: GridConfig) -> list[int]:
    """Channel width per resolution level: doubles per downsampling, capped at 4x the base width."""
    levels = int(math.log2(cfg.downsample))
    return [cfg.channels * min(2**i, 4) for i in range(levels + 1)]


class ConvEncoder(nn.Module):
    def __init__(self, cfg: GridConfig, out_channels: int):
        super().__init__()
        widths = _level_channels(cfg)
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for i in range(len(widths) - 1):
            layers += [ResBlock(widths[i], widths[i]) for _ in range(cfg.num_res_blocks)]
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1))
        layers += [ResBlock(widths[-1], widths[-1]) for _ in range(cfg.num_res_blocks)]
        layers += [nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before the output head (GroupNorm, SiLU, 1x1 conv to the bottleneck's channels)."""
        return self.net[:-3](x)


class ConvDecoder(nn.Module):
    def __init__(self, cfg: GridConfig):
        super().__init__()
        widths = _level_channels(cfg)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)]
        layers += [ResBlock(widths[0], widths[0]) for _ in range(cfg.num_res_blocks)]
        for i in range(len(widths) - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i], widths[i + 1], 3, padding=1)]
            layers += [ResBlock(widths[i + 1], widths[i + 1]) for _ in range(cfg.num_res_blocks)]
        layers += [nn.GroupNorm(_groups(widths[-1]), widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@dataclass
class GridAutoencoderArgs:
    """`GridAutoencoder`'s constructor arguments besides its config (saved beside it in `config.json`)."""

    resolution: int = 32

    def __post_init__(self):
        check(self.resolution > 0, "resolution' must be positive", self.resolution)


@register_model("grid_autoencoder")
class GridAutoencoder(HubMixin, nn.Module):
    """Images [B,3,H,W] in [-1,1] <-> a latent grid [B,c,H/f,W/f] through a KL or quantized bottleneck.

    `tokenize` gives one 1D tensor per image: codes in raster order (quantized), or the latent vectors in
    raster order as a [h*w, c] float tensor (KL, the posterior mean).
    """

    config_class = GridConfig
    args_class = GridAutoencoderArgs

    def __init__(self, config: GridConfig, resolution: int = 32):
        nn.Module.__init__(self)
        HubMixin.__init__(self, config, resolution=resolution)
        if resolution % config.downsample:  # the decoder would not give back the input's size
            raise ConfigError(f"'resolution' must be a multiple of downsample ({config.downsample}), got {resolution}")
        self.resolution = resolution
        kl = config.bottleneck == "kl"
        self.encoder = ConvEncoder(config, 2 * config.latent_channels if kl else config.latent_channels)
        self.decoder = ConvDecoder(config)
        self.gaussian = DiagonalGaussian() if kl else None
        self.quantizer = None if kl else Quantizer(config.quantizer, config.latent_channels)

    @property
    def is_quantized(self) -> bool:
        return self.quantizer is not None

    @property
    def grid_size(self) -> int:
        return self.resolution // self.config.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    @property
    def vocab_size(self) -> int:
        """Codebook size (quantized); for KL, latents count as 16-bit numbers (see `bits_per_token`)."""
        return self.quantizer.codebook_size if self.is_quantized else 0

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.vocab_size) if self.is_quantized else 16.0 * self.config.latent_channels

    def encode(self, images: torch.Tensor, sample: bool = False) -> dict[str, torch.Tensor]:
        """Returns {'latents': [B,c,h,w]} plus 'kl' (KL) or 'indices' [B,h,w] and 'aux_loss' (quantized)."""
        h = self.encoder(images)
        if not self.is_quantized:
            latents, kl = self.gaussian(h, sample=sample)
            return {"latents": latents, "kl": kl}
        b, c, gh, gw = h.shape
        quantized, indices, aux = self.quantizer(h.flatten(2).transpose(1, 2))
        latents = quantized.transpose(1, 2).reshape(b, c, gh, gw)
        return {"latents": latents, "indices": indices.reshape(b, gh, gw), "aux_loss": aux}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """As a REPA teacher (`base.teachers.Teacher`): the encoder's feature map before its bottleneck head,
        [B, 4 x channels, H/f, W/f]. Chosen over the latents: these are wide (the latents have a
        few channels, too few for a cosine target to say much) and not yet squeezed for reconstruction."""
        return self.encoder.features(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.encode(images, sample=self.training)
        return self.decode(out["latents"]), out

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check_images(images)
        out = self.encode(images)
        if self.is_quantized:
            return list(out["indices"].flatten(1).long().cpu().unbind(0))
        return list(out["latents"].flatten(2).transpose(1, 2).cpu().unbind(0))

    @torch.no_grad()
    def detokenize(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        latents = self.tokens_to_latents(tokens)
        return self.decode(latents).clamp(-1, 1)

    def tokens_to_latents(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        device = next(self.parameters()).device
        n, g, c = self.tokens_per_image, self.grid_size, self.config.latent_channels
        for i, t in enumerate(tokens):
            expected = (n,) if self.is_quantized else (n, c)
            if tuple(t.shape) != expected:
                raise ValueError(f"image {i}: expected tokens of shape {expected}, got {tuple(t.shape)}")
            if self.is_quantized and (t.min() < 0 or t.max() >= self.vocab_size):
                raise ValueError(f"image {i}: token ids must be in [0, {self.vocab_size}), got [{t.min()}, {t.max()}]")
        stacked = torch.stack([t.to(device) for t in tokens])
        if self.is_quantized:
            codes = self.quantizer.codes_from_indices(stacked.long())
            return codes.transpose(1, 2).reshape(len(tokens), c, g, g)
        return stacked.float().transpose(1, 2).reshape(len(tokens), c, g, g)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.resolution:
            raise ValueError(
                f"expected images [B, 3, {self.resolution}, {self.resolution}], got {tuple(images.shape)}"
            )

    @torch.no_grad()
    def eval_reconstructions(self, images: torch.Tensor, seed: int = 0, first: int = 0) -> dict[str, torch.Tensor]:
        """Named reconstructions for held-out metrics and grids (one: the deterministic round trip, so
        `seed` and `first` change nothing; see `FlexTok.eval_reconstructions`)."""
        return {f"{self.tokens_per_image} tok": self.decode(self.encode(images)["latents"]).clamp(-1, 1)}

    def codebook_usage(self, indices: torch.Tensor) -> dict[str, float]:
        """Fraction of the codebook used and the perplexity of code usage over `indices`."""
        counts = torch.bincount(indices.flatten().long(), minlength=self.vocab_size).float()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"codebook_used": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}

