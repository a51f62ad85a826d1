"""LPIPS (VGG16, v0.1) perceptual distance, loaded only from local weights.

Used both as an evaluation metric and as an optional autoencoder training loss, so the
module is frozen but differentiable with respect to its inputs. The computation follows
Zhang et al. 2018 (`lpips` package, `net='vgg'`, v0.1): shift/scale the [-1, 1] input,
take VGG16 relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 activations, unit-normalise each
over channels, square the differences, weight channels with learned 1x1 "lin" convs,
average spatially and sum over the five layers.

Weights file (`.safetensors`, or `.pth` holding a plain state dict) with these keys,
listed by `lpips_state_dict_shapes()`:

* `features.{i}.weight` / `features.{i}.bias` for i in 0, 2, 5, 7, 10, 12, 14, 17, 19,
  21, 24, 26, 28: the VGG16 conv layers, named exactly as torchvision's `vgg16().features`;
* `lins.{k}.weight` for k in 0..4, shaped `[1, C_k, 1, 1]`: the lpips package's
  `lin{k}.model.1.weight`.

`LPIPS.from_torchvision_and_lpips` builds that file's content from torchvision's
`vgg16-397923af.pth` plus lpips' `weights/v0.1/vgg.pth`; `save_weights` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .errors import UserError
from .weights import resolve_local_weights

__all__ = ["LPIPS", "LPIPS_LIN_URL", "LPIPS_WEIGHTS_ENV", "TORCHVISION_VGG16_URL", "lpips_state_dict_shapes"]

LPIPS_WEIGHTS_ENV = "FLEXTOK_LPIPS_WEIGHTS"
TORCHVISION_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# VGG16 "D" configuration up to relu5_3: conv widths, "M" for 2x2 max pooling.
_VGG16_TRUNK = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in the features Sequential whose ReLU outputs LPIPS compares (relu1_2 ... relu5_3).
_TAP_INDICES = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10


def _vgg16_trunk() -> nn.Sequential:
    """VGG16 conv trunk through relu5_3, with torchvision's layer indices (so its keys load)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for spec in _VGG16_TRUNK:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(spec), kernel_size=3, padding=1), nn.ReLU()]
            in_channels = int(spec)
    return nn.Sequential(*layers)


def lpips_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key an LPIPS weights file must hold, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for index, layer in enumerate(_vgg16_trunk()):
        if isinstance(layer, nn.Conv2d):
            shapes[f"features.{index}.weight"] = tuple(layer.weight.shape)
            shapes[f"features.{index}.bias"] = tuple(layer.bias.shape)
    for k, channels in enumerate(_TAP_CHANNELS):
        shapes[f"lins.{k}.weight"] = (1, channels, 1, 1)
    return shapes


def _unit_normalize(features: torch.Tensor) -> torch.Tensor:
    """Divide by the channel L2 norm, as lpips does (`x / (||x|| + eps)`).

    `vector_norm` has a zero (not NaN) gradient at an all-zero feature vector, which
    ReLU features do produce, so training through the loss stays finite.
    """
    return features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + _NORM_EPS)


def _missing_weights_message(detail: str) -> str:
    return (
        f"LPIPS weights not found ({detail}). Nothing is downloaded at run time. On a machine with "
        f"internet access, download torchvision's VGG16 weights ({TORCHVISION_VGG16_URL}) and the "
        f"lpips v0.1 lin weights ({LPIPS_LIN_URL}; also inside the `lpips` pip package as "
        "lpips/weights/v0.1/vgg.pth), then run "
        "`LPIPS.from_torchvision_and_lpips(vgg16_path, lin_path).save_weights('lpips_vgg.safetensors')`, "
        f"copy that file here and set {LPIPS_WEIGHTS_ENV}=/path/to/lpips_vgg.safetensors "
        "or pass its path to LPIPS.from_pretrained(path)."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a plain-tensor .pth, never executing pickled code."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return dict(torch.load(path, map_location="cpu", weights_only=True))


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 distance: `forward(x, y)` returns `[B]` for images in [-1, 1].

    Construction always takes a complete state dict (see module docstring for its keys),
    so a model can never silently run with random weights; use `from_pretrained` for a
    local file. Parameters are frozen, gradients still flow to the inputs, and there is
    no dropout or batch norm, so train and eval modes compute the same thing.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.features = _vgg16_trunk()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.load_state_dict(dict(state_dict), strict=True)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None) -> LPIPS:
        """Load from `path` or `$FLEXTOK_LPIPS_WEIGHTS`; FileNotFoundError says how to get it."""
        weights = resolve_local_weights(path, LPIPS_WEIGHTS_ENV, _missing_weights_message, what="LPIPS weights")
        return cls(_read_state_dict(weights))

    @classmethod
    def for_training(cls, path: str | os.PathLike[str] | None, key: str) -> LPIPS:
        """`from_pretrained` for a loss term: missing weights are one line naming the config `key`."""
        try:
            return cls.from_pretrained(path)
        except FileNotFoundError as err:
            raise UserError(f"{key}: {err}") from None

    @classmethod
    def from_torchvision_and_lpips(
        cls, vgg16_path: str | os.PathLike[str], lin_path: str | os.PathLike[str]
    ) -> LPIPS:
        """Combine torchvision's `vgg16` state dict with the lpips package's v0.1 `vgg.pth`.

        Takes the `features.*` conv weights from the first (the classifier is unused) and
        maps `lin{k}.model.1.weight` to `lins.{k}.weight` from the second.
        """
        vgg_file = resolve_local_weights(vgg16_path, None, _missing_weights_message, what="torchvision vgg16")
        lin_file = resolve_local_weights(lin_path, None, _missing_weights_message, what="lpips vgg.pth")
        vgg_state, lin_state = _read_state_dict(vgg_file), _read_state_dict(lin_file)
        expected = lpips_state_dict_shapes()
        combined = {key: vgg_state[key] for key in expected if key.startswith("features.")}
        for k in range(len(_TAP_CHANNELS)):
            combined[f"lins.{k}.weight"] = lin_state[f"lin{k}.model.1.weight"]
        return cls(combined)

    def save_weights(self, path: str | os.PathLike[str]) -> None:
        """Write the single-file weights (safetensors) that `from_pretrained` reads."""
        state = {key: tensor.detach().cpu().contiguous() for key, tensor in self.state_dict().items()}
        save_file(state, str(path))

    def _layer_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised relu1_2 ... relu5_3 activations."""
        x = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAP_INDICES:
                taps.append(_unit_normalize(x))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance `[B]` between images `[B, 3, H, W]` in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two [B, 3, H, W] batches, got {tuple(x.shape)} and {tuple(y.shape)}")
        features = self._layer_features(torch.cat([x, y]))
        distance = x.new_zeros(x.shape[0])
        for lin, feature in zip(self.lins, features):
            fx, fy = feature.chunk(2)
            distance = distance + lin((fx - fy).square()).mean(dim=(1, 2, 3))
        return distance
