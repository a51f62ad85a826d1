"""A small causal prior over the 1D tokenizer's register codes, trained jointly with it (LARP / CRT style).

It reads the quantizer's straight-through code vectors, not token ids, so its next-token NLL has a gradient
with respect to the codes and, through the quantizer, the encoder. Logits are dot products of the prior's
output with an embedding of every code vector of the codebook; the target's logit is computed from the
batch's own (straight-through) code, so the encoder gets a gradient from both the context and the target.
Part of `FlexTokObjective` (the `prior_loss` section), never of the saved tokenizer.
"""

from __future__ import annotations

import torch
from torch import nn
from x_transformers import Decoder

__all__ = ["JointPrior", "scale_gradient"]


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` in the forward pass (exactly: x - x.detach() is 0), its gradient times `scale` in the backward."""
    return x.detach() + scale * (x - x.detach())


class JointPrior(nn.Module):
    """Next-token model over R code vectors [B, R, q]: a learned start token, then codes 0..R-2, predict
    codes 0..R-1."""

    def __init__(self, *, code_dim: int, num_positions: int, dim: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        # phi: code vector -> embedding, shared by the inputs and the logits. A logit linear in the raw code (a
        # few FSQ levels in [-1, 1]) could only tilt each level monotonically; phi gives every code its own
        # logit while staying a differentiable function of the code.
        self.embed = nn.Sequential(nn.Linear(code_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(num_positions, dim) * 0.02)
        self.trunk = Decoder(dim=dim, depth=depth, heads=heads, attn_flash=True, ff_glu=True)
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, codes: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """codes [B, R, q] (straight-through), their indices [B, R] and every code vector of the codebook
        [V, q] -> the NLL of each token given the ones before it, in nats [B, R]."""
        emb = self.embed(codes)
        inputs = torch.cat([self.start.expand(len(codes), 1, -1), emb[:, :-1]], dim=1) + self.pos
        out = self.proj_out(self.norm_out(self.trunk(inputs))).float()
        logits = out @ self.embed(codebook).float().T
        target = (out * emb.float()).sum(-1)  # the target's logit, through its straight-through code
        logits = logits.scatter(-1, indices[..., None], target[..., None])
        return torch.logsumexp(logits, dim=-1) - target
