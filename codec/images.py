"""Image files <-> tiles at the tokenizer's resolution: reading any mode, padding the edge tiles, writing PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from base.data import pil_to_tensor, tensor_to_uint8, to_rgb
from base.errors import UserError

__all__ = ["GRAY_MODES", "png_bytes", "read_image", "tile", "untile"]

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # written back as 8-bit grayscale


def read_image(path: str | Path) -> tuple[torch.Tensor, bool]:
    """An image file as [3, H, W] in [-1, 1] (any mode to RGB, alpha on white), and whether it was grayscale."""
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(to_rgb(img)), img.mode in GRAY_MODES
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: unreadable image ({err})") from None


def tile(image: torch.Tensor, side: int) -> torch.Tensor:
    """[3, H, W] -> [rows * cols, 3, side, side] in raster order; the last row and column of tiles repeat
    the image's edge pixels to fill them ('replicate' in the header)."""
    _, h, w = image.shape
    rows, cols = -(-h // side), -(-w // side)
    padded = F.pad(image[None], (0, cols * side - w, 0, rows * side - h), mode="replicate")[0]
    tiles = padded.unfold(1, side, side).unfold(2, side, side)  # [3, rows, cols, side, side]
    return tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, side, side)


def untile(tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `tile`: [rows * cols, 3, side, side] -> [3, height, width] (padding cropped off)."""
    side = tiles.shape[-1]
    rows, cols = -(-height // side), -(-width // side)
    grid = tiles.reshape(rows, cols, 3, side, side).permute(2, 0, 3, 1, 4)
    return grid.reshape(3, rows * side, cols * side)[:, :height, :width]


def png_bytes(image: torch.Tensor, gray: bool) -> bytes:
    """[3, H, W] in [-1, 1] -> PNG file bytes (8-bit RGB, or L for a grayscale original)."""
    img = Image.fromarray(tensor_to_uint8(image[None])[0])
    buffer = io.BytesIO()
    (img.convert("L") if gray else img).save(buffer, format="PNG")
    return buffer.getvalue()
