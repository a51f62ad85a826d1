"""The 1D tokenizer's encoder: a transformer over [patch tokens | R register tokens].

Attention mask (True = may attend): patches see patches only; register i sees every patch and
registers 0..i. So register i never depends on later registers, which makes every prefix meaningful.
In token-set mode registers see all registers (order carries no meaning there).
"""

from __future__ import annotations

import torch
from torch import nn
from x_transformers import Encoder

from base.patching import sincos_2d

__all__ = ["RegisterEncoder", "register_attention_mask"]


def register_attention_mask(num_patches: int, num_registers: int, causal_registers: bool = True) -> torch.Tensor:
    n = num_patches + num_registers
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, :num_patches] = True  # everyone sees the patches
    reg = torch.ones(num_registers, num_registers, dtype=torch.bool)
    mask[num_patches:, num_patches:] = reg.tril() if causal_registers else reg
    return mask


class RegisterEncoder(nn.Module):
    def __init__(self, *, patch_dim: int, grid: int, num_registers: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float, causal_registers: bool = True):
        super().__init__()
        self.proj_in = nn.Linear(patch_dim, dim)
        self.register_buffer("pos", sincos_2d(grid, dim), persistent=False)
        self.registers = nn.Parameter(torch.randn(num_registers, dim))  # unit scale: distinct roles from step 0
        self.trunk = Encoder(dim=dim, depth=depth, heads=heads, attn_flash=True, ff_glu=True, ff_mult=mlp_ratio)
        self.register_buffer(
            "mask", register_attention_mask(grid * grid, num_registers, causal_registers), persistent=False
        )
        self.num_patches = grid * grid

    def forward(self, patches: torch.Tensor, return_patches: bool = False):
        """[B, N, patch_dim] -> register features [B, R, dim]; with `return_patches` the pair (registers, the
        patch tokens' last-layer features [B, N, dim]), which REPA's encoder side aligns."""
        x = self.proj_in(patches) + self.pos
        regs = self.registers.expand(len(x), -1, -1)
        out = self.trunk(torch.cat([x, regs], dim=1), attn_mask=self.mask)
        registers = out[:, self.num_patches :]
        return (registers, out[:, : self.num_patches]) if return_patches else registers
