"""Classifier-free guidance, once for every sampler: the 1D tokenizer's decoders, the flow prior and the
token prior.

Scale 1 is the conditional model and scale 0 the unconditional one: each runs its rows alone. Any other
scale runs the conditional and the null rows in one batch and returns null + scale * (cond - null).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schema import SamplingConfig

__all__ = ["Guidance"]


@dataclass(frozen=True)
class Guidance:
    """Which rows a guided sampler runs, and how their outputs combine.

    `conditional` is False when there is nothing to guide with (an unconditional model, no labels):
    then only the null rows run, whatever the scale.
    """

    scale: float
    conditional: bool = True

    @property
    def uses_condition(self) -> bool:
        return self.conditional and self.scale != 0

    @property
    def batched(self) -> bool:
        """Conditional and null rows share each forward pass."""
        return self.uses_condition and self.scale != 1

    @classmethod
    def at(cls, sampling: SamplingConfig, t: float, conditional: bool = True) -> Guidance:
        """The guidance of one sampler step at noise level `t` (1 = noise): `sampling.guidance_scale` inside
        `sampling.guidance_interval`, the plain conditional model (one pass instead of two) outside it. Scale
        0 (the unconditional model) and 1 are not guidance and hold at every step."""
        low, high = sampling.guidance_interval
        scale = sampling.guidance_scale
        inside = low - 1e-6 <= t <= high + 1e-6  # the time grid is float32
        return cls(scale if scale in (0.0, 1.0) or inside else 1.0, conditional)

    def conditions(self, cond: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """The condition rows to run: [cond, null], cond alone, or null alone."""
        if self.batched:
            return torch.cat([cond, null])
        return cond if self.uses_condition else null

    def repeat(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs shared by the conditional and the null rows."""
        return torch.cat([x, x]) if self.batched else x

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """The guided output from the rows' outputs."""
        if not self.batched:
            return out
        cond, null = out.chunk(2)
        return torch.lerp(null, cond, self.scale)
