"""Helpers shared by the test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import torch

__all__ = ["fit"]


def fit(objective: torch.nn.Module, images: torch.Tensor, steps: int, lr: float) -> None:
    """Plain AdamW on one fixed batch: the overfitting loop shared by the model tests."""
    opt = torch.optim.AdamW(objective.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = objective(images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
