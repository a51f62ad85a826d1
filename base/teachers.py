"""Frozen teachers for representation alignment (REPA, Yu et al. 2024; VA-VAE for grid latents).

A teacher is any saved model of this project (Hub format, `base.hub.load_model`) whose class implements
`Teacher.patch_features`: images [B, 3, H, W] in [-1, 1] -> a feature map [B, C, h, w]. Its class must be
registered by a package the tokenizer stage imports (`base`, `grid`, `flextok`): a grid autoencoder and the
dataset classifier (`base.classifier`; the evaluation trains one per dataset) qualify. A student's features,
projected to C channels, are pulled toward the teacher's features of the
clean image by `alignment_loss` (1 - cosine similarity per patch, averaged). No pretrained foreign network is
involved: `repa.teacher` is a model saved by this project (a folder, or `hf:owner/name`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import classifier  # noqa: F401  (registers the dataset classifier with load_model: it is a teacher)
from .errors import ConfigError, UserError
from .hub import CONFIG_NAME, MODEL_TYPES, load_model, parse_model_meta, read_model_meta

__all__ = ["Alignment", "Teacher", "alignment_loss", "load_teacher", "mlp_projector", "resize_features",
           "teacher_architecture"]


@runtime_checkable
class Teacher(Protocol):
    """What a REPA teacher exposes: spatial features of images in the project's range [-1, 1]."""

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> features [B, C, h, w]."""
        ...


def load_teacher(reference: str, *, key: str = "repa.teacher") -> nn.Module:
    """The saved model at `reference` (a folder or `hf:owner/name`), frozen and in eval mode; a missing or
    unusable model is a one-line UserError naming `key`."""
    try:
        model = load_model(reference)
    except UserError as err:
        raise UserError(f"{key}: {err}") from None
    return _frozen_teacher(model, reference, key)


def teacher_architecture(reference: str, *, key: str = "repa.teacher") -> nn.Module:
    """The teacher saved at `reference` built from its `config.json` alone, on the default device (`--plan`:
    the meta device); its weights are not read."""
    try:
        directory, meta = read_model_meta(reference)
        cls = MODEL_TYPES[meta["model_type"]]
        config, args = parse_model_meta(cls, meta, directory / CONFIG_NAME)
    except UserError as err:
        raise UserError(f"{key}: {err}") from None
    return _frozen_teacher(cls(config, **args), reference, key)


def _frozen_teacher(model: nn.Module, reference: str, key: str) -> nn.Module:
    if not isinstance(model, Teacher):
        raise ConfigError(f"{key}: {reference} holds a '{model.model_type}' model, which has no patch_features "
                          "(a teacher must be a saved model whose class implements base.teachers.Teacher)")
    return model.requires_grad_(False).eval()


class Alignment(nn.Module):
    """REPA's pieces, held by a training objective: a frozen teacher and one trainable projector per aligned
    student feature (`widths`: name -> the feature's width), each to the teacher's channel count.

    The teacher's parameters have requires_grad False (no optimizer gets them) and it never enters training
    mode; it is not part of the tokenizer, so neither the EMA copy nor the exported weights hold it (the
    training checkpoint does, with the rest of the objective)."""

    def __init__(self, teacher: nn.Module, resolution: int, widths: dict[str, int], *,
                 projector: Callable[[int, int], nn.Module] | None = None, key: str = "repa.teacher"):
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.channels = self._probe_channels(resolution, key)
        self.widths, make = dict(widths), projector or mlp_projector
        self.projectors = nn.ModuleDict({name: make(width, self.channels) for name, width in widths.items()})

    def _probe_channels(self, resolution: int, key: str) -> int:
        """The teacher's channel count, from one image at the student's resolution (checks the output's shape)."""
        device = next(self.teacher.parameters(), torch.empty(0)).device
        with torch.no_grad():
            out = self.teacher.patch_features(torch.zeros(1, 3, resolution, resolution, device=device))
        if out.ndim != 4 or out.shape[0] != 1:
            raise ConfigError(f"{key}: patch_features must return [B, C, h, w], got shape {tuple(out.shape)}")
        return out.shape[1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout, posterior sampling and the like stay off
        return self

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's features [B, C, h, w] of the clean `images` (fp32, no gradient)."""
        return self.teacher.patch_features(images).float()

    def loss(self, name: str, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`alignment_loss` of student `features` [B', N, width] through projector `name` against `targets`
        [B, C, h, w]; B' may be a multiple of B (copies of the batch stacked copy after copy)."""
        targets = targets.repeat(len(features) // len(targets), 1, 1, 1)
        return alignment_loss(self.projectors[name](features), targets)


def mlp_projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: two linear layers with SiLU, hidden width the larger of the two widths."""
    hidden = max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


def resize_features(features: torch.Tensor, side: int) -> torch.Tensor:
    """A feature map [B, C, h, w] on a side x side grid: average pooling when it is at least as fine
    (each patch gets the mean of the teacher features it covers), bilinear interpolation when coarser."""
    if features.shape[-2:] == (side, side):
        return features
    if min(features.shape[-2:]) >= side:
        return F.adaptive_avg_pool2d(features, side)
    return F.interpolate(features, size=(side, side), mode="bilinear", align_corners=False)


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity per patch, averaged: `student` [B, N, C] projected features of a square grid of
    N patches in raster order, `teacher` [B, C, h, w] (resized to that grid). 0 when aligned, at most 2."""
    side = round(student.shape[1] ** 0.5)
    if side * side != student.shape[1]:
        raise ValueError(f"expected the features of a square patch grid, got {student.shape[1]} patches")
    target = resize_features(teacher, side).flatten(2).transpose(1, 2)  # [B, N, C], raster order
    return (1 - F.cosine_similarity(student.float(), target.float(), dim=-1)).mean()
