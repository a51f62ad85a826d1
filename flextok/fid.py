"""Fréchet distance between image feature distributions, with labelled backbones.

FID numbers are only comparable when they come from the same feature backbone, so every
statistic and result here carries the backbone's name. Two backbones are provided:

* ``InceptionV3Features``: the standard TF-ported FID Inception-v3 (pytorch-fid's
  ``pt_inception-2015-12-05`` weights), loaded only from a local file;
* ``DatasetClassifierFeatures``: a small CNN trained on the dataset's own labels, giving a
  "dataset FID" named ``dataset_classifier:<hash>`` that must never be compared with
  Inception FID.

Images follow the project convention: float tensors ``[B, 3, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

INCEPTION_WEIGHTS_ENV = "FLEXTOK_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"
INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048


# --------------------------------------------------------------------------- distance


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``. When the product is
    singular (fewer samples than dimensions) its square root can come back non-finite; then
    ``eps`` is added to both diagonals, as the reference FID implementations do. Small
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
    """Real square root of ``sigma1 @ sigma2``, regularised only when needed."""
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


# --------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming mean and covariance of features, accumulated in float64.

    Keeps the sum, the sum of outer products and the count, so arbitrarily many batches
    fit in ``O(D^2)`` memory. The covariance is the unbiased one (``np.cov`` with
    ``rowvar=False``), as in the reference FID code. ``backbone`` names the feature
    extractor, so statistics from different backbones cannot be mixed by accident.
    """

    def __init__(self, feature_dim: int, backbone: str) -> None:
        self.feature_dim = feature_dim
        self.backbone = backbone
        self.count = 0
        self._sum = np.zeros(feature_dim, dtype=np.float64)
        self._outer = np.zeros((feature_dim, feature_dim), dtype=np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features shaped ``[B, D]``."""
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features shaped [B, {self.feature_dim}], got {features.shape}")
        self.count += features.shape[0]
        self._sum += features.sum(axis=0)
        self._outer += features.T @ features

    @property
    def mean(self) -> np.ndarray:
        """Feature mean, shape ``[D]``."""
        if self.count == 0:
            raise ValueError("no features accumulated")
        return self._sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased feature covariance, shape ``[D, D]``."""
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

    ``name`` identifies the backbone and its weights; results with different names are
    not comparable. ``__call__`` maps images ``[B, 3, H, W]`` in ``[-1, 1]`` to float
    features ``[B, feature_dim]``.
    """

    name: str
    feature_dim: int

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch of images in [-1, 1], shape ``[B, feature_dim]``."""


def compute_feature_stats(extractor: FeatureExtractor, images: Iterable[torch.Tensor]) -> FeatureStats:
    """Stream image batches through ``extractor`` and accumulate their statistics."""
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


def _batched_features(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device: torch.device, batch_size: int
) -> torch.Tensor:
    """Run a frozen feature model over ``images`` in chunks and return float32 CPU features."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped [B, 3, H, W], got {tuple(images.shape)}")
    outputs = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            outputs.append(model(chunk.to(device, torch.float32)).float().cpu())
    return torch.cat(outputs)


# --------------------------------------------------------------------------- Inception-v3


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as in the TF graph) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_excluding_pad(x: torch.Tensor) -> torch.Tensor:
    """The TF graph's branch pooling: padded positions do not count towards the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d block, with the TF ported average pool that excludes padding."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3_excluding_pad(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionB(nn.Module):
    """Mixed_6a grid reduction (35x35 -> 17x17)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(nn.Module):
    """Mixed_6b-e blocks (factorised 7x7), with the padding-excluding average pool."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3_excluding_pad(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class FIDInceptionD(nn.Module):
    """Mixed_7a grid reduction (17x17 -> 8x8)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class FIDInceptionE(nn.Module):
    """Mixed_7b/c blocks (expanded filter banks).

    The TF graph pools differently in its two E blocks: Mixed_7b averages excluding
    padding, Mixed_7c takes a max. ``pool`` selects which; getting it wrong shifts FID.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            return _avg_pool_3x3_excluding_pad(x)
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1
        )
        branch_pool = self.branch_pool(self._pool(x))
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """The TF-ported FID Inception-v3 trunk, returning 2048-d pool features.

    Module names follow pytorch-fid's state dict (``Conv2d_1a_3x3.conv.weight``,
    ``Mixed_5b.branch1x1.bn.running_mean``, ...), so ``pt_inception-2015-12-05-6726825d.pth``
    loads with ``strict=True`` once its unused 1008-way ``fc`` head is dropped (see
    ``load_inception_state_dict``). The input is resized bilinearly to 299x299; images
    already in [-1, 1] need no further normalisation, because pytorch-fid maps its [0, 1]
    input to [-1, 1] and bilinear resizing commutes with that affine map.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = FIDInceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = FIDInceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features ``[B, 2048]`` of images in [-1, 1] of any size."""
        x = F.interpolate(
            images, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False
        )
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        mixed_blocks = (
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
            self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c,
        )  # fmt: skip
        for block in mixed_blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


