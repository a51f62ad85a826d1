"""Generative decoders conditioned on (masked) register tokens: rectified flow and cosine-schedule diffusion.

Both share one trunk, a transformer over [noised patches | condition tokens] with AdaLN time conditioning
whose modulation is zero-initialized (it starts as plain LayerNorm). x-transformers' extra adaptive
layer-scale gate (full adaLN-zero) made register codes collapse on short CPU runs, so it is off. Both expose
`loss(x0, cond)`, `estimate(x0, cond, layer)` (the same loss plus the clean target x̂0 it implies at the
sampled noise level t, for pixel-space terms, and with `layer` the trunk's hidden state after that block, for
REPA) and `sample(cond, null, shape, sampling, generator)`; classifier-free guidance runs the conditional and
null rows in one batched forward pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Encoder

from base.guidance import Guidance
from base.patching import sincos_2d, timestep_embedding
from base.schema import SamplingConfig

__all__ = ["DecoderEstimate", "DecoderTrunk", "DiffusionDecoder", "RectifiedFlowDecoder", "build_decoder",
           "cosine_alpha_bar", "run_trunk", "start_from_noise"]


class DecoderEstimate(NamedTuple):
    """One training evaluation of a decoder: its loss, the clean target x̂0 [B, N, patch_dim] that the
    trunk's output implies, and the noise level t [B] it was made at (0 clean, 1 pure noise)."""

    loss: torch.Tensor
    x0_hat: torch.Tensor
    t: torch.Tensor
    hidden: torch.Tensor | None = None  # the trunk's hidden state after block `layer` (REPA), if asked for


