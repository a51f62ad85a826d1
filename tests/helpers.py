"""Helpers shared by the test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

__all__ = ["DIST_ENV", "fit", "launcher_env", "require_launcher"]

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env() -> dict[str, str]:
    """This process's environment without the process-group variables, for a launcher started from a test
    (a one-rank group set up in this process must not leak into the ranks it starts)."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV}


def require_launcher(name: str = "deepspeed") -> None:
    """Skip a multi-rank test when the `name` launcher is not on PATH, but fail it under `CI=true`: CI must
    not pass without running the multi-rank tests."""
    if shutil.which(name) is not None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"the {name} launcher is not on PATH, and CI=true: multi-rank tests must run in CI",
                    pytrace=False)
    pytest.skip(f"the {name} launcher is not on PATH")


def fit(objective: torch.nn.Module, images: torch.Tensor, steps: int, lr: float) -> None:
    """Plain AdamW on one fixed batch: the overfitting loop shared by the model tests."""
    opt = torch.optim.AdamW(objective.parameters(), lr=lr)
    for step in range(steps):
        loss, _ = objective(images, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
