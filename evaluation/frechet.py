"""Fréchet distance between image feature distributions, with labelled backbones.

FID numbers are only comparable when they come from the same feature backbone, so every
statistic and result here carries the backbone's name. The backbones live beside this module:
`evaluation.inception.InceptionV3Features` (standard FID) and
`evaluation.dataset_classifier.DatasetClassifierFeatures` ("dataset FID", never comparable with
Inception FID).

Images follow the project convention: float tensors `[B, 3, H, W]` in `[-1, 1]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "batched_features",
    "FIDResult",
    "FeatureExtractor",
    "FeatureStats",
    "compute_feature_stats",
    "fid",
    "fid_from_stats",
    "frechet_distance",
]


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    `||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))`. When the product is
    singular (fewer samples than dimensions) its square root can come back non-finite; then
    `eps` is added to both diagonals, as the reference FID implementations do. Small
    imaginary parts from numerical error are dropped; large ones mean the inputs are not
    covariance matrices and raise.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, np.float64)) for sigma in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        shapes = f"mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}"
        raise ValueError(f"mismatched shapes: {shapes}")
    covmean = _sqrtm_product(sigma1, sigma2, eps)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    """Real square root of `sigma1 @ sigma2`, regularised only when needed."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has an imaginary component of {max_imag:.3g}")
        covmean = covmean.real
    return covmean


class FeatureStats:
    """Streaming mean and covariance of features, accumulated in float64, plus the features themselves
    (float32) for KID, which needs samples rather than moments.

    The covariance is the unbiased one (`np.cov` with `rowvar=False`), as in the reference FID code.
    `backbone` names the feature extractor, so statistics from different backbones cannot be mixed by
    accident.
    """

    def __init__(self, feature_dim: int, backbone: str) -> None:
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.count = 0
        self._sum = np.zeros(feature_dim, dtype=np.float64)
        self._outer = np.zeros((feature_dim, feature_dim), dtype=np.float64)
        self._features: list[np.ndarray] = []

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features shaped `[B, D]`."""
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features shaped [B, {self.feature_dim}], got {features.shape}")
        self.count += features.shape[0]
        self._sum += features.sum(axis=0)
        self._outer += features.T @ features
        self._features.append(features.astype(np.float32))

    @property
    def features(self) -> np.ndarray:
        """Every feature row added, `[count, D]`."""
        return np.concatenate(self._features) if self._features else np.zeros((0, self.feature_dim), np.float32)

    @property
    def mean(self) -> np.ndarray:
        """Feature mean, shape `[D]`."""
        if self.count == 0:
            raise ValueError("no features accumulated")
        return self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased feature covariance, shape `[D, D]`."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mean = self.mean
        return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)


@dataclass(frozen=True)
class FIDResult:
    """An FID value together with what is needed to read it honestly.

    FID depends on the backbone and is biased upward at small sample counts, so both
    travel with the number.
    """

    value: float
    backbone: str
    num_real: int
    num_fake: int

    def __str__(self) -> str:
        return f"FID[{self.backbone}] = {self.value:.4f} (real n={self.num_real}, fake n={self.num_fake})"


class FeatureExtractor(ABC):
    """A frozen image-feature backbone for FID.

    `name` identifies the backbone and its weights; results with different names are
    not comparable. `__call__` maps images `[B, 3, H, W]` in `[-1, 1]` to float
    features `[B, feature_dim]`.
    """

    name: str
    feature_dim: int

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch of images in [-1, 1], shape `[B, feature_dim]`."""


def compute_feature_stats(extractor: FeatureExtractor, images: Iterable[torch.Tensor]) -> FeatureStats:
    """Stream image batches through `extractor` and accumulate their statistics."""
    stats = FeatureStats(extractor.feature_dim, extractor.name)
    for batch in images:
        stats.update(extractor(batch))
    return stats


def fid_from_stats(real: FeatureStats, fake: FeatureStats) -> FIDResult:
    """FID between two precomputed statistics, refusing to mix backbones."""
    if real.backbone != fake.backbone:
        raise ValueError(f"statistics come from different backbones: {real.backbone!r} vs {fake.backbone!r}")
    value = frechet_distance(real.mean, real.cov, fake.mean, fake.cov)
    return FIDResult(value=value, backbone=real.backbone, num_real=real.count, num_fake=fake.count)


def fid(
    extractor: FeatureExtractor,
    real_images_iter: Iterable[torch.Tensor],
    fake_images_iter: Iterable[torch.Tensor],
) -> FIDResult:
    """FID between two streams of image batches in [-1, 1], labelled with the backbone."""
    real = compute_feature_stats(extractor, real_images_iter)
    fake = compute_feature_stats(extractor, fake_images_iter)
    return fid_from_stats(real, fake)


def batched_features(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device, batch_size: int
) -> torch.Tensor:
    """Run a frozen feature model over `images` in chunks and return float32 CPU features."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped [B, 3, H, W], got {tuple(images.shape)}")
    outputs = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            outputs.append(model(chunk.to(device, torch.float32)).float().cpu())
    return torch.cat(outputs)
