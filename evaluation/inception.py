"""The standard FID backbone: the TF-ported Inception-v3 of pytorch-fid, loaded only from a local file.

The weights are pytorch-fid's `pt_inception-2015-12-05`; nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from base.weights import resolve_local_weights

from .frechet import FeatureExtractor, batched_features

__all__ = [
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_INPUT_SIZE",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_SHA256_PREFIX",
    "INCEPTION_WEIGHTS_URL",
    "BasicConv2d",
    "FIDInceptionA",
    "FIDInceptionB",
    "FIDInceptionC",
    "FIDInceptionD",
    "FIDInceptionE",
    "FIDInceptionV3",
    "InceptionV3Features",
    "inception_backbone_name",
    "load_inception_state_dict",
    "resolve_inception_weights",
]

INCEPTION_WEIGHTS_ENV = "FLEXTOK_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_WEIGHTS_SHA256_PREFIX = "6726825d"
INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048


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
    padding, Mixed_7c takes a max. `pool` selects which; getting it wrong shifts FID.
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

    Module names follow pytorch-fid's state dict (`Conv2d_1a_3x3.conv.weight`,
    `Mixed_5b.branch1x1.bn.running_mean`, ...), so `pt_inception-2015-12-05-6726825d.pth`
    loads with `strict=True` once its unused 1008-way `fc` head is dropped (see
    `load_inception_state_dict`). The input is resized bilinearly to 299x299; images
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
        """Pool features `[B, 2048]` of images in [-1, 1] of any size."""
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
    """The local weights file: `weights_path` if given, else `$FLEXTOK_INCEPTION_WEIGHTS`."""
    return resolve_local_weights(weights_path, INCEPTION_WEIGHTS_ENV, _missing_inception_weights_message)


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_backbone_name(weights_file: Path) -> str:
    """Name the backbone after the weights actually loaded.

    Only the genuine pytorch-fid file (sha256 prefix `6726825d`) is called
    `inception_v3:pt_inception-2015-12-05`; any other file gets its own hash in the
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

    Weights come only from `weights_path` or `$FLEXTOK_INCEPTION_WEIGHTS` (a pytorch-fid
    state dict); a missing file raises `FileNotFoundError` explaining how to provide it.
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
        return batched_features(self.model, images, self.device, self.batch_size)