def _missing_inception_weights_message(detail: str) -> str:
    return (
        f"FID Inception-v3 weights not found ({detail}). Nothing is downloaded at run time. "
        f"On a machine with internet access, download {INCEPTION_WEIGHTS_FILENAME} from "
        f"{INCEPTION_WEIGHTS_URL} (pytorch-fid's port of TF inception-2015-12-05), copy it to this "
        f"machine, then either set the environment variable {INCEPTION_WEIGHTS_ENV}=/path/to/"
        f"{INCEPTION_WEIGHTS_FILENAME} or pass weights_path=... to InceptionV3Features. Without it, "
        "use DatasetClassifierFeatures, whose 'dataset FID' must not be compared with Inception FID."
    )


def resolve_inception_weights(weights_path: str | os.PathLike[str] | None = None) -> Path:
    """The local weights file: ``weights_path`` if given, else ``$FLEXTOK_INCEPTION_WEIGHTS``."""
    if weights_path is None:
        weights_path = os.environ.get(INCEPTION_WEIGHTS_ENV)
        if not weights_path:
            raise FileNotFoundError(_missing_inception_weights_message(f"{INCEPTION_WEIGHTS_ENV} is not set"))
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(_missing_inception_weights_message(f"no file at {path}"))
    return path


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_backbone_name(weights_file: Path) -> str:
    """Name the backbone after the weights actually loaded.

    Only the genuine pytorch-fid file (sha256 prefix ``6726825d``) is called
    ``inception_v3:pt_inception-2015-12-05``; any other file gets its own hash in the
    name, so its numbers can never pass for standard FID.
    """
    sha = _sha256_of_file(weights_file)
    if sha.startswith(INCEPTION_WEIGHTS_SHA256_PREFIX):
        return "inception_v3:pt_inception-2015-12-05"
    return f"inception_v3:custom-{sha[:12]}"


def load_inception_state_dict(model: FIDInceptionV3, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load pytorch-fid weights strictly, ignoring only the classifier head FID never uses."""
    trunk_state = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    model.load_state_dict(trunk_state, strict=True)


class InceptionV3Features(FeatureExtractor):
    """Standard FID features: 2048-d pool3 of the TF-ported Inception-v3 at 299x299.

    Weights come only from ``weights_path`` or ``$FLEXTOK_INCEPTION_WEIGHTS`` (a pytorch-fid
    state dict); a missing file raises ``FileNotFoundError`` explaining how to provide it.
    """

    feature_dim = INCEPTION_FEATURE_DIM

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        path = resolve_inception_weights(weights_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = FIDInceptionV3()
        load_inception_state_dict(self.model, torch.load(path, map_location="cpu", weights_only=True))
        self.model.to(self.device).eval().requires_grad_(False)
        self.name = inception_backbone_name(path)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return _batched_features(self.model, images, self.device, self.batch_size)


# --------------------------------------------------------------------------- dataset classifier


class DatasetClassifier(nn.Module):
    """A small CNN classifier whose penultimate layer serves as a dataset-specific FID backbone.

    Three stride-2 stages and global average pooling make it work at any resolution of
    16x16 or more. GroupNorm keeps features independent of batch composition.
    """

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        stage_channels = [width, 2 * width, 4 * width, 4 * width]
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
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, feature_dim)]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate (pre-activation) features ``[B, feature_dim]``.

        Taken before the nonlinearity so that no dimension is stuck at a constant, which
        would make the feature covariance singular.
        """
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(images))


