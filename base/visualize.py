"""PNG image grids: rows are images, columns are methods (original, reconstructions at k tokens, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import tensor_to_uint8
from .files import atomic_write

__all__ = ["class_columns", "fit_title", "save_image_grid"]

TITLE_SIZES = (10, 9, 8, 7)  # the default font's sizes a column title may take, largest first
TITLE_BREAKS = (": ", "_=/-")  # where a title wraps, by preference: "fsq_f4_1000 64 tok" -> "fsq_f4_1000 " / "64 tok"
MARGIN = 1  # pixels between a column's edge and its title


def _fits(text: str, font, width: int) -> bool:
    left, _, right, _ = font.getbbox(text)
    return left >= -MARGIN and right <= width - MARGIN


def _two_lines(text: str, breaks: str) -> list[list[str]]:
    """Every split of `text` into two lines after one of `breaks` (every character when empty), the most
    even first."""
    cuts = [i + 1 for i, c in enumerate(text[:-1]) if not breaks or c in breaks]
    return [[text[:i], text[i:]] for i in sorted(cuts, key=lambda i: abs(len(text) - 2 * i))]


def _clipped(text: str, font, width: int) -> list[str]:
    """The last resort, at the smallest size: as much as fits on the first line, the rest cut with an
    ellipsis on the second."""
    first = max((i for i in range(1, len(text) + 1) if _fits(text[:i], font, width)), default=1)
    rest = text[first:]
    if rest and not _fits(rest, font, width):
        rest = next((rest[:i] + "…" for i in range(len(rest), 0, -1) if _fits(rest[:i] + "…", font, width)), "…")
    return [text[:first], rest] if rest else [text[:first]]


def fit_title(text: str, width: int) -> tuple[list[str], ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """`text` laid out for a column `width` pixels wide: one line, else two wrapped after a separator
    (`TITLE_BREAKS`), else two wrapped anywhere, each at the largest of `TITLE_SIZES` at which every line
    fits; only a title too long for two lines at the smallest size is cut (with an ellipsis)."""
    fonts = [ImageFont.load_default(size=size) for size in TITLE_SIZES]
    at_separators = [[[text]], *(_two_lines(text, breaks) for breaks in TITLE_BREAKS)]
    for candidates in ([lines for group in at_separators for lines in group], _two_lines(text, "")):
        for font in fonts:
            for lines in candidates:
                if all(_fits(line, font, width) for line in lines):
                    return lines, font
    return _clipped(text, fonts[-1], width), fonts[-1]


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 1


def save_image_grid(columns: list[torch.Tensor], path: str | Path, titles: list[str] | None = None,
                    min_cell: int = 64) -> Path:
    """Each column is [N, 3, H, W] in [-1, 1]; small images are upscaled (nearest) to at least `min_cell`.
    Titles that do not fit their column wrap to two lines or take a smaller font (`fit_title`)."""
    rows = min(len(c) for c in columns)
    h, w = columns[0].shape[-2:]
    scale = max(1, -(-min_cell // max(h, w)))
    cell_h, cell_w, pad = h * scale, w * scale, 2
    layouts = [fit_title(str(t), cell_w) for t in titles] if titles else []
    header = max((len(lines) * _line_height(font) for lines, font in layouts), default=0) + (2 if titles else 0)
    canvas = Image.new("RGB", (len(columns) * (cell_w + pad) + pad, header + rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, column in enumerate(columns):
        x = pad + j * (cell_w + pad)
        if layouts:
            lines, font = layouts[j]
            for i, line in enumerate(lines):
                draw.text((x + MARGIN, 1 + i * _line_height(font)), line, fill=(0, 0, 0), font=font)
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
