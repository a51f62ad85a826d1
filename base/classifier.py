"""The dataset classifier: a small CNN trained on a dataset's own labels. The evaluation trains one as its
"dataset FID" backbone (`evaluation.dataset_classifier`); saved in the Hub format it is also a REPA teacher
(`base.teachers`). It lives in the base layer so that the tokenizer stage can load it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import check
from .hub import HubMixin, register_model

__all__ = ["ClassifierArgs", "ClassifierConfig", "DatasetClassifier"]


@dataclass
class ClassifierConfig:
    """The classifier's architecture: classes, base width (stages of 1, 2, 4 and 4 x width channels) and the
    width of its penultimate features."""

    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128

    def __post_init__(self):
        check(self.num_classes >= 2, "num_classes' must be at least 2", self.num_classes)
        check(self.width > 0 and self.width % 8 == 0, "width' must be a positive multiple of 8 (GroupNorm(8))",
              self.width)
        check(self.feature_dim > 0, "feature_dim' must be positive", self.feature_dim)


@dataclass
class ClassifierArgs:
    """`DatasetClassifier` takes no constructor arguments besides its config."""


@register_model("dataset_classifier")
class DatasetClassifier(HubMixin, nn.Module):
    """A small CNN classifier whose penultimate layer serves as a dataset-specific FID backbone.

    Three stride-2 stages and global average pooling make it work at any resolution of
    16x16 or more. GroupNorm keeps features independent of batch composition.
    """

    config_class = ClassifierConfig
    args_class = ClassifierArgs

    def __init__(self, config: ClassifierConfig) -> None:
        nn.Module.__init__(self)
        HubMixin.__init__(self, config)
        stage_channels = [config.width, 2 * config.width, 4 * config.width, 4 * config.width]
        layers: list[nn.Module] = []
        in_channels = 3
        for index, channels in enumerate(stage_channels):
            stride = 1 if index == 0 else 2
            layers += [
                nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1),
                nn.GroupNorm(8, channels),
                nn.SiLU(),
            ]
            in_channels = channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, config.feature_dim)]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(config.feature_dim, config.num_classes))

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """As a REPA teacher (`base.teachers.Teacher`): the last stage's feature map before global pooling,
        [B, 4 x width, H/8, W/8]."""
        return self.trunk[:-3](images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate (pre-activation) features `[B, feature_dim]`.

        Taken before the nonlinearity so that no dimension is stuck at a constant, which
        would make the feature covariance singular.
        """
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits `[B, num_classes]`."""
        return self.head(self.features(images))
