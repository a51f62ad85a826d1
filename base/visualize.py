"""PNG image grids: rows are images, columns are methods (original, reconstructions at k tokens, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import tensor_to_uint8
from .files import atomic_write

__all__ = ["class_columns", "save_image_grid"]

HEADER = 14


def save_image_grid(columns: list[torch.Tensor], path: str | Path, titles: list[str] | None = None,
                    min_cell: int = 64) -> Path:
    """Each column is [N, 3, H, W] in [-1, 1]; small images are upscaled (nearest) to at least `min_cell`."""
    rows = min(len(c) for c in columns)
    h, w = columns[0].shape[-2:]
    scale = max(1, -(-min_cell // max(h, w)))
    cell_h, cell_w, pad = h * scale, w * scale, 2
    header = HEADER if titles else 0
    canvas = Image.new("RGB", (len(columns) * (cell_w + pad) + pad, header + rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, column in enumerate(columns):
        x = pad + j * (cell_w + pad)
        if titles:
            draw.text((x + 1, 1), str(titles[j])[: max(4, cell_w // 6)], fill=(0, 0, 0))
        for i, arr in enumerate(tensor_to_uint8(column[:rows])):
            tile = Image.fromarray(np.ascontiguousarray(arr)).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (x, header + pad + i * (cell_h + pad)))
    path = Path(path)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def class_columns(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[list[torch.Tensor], list[str]]:
    """One column per class in order of first appearance; unconditional samples in equal columns of <= 8
    (the grid shows as many rows as its shortest column)."""
    if labels is None:
        rows = max(r for r in range(1, 9) if len(images) % r == 0)
        columns = list(images.split(rows))
        return columns, ["samples"] * len(columns)
    classes = list(dict.fromkeys(labels.tolist()))
    return [images[labels == c] for c in classes], [f"class {c}" for c in classes]