class DatasetClassifierFeatures(FeatureExtractor):
    """'Dataset FID' features from a ``DatasetClassifier`` trained on this dataset's labels.

    The name ``dataset_classifier:<key>`` ties results to the exact data and training
    config, so they are never compared with Inception FID or with another classifier.
    """

    def __init__(
        self,
        network: DatasetClassifier,
        key: str,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.key = key
        self.name = f"dataset_classifier:{key}"
        self.feature_dim = network.feature_dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return _batched_features(self.network.features, images, self.device, self.batch_size)


def _classifier_config(
    num_classes: int, steps: int, seed: int, batch_size: int, lr: float, width: int, feature_dim: int
) -> dict[str, int | float | str]:
    """Everything that determines the trained weights besides the data."""
    return {
        "format": "flextok-dataset-classifier-v1",
        "num_classes": num_classes,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "width": width,
        "feature_dim": feature_dim,
    }


def dataset_classifier_key(images: torch.Tensor, labels: torch.Tensor, config: Mapping[str, object]) -> str:
    """Short sha256 over the images, labels and training config: the cache key and backbone id."""
    digest = hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_labelled_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 16:
        raise ValueError(f"expected images shaped [N, 3, H>=16, W>=16], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels shaped [{images.shape[0]}], got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _fit_classifier(
    network: DatasetClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: Mapping[str, int | float | str],
    device: torch.device,
    progress: bool,
) -> None:
    """Cross-entropy training on random minibatches drawn with a seeded generator."""
    generator = torch.Generator().manual_seed(int(config["seed"]))
    optimizer = torch.optim.AdamW(network.parameters(), lr=float(config["lr"]))
    network.to(device).train()
    bar = tqdm(range(int(config["steps"])), desc="dataset classifier", disable=not progress)
    for _ in bar:
        index = torch.randint(0, images.shape[0], (int(config["batch_size"]),), generator=generator)
        logits = network(images[index].to(device, torch.float32))
        loss = F.cross_entropy(logits, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    network.eval()


def _new_classifier(config: Mapping[str, int | float | str]) -> DatasetClassifier:
    """Build the classifier with seeded init without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))
        return DatasetClassifier(int(config["num_classes"]), int(config["width"]), int(config["feature_dim"]))


def _save_classifier(network: DatasetClassifier, path: Path, config: Mapping[str, object], key: str) -> None:
    """Write the weights atomically, so a concurrent run never reads a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(state, str(partial), metadata={"config": json.dumps(dict(config), sort_keys=True), "key": key})
    os.replace(partial, path)


def train_dataset_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int,
    seed: int,
    cache_dir: str | os.PathLike[str],
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 32,
    feature_dim: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> DatasetClassifierFeatures:
    """Train (once) a dataset classifier and return it as an FID feature extractor.

    Weights are cached as ``<cache_dir>/dataset_classifier-<key>.safetensors`` where ``key``
    hashes the images, labels and config; a later call with the same inputs reloads them
    instead of training, so every evaluation of a dataset uses the same backbone.
    ``images`` are ``[N, 3, H, W]`` in [-1, 1] with H, W >= 16; ``labels`` are ``[N]`` ints.
    """
    _check_labelled_images(images, labels, num_classes)
    config = _classifier_config(num_classes, steps, seed, batch_size, lr, width, feature_dim)
    key = dataset_classifier_key(images, labels, config)
    path = Path(cache_dir) / f"dataset_classifier-{key}.safetensors"
    network = _new_classifier(config)
    if path.is_file():
        network.load_state_dict(load_file(path), strict=True)
    else:
        _fit_classifier(network, images, labels.long(), config, torch.device(device), progress)
        _save_classifier(network, path, config, key)
    return DatasetClassifierFeatures(network, key, device=device)
