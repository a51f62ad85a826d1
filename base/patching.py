"""Patchify / unpatchify latent or pixel grids, and fixed 2D sin-cos position embeddings."""

from __future__ import annotations

import math

import torch
from einops import rearrange

__all__ = ["patchify", "sincos_2d", "timestep_embedding", "unpatchify"]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], raster order."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """Inverse of `patchify` for a square grid of `grid` x `grid` patches."""
    return rearrange(x, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=grid, w=grid, c=channels, p1=p, p2=p)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed embedding: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter) / quarter)
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angles = pos[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of continuous time t in [0, 1] (scaled so small t differences are visible)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)
