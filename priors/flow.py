"""The continuous prior for KL tokenizers: a rectified-flow transformer over the latent grid.

KL latents have no vocabulary, so the grid baseline gets a DiT-like generator instead of a GPT: the
[h*w, c] latent vectors are the tokens, an x-transformers Encoder with adaptive LayerNorm and adaptive
layer scale (AdaLN-zero style) is conditioned on time and class, and it predicts the velocity of the
path x_t = t·ε + (1−t)·x₀ (t=1 is noise, as in the tokenizer's decoder). Classes are dropped to a
learned null class during training, which gives classifier-free guidance at sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Encoder

from base.config import check
from base.guidance import Guidance
from base.hub import HubMixin, register_model
from base.patching import timestep_embedding
from base.schema import SamplingConfig

from .fast_layers import use_fast_layers
from .schema import PriorConfig

__all__ = ["NORMALIZATION_ROWS", "FlowPrior", "FlowPriorArgs", "normalization_sample"]

NORMALIZATION_ROWS = 2**20  # latent vectors the flow prior's per-channel statistics are estimated from


def normalization_sample(tokens: np.ndarray, offsets: np.ndarray, rows: int = NORMALIZATION_ROWS,
                         seed: int = 0) -> torch.Tensor:
    """About `rows` latent vectors [n, c] of whole sequences drawn at random (seeded) from a token cache
    (`tokens`, `offsets` of `TokenDataset`), for `FlowPrior.set_normalization`. Not the first rows: caches
    follow their source's order, which may be sorted by class. Whole sequences, read in order, keep the
    reads from a memory-mapped cache contiguous."""
    sequences = len(offsets) - 1
    wanted = min(sequences, -(-rows // max(1, int(offsets[-1]) // sequences)))
    picked = np.sort(np.random.default_rng(seed).choice(sequences, size=wanted, replace=False))
    return torch.from_numpy(np.concatenate([np.asarray(tokens[offsets[i] : offsets[i + 1]]) for i in picked]))


@dataclass
class FlowPriorArgs:
    """`FlowPrior`'s constructor arguments besides its config (saved beside it in `config.json`): the latent
    grid's positions and channels, and the fingerprint of the tokenizer it models."""

    num_tokens: int
    token_dim: int
    tokenizer_hash: str = ""

    def __post_init__(self):
        check(self.num_tokens >= 1, "num_tokens' must be positive", self.num_tokens)
        check(self.token_dim >= 1, "token_dim' must be positive", self.token_dim)


