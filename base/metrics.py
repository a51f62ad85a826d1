"""Per-image reconstruction metrics (PSNR, SSIM) in torch.

Images follow the project convention: float tensors `[B, C, H, W]` in `[-1, 1]`.
Both metrics are computed on the `[0, 1]` scale with a data range of 1, so the
numbers are the ones scikit-image reports for the same images saved as floats in
`[0, 1]`. Values outside `[-1, 1]` are not clamped: clamp first if the images
would be clamped when saved, so that the metric scores what a viewer would see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SSIM_K1", "SSIM_K2", "SSIM_SIGMA", "SSIM_TRUNCATE", "gaussian_kernel_1d", "psnr", "ssim"]

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    """Reject inputs that would silently broadcast or average over the wrong axes."""
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"expected images shaped [B, C, H, W], got {tuple(x.shape)}")


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] to [0, 1] in at least float32, so half-precision inputs stay accurate."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) + 1.0) * 0.5


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, shape `[B]`.

    Identical images give `inf`, as in scikit-image's `peak_signal_noise_ratio`.
    """
    _check_pair(x, y)
    mse = (_to_unit_range(x) - _to_unit_range(y)).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


def gaussian_kernel_1d(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """Normalised 1D Gaussian taps with scipy's radius rule, `int(truncate * sigma + 0.5)`.

    Using scipy's rule gives the 11-tap window that skimage's `gaussian_weights=True` uses.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _gaussian_blur_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable depthwise Gaussian filter without padding.

    Only the 'valid' region is kept: it is exactly the region skimage averages after
    cropping `(win_size - 1) // 2` pixels from each border, so no border rule is needed.
    """
    channels = x.shape[1]
    taps = taps.to(dtype=x.dtype, device=x.device)
    horizontal = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    x = F.conv2d(x, horizontal, groups=channels)
    return F.conv2d(x, vertical, groups=channels)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image, shape `[B]`, averaged over channels.

    Matches `skimage.metrics.structural_similarity(..., channel_axis=..., data_range=1.0,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`: an 11x11 Gaussian
    window (sigma 1.5), K1 = 0.01, K2 = 0.03, population (not sample) covariances, and the
    mean over pixels at least 5 pixels from every border. Images must be at least 11x11.
    """
    _check_pair(x, y)
    taps = gaussian_kernel_1d()
    win_size = taps.numel()
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(x.shape[-2:])}")
    x, y = _to_unit_range(x), _to_unit_range(y)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    moments = _gaussian_blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), taps)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.chunk(5, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)

