"""PNG image grids: rows are images, columns are methods (original, reconstructions at k tokens, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import tensor_to_uint8
from .files import atomic_write

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