@register_model("flow_prior")
class FlowPrior(HubMixin, nn.Module):
    """Velocity model over latent grids [B, N, c], conditioned on time and (optionally) class."""

    config_class = PriorConfig
    args_class = FlowPriorArgs

    def __init__(self, config: PriorConfig, num_tokens: int, token_dim: int, tokenizer_hash: str = ""):
        nn.Module.__init__(self)
        HubMixin.__init__(self, config, num_tokens=num_tokens, token_dim=token_dim, tokenizer_hash=tokenizer_hash)
        self.num_tokens, self.token_dim, self.tokenizer_hash = num_tokens, token_dim, tokenizer_hash
        dim = config.dim
        self.in_proj = nn.Linear(token_dim, dim)
        self.pos_emb = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, dim)  # the last row is the null class
        self.encoder = Encoder(
            dim=dim, depth=config.depth, heads=config.heads, attn_dim_head=dim // config.heads, attn_flash=True,
            use_adaptive_layernorm=True, use_adaptive_layerscale=True, dim_condition=dim,
            attn_dropout=config.attn_dropout, ff_dropout=config.dropout,
        )
        use_fast_layers(self.encoder)
        self.out_proj = nn.Linear(dim, token_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        # latents are standardized per channel with training-set statistics (set by `set_normalization`)
        self.register_buffer("latent_mean", torch.zeros(token_dim))
        self.register_buffer("latent_std", torch.ones(token_dim))

    def zero_init_modules(self) -> list[nn.Module]:
        """Modules this class zero-initializes after building them (replayed under ZeRO-3's zero.Init)."""
        return [self.out_proj]

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def set_normalization(self, latents: torch.Tensor) -> None:
        """Standardize with the mean and std of training latents [..., c], so noise and data match in scale."""
        flat = latents.reshape(-1, self.token_dim).float()
        self.latent_mean.copy_(flat.mean(0))
        self.latent_std.copy_(flat.std(0).clamp_min(1e-4))

    def class_ids(self, labels: torch.Tensor | None, batch: int, drop: float = 0.0) -> torch.Tensor:
        device = self.pos_emb.device
        if labels is None or self.config.num_classes == 0:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        if labels.numel() and labels.max() >= self.config.num_classes:
            raise ValueError(f"labels must be < num_classes={self.config.num_classes}, got {labels.max().item()}")
        ids = torch.where(labels < 0, self.null_class, labels)
        if drop > 0:
            ids = torch.where(torch.rand(batch, device=device) < drop, self.null_class, ids)
        return ids

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Normalized noisy latents [B, N, c], times [B], class ids [B] -> predicted velocity ε − x₀."""
        dtype = self.in_proj.weight.dtype  # bf16 under DeepSpeed on GPUs: cast float inputs ourselves
        condition = self.time_mlp(timestep_embedding(t, self.config.dim).to(dtype)) + self.class_emb(class_ids)
        h = self.in_proj(x_t.to(dtype)) + self.pos_emb
        return self.out_proj(self.encoder(h, condition=condition)).float()

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() - self.latent_mean) / self.latent_std

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss: velocity MSE at logit-normal times, with class dropout."""
        x0 = self.normalize(tokens.to(self.latent_mean.device))
        drop = self.config.class_dropout if self.training else 0.0
        t = torch.sigmoid(torch.randn(len(x0), device=x0.device))
        noise = torch.randn_like(x0)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
        return F.mse_loss(self.velocity(x_t, t, self.class_ids(labels, len(x0), drop)), noise - x0)

    @torch.no_grad()
    def validation_loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0,
                        times: int = 8) -> torch.Tensor:
        """Per-sample velocity MSE averaged over a fixed grid of times with fixed noise: comparable across
        evaluations (the training loss is too noisy for that)."""
        x0 = self.normalize(tokens.to(self.latent_mean.device))
        generator = torch.Generator(device=x0.device).manual_seed(seed)
        class_ids = self.class_ids(labels, len(x0))
        total = torch.zeros(len(x0), device=x0.device)
        for t_value in (torch.arange(times, dtype=torch.float32) + 0.5) / times:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            t = torch.full((len(x0),), float(t_value), device=x0.device)
            x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
            total += (self.velocity(x_t, t, class_ids) - (noise - x0)).pow(2).flatten(1).mean(1)
        return total / times

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | None = None, num_samples: int | None = None, *,
               sampling: SamplingConfig | None = None, seed: int = 0) -> list[torch.Tensor]:
        """Euler integration from noise (t=1) to data (t=0); one [N, c] latent tensor per sample.

        `sampling` (default: this prior's `config.sampling`) gives the steps and the guidance scale.
        """
        batch = len(labels) if labels is not None else num_samples
        if not batch:
            raise ValueError("give labels or a positive num_samples")
        device = self.pos_emb.device
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((batch, self.num_tokens, self.token_dim), generator=generator, device=device)
        sampling = sampling or self.config.sampling
        conditional = self.config.num_classes > 0 and labels is not None
        cond, null = self.class_ids(labels, batch), self.class_ids(None, batch)
        times = torch.linspace(1.0, 0.0, sampling.steps + 1, device=device)
        for t, t_next in zip(times[:-1], times[1:]):
            guidance = Guidance.at(sampling, float(t), conditional)
            class_ids = guidance.conditions(cond, null)
            v = guidance.combine(self.velocity(guidance.repeat(x), t.expand(len(class_ids)), class_ids))
            x = x + (t_next - t) * v
        latents = x * self.latent_std + self.latent_mean
        return list(latents.cpu().unbind(0))