class DecoderTrunk(nn.Module):
    """Predicts a per-patch target [B, N, patch_dim] from noised patches, time t [B] and condition tokens."""

    def __init__(self, patch_dim: int, grid: int, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.proj_in = nn.Linear(patch_dim, dim)
        self.register_buffer("pos", sincos_2d(grid, dim), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.trunk = Encoder(
            dim=dim, depth=depth, heads=heads, attn_flash=True, ff_glu=True, ff_mult=mlp_ratio,
            use_adaptive_layernorm=True, dim_condition=dim,
        )
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.num_patches = grid * grid

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, hidden_layer: int | None = None):
        """The prediction [B, N, patch_dim]; with `hidden_layer` (a block, 1-based) the pair (prediction, the
        residual stream after that block at the patch positions [B, N, dim]), which REPA aligns."""
        h = self.proj_in(x_t) + self.pos
        c = self.time_mlp(timestep_embedding(t, self.pos.shape[1]))
        if hidden_layer is None:
            out = self.trunk(torch.cat([h, cond], dim=1), condition=c)
            return self.proj_out(self.norm_out(out[:, : self.num_patches]))
        out, inter = self.trunk(torch.cat([h, cond], dim=1), condition=c, return_hiddens=True)
        # `hiddens` holds each block's input (the first: the embeddings); the last block's output is the
        # stream before the final norm, the last of `layer_hiddens`
        streams = [*inter.hiddens[1:], inter.layer_hiddens[-1]]
        hidden = streams[hidden_layer - 1][:, : self.num_patches]
        return self.proj_out(self.norm_out(out[:, : self.num_patches])), hidden


def run_trunk(trunk: DecoderTrunk, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
              layer: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trunk's prediction, and its hidden state after block `layer` (None when `layer` is None)."""
    return (trunk(x_t, t, cond), None) if layer is None else trunk(x_t, t, cond, hidden_layer=layer)


def guided(trunk: DecoderTrunk, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor,
           guidance: Guidance) -> torch.Tensor:
    """The trunk's prediction under classifier-free guidance (`base.guidance`)."""
    return guidance.combine(trunk(guidance.repeat(x), guidance.repeat(t), guidance.conditions(cond, null)))


def start_from_noise(shape: tuple[int, ...], steps: int, generator: torch.Generator | list[torch.Generator],
                     device: torch.device, repeats: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded pure noise and the time grid from 1 down to 0 that both samplers walk. With `repeats`, the
    batch is that many copies of the noise of its first shape[0] / repeats rows (one image decoded from
    several token prefixes gets the same noise in each). A list of generators, one per row, gives each
    row noise that does not depend on the other rows of its batch."""
    if isinstance(generator, list):
        noise = torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    else:
        noise = torch.randn((shape[0] // repeats, *shape[1:]), generator=generator, device=device)
    noise = noise.repeat(repeats, *[1] * (len(shape) - 1))
    return noise, torch.linspace(1.0, 0.0, steps + 1, device=device)


class RectifiedFlowDecoder(nn.Module):
    """x_t = t*eps + (1-t)*x0 with logit-normal t; the loss is the MSE of the velocity eps - x0; Euler from t=1 to 0.

    `prediction`: the trunk outputs the velocity ("v") or the clean target ("x0", turned into the velocity
    (x_t - x0) / t). With "x0" the one-step mean from t = 1 is the trunk's output itself; with "v" the trunk
    must also copy its input noise to the output exactly (x0 = eps - v), and any error in that copy lands
    in the reconstruction. The velocity loss of an x0 prediction weighs its error by 1/t^2; t is clamped at
    `MIN_T` there so the weight stays bounded near clean targets.

    `time_logit_mean` > 0 shifts training toward noisier t, where the decoder must rely on the registers:
    on short CPU runs this is what makes later tokens carry detail (measured; see configs/1d_tiny.yaml).
    """

    MIN_T = 0.05

    def __init__(self, trunk: DecoderTrunk, time_logit_mean: float = 0.0, prediction: str = "v"):
        super().__init__()
        if prediction not in ("v", "x0"):
            raise ValueError(f"rectified flow predicts 'v' or 'x0', got {prediction!r}")
        self.trunk, self.time_logit_mean, self.prediction = trunk, time_logit_mean, prediction

    def velocity(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The trunk's (guided) output at x_t, time t [B] -> the velocity eps - x0."""
        if self.prediction == "v":
            return out
        return (x_t - out) / t.clamp_min(self.MIN_T)[:, None, None]

    def x0_from(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean target the trunk's output implies at x_t, time t [B]: x̂0 = x_t - t·v̂ (x_t = t·eps +
        (1-t)·x0, v = eps - x0), or the output itself for prediction "x0" (exact, no clamped 1/t)."""
        return out if self.prediction == "x0" else x_t - t[:, None, None] * out

    def loss(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.estimate(x0, cond).loss

    def estimate(self, x0: torch.Tensor, cond: torch.Tensor, layer: int | None = None) -> DecoderEstimate:
        t = torch.sigmoid(torch.randn(len(x0), device=x0.device) + self.time_logit_mean)
        eps = torch.randn_like(x0)
        x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * x0
        out, hidden = run_trunk(self.trunk, x_t, t, cond, layer)
        loss = F.mse_loss(self.velocity(out, x_t, t), eps - x0)
        return DecoderEstimate(loss, self.x0_from(out, x_t, t), t, hidden)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, null: torch.Tensor, shape: tuple[int, ...], sampling: SamplingConfig,
               generator: torch.Generator, repeats: int = 1) -> torch.Tensor:
        steps = sampling.steps
        x, times = start_from_noise(shape, steps, generator, cond.device, repeats)
        for i in range(steps):
            t = times[i].expand(shape[0])
            out = guided(self.trunk, x, t, cond, null, Guidance.at(sampling, float(times[i])))
            x = x + (times[i + 1] - times[i]) * self.velocity(out, x, t)
        return x


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal) in continuous time, clipped away from 0 at t=1."""
    return (torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2).clamp(1e-5, 1.0)


class DiffusionDecoder(nn.Module):
    """Continuous-time DDPM with a cosine schedule and v- or eps-prediction; deterministic DDIM sampling."""

    def __init__(self, trunk: DecoderTrunk, prediction: str = "v"):
        super().__init__()
        if prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {prediction!r}")
        self.trunk, self.prediction = trunk, prediction

    def x0_from(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean target the trunk's output (v or eps) implies at x_t, time t [B]. With eps it divides by
        sqrt(alpha_bar), which reaches 1/sqrt(1e-5) near t = 1: a pixel term there wants a small `t_max`."""
        return self._x0_eps(x_t, cosine_alpha_bar(t)[:, None, None], out)[0]

    def loss(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.estimate(x0, cond).loss

    def estimate(self, x0: torch.Tensor, cond: torch.Tensor, layer: int | None = None) -> DecoderEstimate:
        t = torch.rand(len(x0), device=x0.device)
        a = cosine_alpha_bar(t)[:, None, None]
        eps = torch.randn_like(x0)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.prediction == "v" else eps
        out, hidden = run_trunk(self.trunk, x_t, t, cond, layer)
        return DecoderEstimate(F.mse_loss(out, target), self.x0_from(out, x_t, t), t, hidden)

    def _x0_eps(self, x_t: torch.Tensor, a: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prediction == "v":
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * pred
            eps = (1 - a).sqrt() * x_t + a.sqrt() * pred
        else:
            eps = pred
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return x0, eps

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, null: torch.Tensor, shape: tuple[int, ...], sampling: SamplingConfig,
               generator: torch.Generator, repeats: int = 1) -> torch.Tensor:
        steps = sampling.steps
        x, times = start_from_noise(shape, steps, generator, cond.device, repeats)
        for i in range(steps):
            t = times[i].expand(shape[0])
            a, a_next = cosine_alpha_bar(times[i]), cosine_alpha_bar(times[i + 1])
            guidance = Guidance.at(sampling, float(times[i]))
            x0, eps = self._x0_eps(x, a, guided(self.trunk, x, t, cond, null, guidance))
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps if i + 1 < steps else x0
        return x


def build_decoder(kind: str, trunk: DecoderTrunk, prediction: str, time_logit_mean: float = 0.0) -> nn.Module:
    if kind == "rectified_flow":
        return RectifiedFlowDecoder(trunk, time_logit_mean, prediction)
    if kind == "diffusion":
        return DiffusionDecoder(trunk, prediction)
    raise ValueError(f"unknown decoder '{kind}' (use rectified_flow or diffusion)")
