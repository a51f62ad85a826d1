"""PSNR and SSIM must reproduce scikit-image's numbers, so reports can cite them as such."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from base.metrics import psnr, ssim

SIZES = [(11, 11), (16, 16), (32, 32), (48, 40)]


def _to_skimage(image: torch.Tensor) -> np.ndarray:
    """One [3, H, W] image in [-1, 1] as the [H, W, 3] float64 array in [0, 1] skimage reads."""
    return ((image.double() + 1.0) / 2.0).permute(1, 2, 0).numpy()


def _skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [
        structural_similarity(
            _to_skimage(a),
            _to_skimage(b),
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for a, b in zip(x, y)
    ]


def _skimage_psnr(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return [peak_signal_noise_ratio(_to_skimage(a), _to_skimage(b), data_range=1.0) for a, b in zip(x, y)]


def _random_pair(size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, *size, generator=generator) * 2 - 1
    noise_levels = torch.tensor([0.02, 0.1, 0.3, 0.8]).view(4, 1, 1, 1)
    y = (x + noise_levels * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    return x, y


def _structured_pair(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth gradients, stripes and a checkerboard against shifted / rescaled versions."""
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    gradient = torch.stack([xx, yy, (xx + yy) / 2])
    stripes = torch.sin(6 * math.pi * xx).expand(3, h, w)
    cells = (torch.arange(h)[:, None] // 2 + torch.arange(w)[None] // 2) % 2
    checker = (cells * 2 - 1).float().expand(3, h, w)
    x = torch.stack([gradient, stripes, checker])
    y = torch.stack([gradient.roll(1, dims=2), stripes * 0.5 + 0.2, -checker * 0.9])
    return x, y


@pytest.mark.parametrize("size", SIZES)
def test_ssim_matches_skimage_on_random_images(size: tuple[int, int]) -> None:
    x, y = _random_pair(size, seed=sum(size))
    np.testing.assert_allclose(ssim(x, y).numpy(), _skimage_ssim(x, y), atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_ssim_matches_skimage_on_structured_images(size: tuple[int, int]) -> None:
    x, y = _structured_pair(size)
    np.testing.assert_allclose(ssim(x, y).numpy(), _skimage_ssim(x, y), atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_psnr_matches_skimage(size: tuple[int, int]) -> None:
    for x, y in (_random_pair(size, seed=7), _structured_pair(size)):
        np.testing.assert_allclose(psnr(x, y).numpy(), _skimage_psnr(x, y), rtol=1e-5)


def test_metrics_are_per_image_and_ordered_by_noise() -> None:
    x, y = _random_pair((32, 32), seed=3)
    scores_ssim, scores_psnr = ssim(x, y), psnr(x, y)
    assert scores_ssim.shape == scores_psnr.shape == (4,)
    assert torch.all(scores_ssim[:-1] > scores_ssim[1:])
    assert torch.all(scores_psnr[:-1] > scores_psnr[1:])


def test_identical_images_give_perfect_scores() -> None:
    x, _ = _random_pair((16, 16), seed=0)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    assert torch.isinf(psnr(x, x)).all()


def test_invalid_inputs_are_rejected() -> None:
    x = torch.zeros(1, 3, 10, 10)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)
    with pytest.raises(ValueError, match="differ"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 15))
