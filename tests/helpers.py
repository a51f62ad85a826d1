"""Helpers shared by the test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import os

import torch

__all__ = ["DIST_ENV", "fit", "launcher_env"]

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env() -> dict[str, str]:
    """This process's environment without the process-group variables, for a launcher started from a test
    (a one-rank group set up in this process must not leak into the ranks it starts)."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def fit(objective: torch.nn.Module, images: torch.Tensor, steps: int, lr: float) -> None:
    """Plain AdamW on one fixed batch: the overfitting loop shared by the model tests."""
    opt = torch.optim.AdamW(objective.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = objective(images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
