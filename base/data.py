"""Image data on top of Hugging Face `datasets`: one source string -> images in [-1, 1] with labels.

Sources: `hf:<hub id>`, `imagefolder:<dir>`, `parquet:<glob>`, `fashion_mnist:<dir>`, `builtin:skimage`.
Images are decoded by us (not by `datasets`) so that a corrupt file is skipped and counted rather than
crashing a run. Batches are addressed by step (see `StepBatchSampler`), which makes `--resume` exact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import logging
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from . import distributed as dist
from .errors import UserError
from .files import atomic_write
from .schema import DataConfig

__all__ = [
    "Batch", "EpochOrder", "FASHION_MNIST_DIR", "ImageDataset", "SKIMAGE_EVAL_PHOTOS", "SKIMAGE_TRAIN_PHOTOS",
    "STREAM_SHUFFLE_BLOCK", "StepBatchSampler", "StreamLoader", "StreamingImages", "collate", "data_settings",
    "decode_image", "example_from_row", "load_images", "load_source", "loader_state", "manifest_photos",
    "micro_batch_size", "pad_to_square", "pil_to_tensor", "report_skipped", "resize_crop", "skimage_photo",
    "tensor_to_uint8", "to_rgb", "train_loader",
]

SKIMAGE_TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle")
SKIMAGE_EVAL_PHOTOS = ("chelsea", "coffee")  # held out: different photographs, never cropped for training
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (1, L, LA, P, RGBA, I;16, I, F, CMYK...) to 8-bit RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, resolution: int, train: bool, rng: random.Random, hflip: bool) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop a square (random in training, center in eval)."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None if scale > 0.5 else 3.0)
    if train:
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    else:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if train and hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def decode_image(value: Any) -> Image.Image:
    """Decode a `datasets` image cell (PIL image, {'bytes','path'} dict, path or raw bytes)."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") is not None else Image.open(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        img = Image.open(value)
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "iu" and value.dtype != np.uint16 and 0 <= value.min() and value.max() <= 255:
            value = value.astype(np.uint8)  # `datasets` numpy formatting widens uint8 arrays to int64
        img = Image.fromarray(value)
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    img.load()
    return img


def load_source(cfg: DataConfig, split: str, seed: int = 0):
    """Return a `datasets.Dataset` (or `IterableDataset` when streaming) with 'image' and 'label' columns.

    `hf:<hub id or folder>`, `imagefolder:<dir>` and `parquet:<glob>` go through `datasets` and prepare (or
    stream) only the requested split. `parquet:` also takes one glob per split:
    `parquet:train=<glob>,test=<glob>`. Sources without the requested split (a bare image folder, a single
    parquet glob, hub sets with only 'train') get a seeded held-out slice of `eval_images` examples carved
    from 'train'; their training split is then the rest of 'train', disjoint from it.
    `train_images` > 0 keeps a seeded subset of that size of the training split (map-style sources).
    """
    source = _full_source(cfg, split, seed)
    if split != cfg.train_split or not cfg.train_images or not hasattr(source, "select"):
        return source
    if cfg.train_images < len(source):
        source = source.select(np.sort(np.random.default_rng(seed).permutation(len(source))[: cfg.train_images]))
    return source


def _full_source(cfg: DataConfig, split: str, seed: int):
    kind, _, arg = cfg.source.partition(":")
    if kind == "builtin" and arg == "skimage":
        return _skimage_dataset(cfg, split, seed)
    if kind == "fashion_mnist":
        return _fashion_mnist_dataset(arg or FASHION_MNIST_DIR, split)
    if kind == "photos":
        return _photos_dataset(cfg, arg, split, seed)
    if kind in ("hf", "imagefolder", "parquet"):
        return _hf_dataset(cfg, arg, split, seed, *_dataset_args(kind, arg))
    raise UserError(
        f"data.source: unknown source '{cfg.source}' "
        "(use hf:<id>, imagefolder:<dir>, parquet:<glob>, fashion_mnist:<dir>, photos:<manifest> or builtin:skimage)"
    )


def _dataset_args(kind: str, arg: str) -> tuple[str, dict[str, Any]]:
    """`datasets.load_dataset` path and keyword arguments of an `hf:`, `imagefolder:` or `parquet:` source."""
    if kind == "hf":
        return arg, {}
    if kind == "imagefolder":
        if not Path(arg).is_dir():
            raise UserError(f"data.source: image folder not found: {arg}")
        return "imagefolder", {"data_dir": arg}
    return "parquet", {"data_files": _parquet_files(arg)}


_SPLIT_GLOB = re.compile(r"^[A-Za-z_][\w-]*=")  # `parquet:train=...`: a split name, then its glob


def _parquet_files(arg: str) -> str | dict[str, str]:
    """`<glob>` (one 'train' split), or `<split>=<glob>,<split>=<glob>...` (one glob per split)."""
    if not _SPLIT_GLOB.match(arg):
        return arg
    parts = re.split(r",(?=[A-Za-z_][\w-]*=)", arg)  # a comma inside a glob stays part of it
    files = dict(part.split("=", 1) for part in parts)
    empty = [name for name, glob in files.items() if not glob]
    if empty:
        raise UserError(f"data.source: parquet split '{empty[0]}' has no glob (use parquet:<split>=<glob>,...)")
    return files


def _hf_dataset(cfg: DataConfig, name: str, split: str, seed: int, path: str, kwargs: dict[str, Any]):
    """One split of a `datasets` source as 'image' (+ 'label') columns; a missing train/eval split is
    carved from 'train'."""
    import datasets

    builder = _call_datasets(datasets.load_dataset_builder, name, path, **kwargs)
    available = _split_names(builder)
    # without its own eval split, 'train' gives the held-out slice and trains on the rest (a stream whole)
    carve_train = split == cfg.train_split == "train" and cfg.eval_split not in available and not cfg.streaming
    if split in available and not carve_train:
        ds = _load_split(builder, name, path, kwargs, split, cfg.streaming)
    elif "train" in available and split in (cfg.train_split, cfg.eval_split):
        train = _load_split(builder, name, path, kwargs, "train", cfg.streaming)
        ds = _carve_split(train, split == cfg.eval_split, cfg.eval_images, seed)
    else:
        raise UserError(f"data: split '{split}' not in {name} (available: {', '.join(available)})")
    columns = ds.column_names or []  # None: a stream whose columns are not known before reading it
    if columns and cfg.image_column not in columns:
        raise UserError(f"data.image_column: '{cfg.image_column}' is not a column of {name}")
    ds = ds.rename_column(cfg.image_column, "image") if cfg.image_column != "image" else ds
    label = cfg.label_column
    has_label = label is not None and label in columns
    if has_label and label != "label":
        ds = ds.rename_column(label, "label")
    ds = ds.select_columns(["image", "label"] if has_label else ["image"])
    if ds.features is not None:  # we decode images ourselves, so that a corrupt one is skipped, not fatal
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds


def _split_names(builder) -> list[str]:
    """Splits of a source without preparing any: its data files' splits, else the recorded ones (a hub set
    served from the `datasets` cache offline)."""
    files = builder.config.data_files
    return [str(name) for name in (files if files else builder.info.splits or {})]


def _load_split(builder, name: str, path: str, kwargs: dict[str, Any], split: str, streaming: bool):
    """Prepare (or stream) only `split`: its own data files, with the features of the whole source."""
    import datasets

    files = builder.config.data_files
    if files:  # without this, `load_dataset(split=...)` would still prepare every split first
        kwargs = {k: v for k, v in kwargs.items() if k not in ("data_dir", "data_files")}
        kwargs.update(data_files={split: list(files[split])}, **_whole_source_features(builder))
    return _call_datasets(datasets.load_dataset, name, path, split=split, streaming=streaming, **kwargs)


def _whole_source_features(builder) -> dict[str, Any]:
    """Keyword arguments that give a one-split load the columns of the whole source: the features a hub set
    declares, or for an image folder the class labels its directories name across all splits (labels
    inferred from one split alone could be numbered differently, or be missing)."""
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if builder.info.features is not None:
        return {"features": builder.info.features}
    if not isinstance(builder, ImageFolder) or builder.config.drop_labels is not None:
        return {}
    files = [str(f) for split_files in builder.config.data_files.values() for f in split_files]
    images = [f for f in files if Path(f).suffix.lower() in builder.EXTENSIONS]
    if len(images) != len(files):  # metadata files or archives: `datasets` decides their columns per split
        return {}
    labels = sorted({Path(f).parent.name for f in images})
    if len(labels) > 1 and len({len(Path(f).parts) for f in images}) == 1:  # `datasets`' own labelling rule
        label = datasets.ClassLabel(names=labels)
        return {"drop_labels": False, "features": datasets.Features({"image": datasets.Image(), "label": label})}
    return {"drop_labels": True}


def _call_datasets(function, name: str, *args, **kwargs):
    """Call a `datasets` loader; a missing or unreachable source becomes one `UserError` line."""
    try:
        return function(*args, **kwargs)
    except FileNotFoundError as err:
        raise UserError(f"data.source: {_first_line(err)}") from None
    except Exception as err:  # datasets raises many types for a missing or offline hub id
        raise UserError(f"data.source: cannot load {name!r}: {type(err).__name__}: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), "")


def _carve_split(train, held_out: bool, n_eval: int, seed: int):
    """The seeded held-out slice of `n_eval` examples of 'train' (at most half), or the rest of it."""
    if not hasattr(train, "select"):
        raise UserError("data: a streaming source needs its own eval split")
    order = np.random.default_rng(seed).permutation(len(train))
    n_eval = min(n_eval, len(train) // 2)
    return train.select(np.sort(order[:n_eval] if held_out else order[n_eval:]))


def _fashion_mnist_dataset(directory: str, split: str):
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError(f"data: fashion_mnist has splits 'train' and 'test', not '{split}'")
    images = _read_idx(Path(directory), f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(Path(directory), f"{prefix}-labels-idx1-ubyte")
    return _array_dataset(images, labels)


def _array_dataset(images: np.ndarray, labels: np.ndarray):
    """In-memory uint8 images as a `datasets.Dataset` that yields numpy arrays (no PNG round trip)."""
    import datasets

    array = datasets.Array3D if images.ndim == 4 else datasets.Array2D
    features = datasets.Features(
        {"image": array(shape=images.shape[1:], dtype="uint8"), "label": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)
    return ds.with_format("numpy")


def _read_idx(directory: Path, stem: str) -> np.ndarray:
    """Read an IDX file (optionally .gz), the format of (Fashion-)MNIST."""
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            ndim = raw[3]
            shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    raise UserError(
        f"data.source: {directory / stem}[.gz] not found (install with `apt-get install dataset-fashion-mnist` "
        "or pass fashion_mnist:<dir>)"
    )


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _skimage_dataset(cfg: DataConfig, split: str, seed: int):
    """Crops of scikit-image's colour photographs: downscaled at random scales, deterministic per seed.

    The label is the photograph's id, which the dataset-classifier FID backbone uses as its class.
    """
    all_photos = SKIMAGE_TRAIN_PHOTOS + SKIMAGE_EVAL_PHOTOS
    held_out = _split_side(cfg, split, "builtin:skimage")
    names = SKIMAGE_EVAL_PHOTOS if held_out else SKIMAGE_TRAIN_PHOTOS
    photos = ((all_photos.index(name), Image.fromarray(skimage_photo(name))) for name in names)
    return _array_dataset(*_photo_crops(photos, cfg, held_out, seed, split))


def _split_side(cfg: DataConfig, split: str, source: str) -> bool:
    """Whether `split` is the held-out side of a source split by photograph."""
    if split not in (cfg.train_split, cfg.eval_split):
        raise UserError(f"data: {source} has splits '{cfg.train_split}' and '{cfg.eval_split}', not '{split}'")
    return split == cfg.eval_split


def _photo_crops(photos, cfg: DataConfig, held_out: bool, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Crops at random scales of (label, photograph) pairs, deterministic per seed: `crops_per_photo` per
    training photograph, `eval_crops_per_photo` per held-out one. The label is the photograph's id."""
    per_photo = cfg.eval_crops_per_photo if held_out else cfg.crops_per_photo
    rng = np.random.default_rng([seed, cfg.resolution, len(split)])
    crops, labels = [], []
    for label, photo in photos:
        for _ in range(per_photo):
            crops.append(_random_scaled_crop(photo, cfg.resolution, rng))
            labels.append(label)
    return np.stack(crops), np.asarray(labels)


PHOTO_CROPS_VERSION = 1  # bump when `_photo_crops` or `_random_scaled_crop` changes the crops they draw


def photo_crops_cache_dir() -> Path:
    """Where crops of manifest photographs are kept: beside the `datasets` cache (`HF_DATASETS_CACHE`)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "flextok_photo_crops"


def manifest_photos(cfg: DataConfig, manifest: str, split: str) -> tuple[list[tuple[int, dict]], list[bytes]]:
    """The (label, manifest entry) pairs of `split`'s photographs and each file's bytes, every file checked
    against its recorded SHA-256. Labels: training photographs 0..n-1 in manifest order (the classes a prior
    or classifier learns), then the held-out ones."""
    path = Path(manifest)
    if not path.is_file():
        raise UserError(f"data.source: photo manifest not found: {manifest}")
    entries = json.loads(path.read_text())
    side = "test" if _split_side(cfg, split, f"photos:{manifest}") else "train"
    ordered = [e for e in entries if e["split"] == "train"] + [e for e in entries if e["split"] != "train"]
    mine = [(label, entry) for label, entry in enumerate(ordered) if entry["split"] == side]
    contents = []  # each photograph's bytes, in `mine` order
    for _, entry in mine:
        file = Path(entry["path"])
        if not file.is_file():
            raise UserError(f"data: {file} is missing: apt-get install {entry['package']} (see {manifest})")
        contents.append(file.read_bytes())
        if hashlib.sha256(contents[-1]).hexdigest() != entry["sha256"]:
            raise UserError(f"data: {file} differs from the one in {manifest} (another {entry['package']} "
                            f"version than {entry['version']}?)")
    return mine, contents


def _photos_dataset(cfg: DataConfig, manifest: str, split: str, seed: int):
    """Photographs listed in a manifest (`data/debian_photos.json`: path, sha256, split, licence, author),
    split by photograph as the manifest says, each file checked against its recorded SHA-256.

    Cropping thousands of windows out of multi-megapixel photographs takes about a minute on a slow CPU and
    every stage of a study needs the same crops, so they are kept in `photo_crops_cache_dir()`, keyed by the
    photographs' hashes and every setting that draws them. The files are still checked on every call.
    """
    held_out = _split_side(cfg, split, f"photos:{manifest}")
    mine, contents = manifest_photos(cfg, manifest, split)
    key = hashlib.sha256(json.dumps({
        "version": PHOTO_CROPS_VERSION, "photos": [(label, entry["sha256"]) for label, entry in mine],
        "resolution": cfg.resolution, "per_photo": cfg.eval_crops_per_photo if held_out else cfg.crops_per_photo,
        "seed": seed, "split": split,
    }).encode()).hexdigest()[:24]
    cache = photo_crops_cache_dir() / f"{key}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return _array_dataset(stored["images"], stored["labels"])
    photos = ((label, to_rgb(Image.open(io.BytesIO(data)))) for (label, _), data in zip(mine, contents))
    images, labels = _photo_crops(photos, cfg, held_out, seed, split)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle: given a path, np.savez would append ".npz" to it
            np.savez(handle, images=images, labels=labels)

    atomic_write(cache, write)  # ranks that draw the same crops at once each rename a complete file
    return _array_dataset(images, labels)


def _random_scaled_crop(photo: Image.Image, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """A square window between 1/8 and 1/2 of the photo's short side, resized to `resolution`."""
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.125, 0.5))
    side = max(side, resolution)
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(crop)


def pad_to_square(img: Image.Image, size: int) -> Image.Image:
    """Center `img` on a black square of `size` when it is smaller (Fashion-MNIST's 28x28 -> 32x32)."""
    w, h = img.size
    if w >= size and h >= size:
        return img
    canvas = Image.new(img.mode, (max(w, size), max(h, size)))
    canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
    return canvas


def example_from_row(row: dict, index: int, cfg: DataConfig, train: bool, aug_seed: int) -> dict:
    """Decode and transform one dataset row; an unreadable image becomes {'skipped': index}."""
    try:
        img = to_rgb(decode_image(row["image"]))
    except Exception:  # noqa: BLE001 - any decode failure means "skip and count"
        return {"skipped": index}
    img = resize_crop(pad_to_square(img, cfg.pad_to), cfg.resolution, train, random.Random(aug_seed),
                      train and cfg.hflip)
    label = row.get("label")
    return {"image": pil_to_tensor(img), "label": -1 if label is None else int(label)}


class ImageDataset(torch.utils.data.Dataset):
    """Map-style view over a `datasets.Dataset`; items are addressed by `(index, augmentation_seed)`
    so that augmentation is a function of the training step."""

    def __init__(self, hf_dataset, cfg: DataConfig, train: bool):
        self.ds, self.cfg, self.train = hf_dataset, cfg, train

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item: tuple[int, int] | int) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int] | int]) -> list[dict]:
        """One `datasets` query per batch: row-by-row access costs more than decoding small images."""
        pairs = [item if isinstance(item, tuple) else (item, 0) for item in items]
        columns = self.ds[[int(index) for index, _ in pairs]]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return [
            example_from_row(row, int(index), self.cfg, self.train, aug_seed)
            for row, (index, aug_seed) in zip(rows, pairs)
        ]


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[int] = field(default_factory=list)


def collate(items: list[dict]) -> Batch:
    good = [it for it in items if "image" in it]
    skipped = [it["skipped"] for it in items if "skipped" in it]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(
        torch.stack([it["image"] for it in good]), torch.tensor([it["label"] for it in good]), skipped
    )


class EpochOrder:
    """The batch of any training step under epoch-wise shuffling: a function of (seed, step) alone, so a
    resumed run sees exactly the data it would have. Batches never straddle epochs; a dataset smaller
    than one batch wraps around."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items == 0:
            raise UserError("data: the training source has no images")
        self.n, self.bs, self.seed = num_items, batch_size, seed
        self.per_epoch = max(1, num_items // batch_size)
        self._cached: tuple[int, np.ndarray | None] = (-1, None)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:  # one permutation per epoch, computed once
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cached[1]

    def batch(self, step: int) -> tuple[np.ndarray, int]:
        """(item indices, epoch) of `step`."""
        epoch, position = divmod(step, self.per_epoch)
        perm = self.permutation(epoch)
        indices = perm[position * self.bs : (position + 1) * self.bs] if self.n >= self.bs else np.resize(perm, self.bs)
        return indices, epoch


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of steps [start, end) as (index, augmentation seed) pairs.

    The global batch of a step comes from `EpochOrder` (a function of (seed, step) alone); it is cut into
    `world_size * accumulation` equal slices, and rank r takes slice `micro * world_size + r` at each of
    the `accumulation` micro-steps. Any world size therefore trains on the same images per step.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, end_step: int,
                 rank: int = 0, world_size: int = 1, accumulation: int = 1):
        self.order = EpochOrder(num_items, batch_size, seed)
        self.seed, self.start, self.end = seed, start_step, end_step
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.micro = micro_batch_size(batch_size, world_size, accumulation)

    def __len__(self) -> int:
        return (self.end - self.start) * self.accumulation

    def batch_for_step(self, step: int) -> list[tuple[int, int]]:
        """The whole global batch of `step` (every rank, every micro-step)."""
        indices, epoch = self.order.batch(step)
        return [(int(i), hash((self.seed, epoch, int(i))) & 0x7FFFFFFF) for i in indices]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            full = self.batch_for_step(step)
            for micro in range(self.accumulation):
                start = (micro * self.world_size + self.rank) * self.micro
                yield full[start : start + self.micro]


def micro_batch_size(batch_size: int, world_size: int, accumulation: int, key: str = "train.batch_size") -> int:
    """Items per rank and micro-step; the global batch (the config's `key`) must split evenly."""
    parts = world_size * accumulation
    if batch_size % parts:
        raise UserError(f"{key}: {batch_size} does not split into {world_size} rank(s) x "
                        f"{accumulation} accumulation step(s); make it a multiple of {parts}")
    return batch_size // parts


STREAM_SHUFFLE_BLOCK = 1000  # examples of a stream shuffled together (the memory a shuffle buffer would take)


class StreamingImages(torch.utils.data.IterableDataset):
    """A streamed training source: the shard order is reshuffled each pass and the examples are shuffled in
    consecutive blocks of `block_size`, each by a generator seeded with (seed, epoch, block).

    `state_dict()` says where the stream stands: the epoch, the block, the `datasets` state of the stream at
    the start of that block (`IterableDataset.state_dict()`; None at the start of an epoch), how many of the
    block's examples were yielded, and how many examples were yielded in all (augmentation seeds and the ids
    of skipped images count them). Restored, it makes `datasets` reopen the stream at the block's start, so a
    resumed stream reads again one block and at most one shard up to it (`datasets` reopens a shard by reading
    it up to the saved row; `train_loader` cuts Parquet into one shard per row group), never what the earlier
    blocks consumed. Why blocks: a rolling shuffle buffer loses its contents on restore (`datasets` refills it
    with later examples), while a block is a function of the stream's position, so the resumed batches are
    exactly the uninterrupted ones.
    The stream is read in the training process (no DataLoader workers), so its state is what was consumed.
    """

    def __init__(self, hf_iterable, cfg: DataConfig, seed: int, state: dict | None = None,
                 block_size: int = STREAM_SHUFFLE_BLOCK):
        self.ds, self.cfg, self.seed, self.block_size = hf_iterable, cfg, seed, block_size
        self.position = copy.deepcopy(state) or {"epoch": 0, "block": 0, "source": None, "offset": 0,
                                                 "consumed": 0}

    def state_dict(self) -> dict:
        return copy.deepcopy(self.position)

    def __iter__(self) -> Iterator[dict]:
        pos = self.position
        while True:
            fresh_epoch = pos["block"] == 0 and pos["source"] is None
            stream = self._epoch_stream(pos["epoch"], pos["source"])
            rows = iter(stream)
            with _restored_buffer_is_empty():  # the first read reopens the stream
                block = list(itertools.islice(rows, self.block_size))
            while block:
                block_end = stream.state_dict()  # where the next block starts
                order = np.random.default_rng([self.seed, pos["epoch"], pos["block"]]).permutation(len(block))
                for j in range(pos["offset"], len(block)):
                    index = pos["consumed"]
                    if j + 1 < len(block):  # the position after this example, set before the trainer gets it
                        pos.update(offset=j + 1, consumed=index + 1)
                    else:
                        pos.update(block=pos["block"] + 1, source=block_end, offset=0, consumed=index + 1)
                    aug_seed = hash((self.seed, index)) & 0x7FFFFFFF
                    yield example_from_row(block[order[j]], index, self.cfg, True, aug_seed)
                block = list(itertools.islice(rows, self.block_size))
            if fresh_epoch and pos["block"] == 0:
                raise UserError("data: the streamed training source has no images")
            pos.update(epoch=pos["epoch"] + 1, block=0, source=None, offset=0)

    def _epoch_stream(self, epoch: int, source_state: dict | None):
        """The source with its shards in this epoch's order (`datasets`' shuffle with a one-example buffer
        only permutes the shards), reopened at `source_state` when given."""
        stream = self.ds.shuffle(generator=np.random.default_rng([self.seed, epoch]), buffer_size=1,
                                 max_buffer_input_shards=1)
        if source_state is not None:
            stream.load_state_dict(source_state)
        return stream


@contextlib.contextmanager
def _restored_buffer_is_empty():
    """Silence `datasets`' warning that a restored shuffle buffer lost its contents: the one-example buffer
    of `StreamingImages._epoch_stream` is empty between examples, so nothing is lost."""
    log = logging.getLogger("datasets.iterable_dataset")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class StreamLoader:
    """This rank's micro-batches of a streamed source for steps [start_step, end_step), `accumulation` per
    step. It keeps the stream's state at the last two step boundaries: a run interrupted while training a
    step has already read that step's batches, and its checkpoint must record where the step began."""

    def __init__(self, stream: StreamingImages, micro: int, start_step: int, end_step: int, accumulation: int):
        self.stream, self.micro, self.accumulation = stream, micro, accumulation
        self.start, self.end = start_step, end_step
        self.states = {start_step: stream.state_dict()}

    def __len__(self) -> int:
        return (self.end - self.start) * self.accumulation

    def __iter__(self) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(self.stream, batch_size=self.micro, collate_fn=collate)
        for i, batch in enumerate(itertools.islice(loader, len(self))):  # the stream itself never ends
            if (i + 1) % self.accumulation == 0:
                step = self.start + (i + 1) // self.accumulation
                self.states[step] = self.stream.state_dict()
                self.states.pop(step - 2, None)
            yield batch

    def position(self, step: int) -> dict:
        """This rank's stream state once the batches of the steps before `step` were read."""
        if step not in self.states:
            raise ValueError(f"no stream state kept for step {step} (kept: {sorted(self.states)})")
        return {"step": step, **copy.deepcopy(self.states[step])}


def loader_state(loader, step: int) -> list[dict] | None:
    """What a checkpoint at `step` keeps of the training data, for `train_loader(data_state=...)`: every
    rank's stream position for a streamed source (a collective: call it on every rank), None for a
    map-style source, whose batches follow from the step. Plain Python values: `weights_only` loads them."""
    if not isinstance(loader, StreamLoader):
        return None
    return dist.all_gather_object(loader.position(step))


def train_loader(cfg: DataConfig, batch_size: int, seed: int, start_step: int, end_step: int,
                 rank: int = 0, world_size: int = 1, accumulation: int = 1, data_state: list[dict] | None = None):
    """This rank's micro-batches for steps [start_step, end_step): `accumulation` per step, each 1 /
    (world_size * accumulation) of the step's global batch of `batch_size` images.

    Map-style sources slice each step's global batch (`StepBatchSampler`); a streamed source is split
    between ranks by `datasets.distributed.split_dataset_by_node` and each rank reads its own part, from the
    position `data_state` (what `loader_state()` returned at a checkpoint of step `start_step`) when resuming.
    """
    micro = micro_batch_size(batch_size, world_size, accumulation)
    if cfg.streaming:
        state = _rank_stream_state(data_state, start_step, rank, world_size)
        # Parquet: one shard per row group, so a resumed stream reopens a row group, not a whole file
        source = load_source(cfg, cfg.train_split, seed).reshard()
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            source = split_dataset_by_node(source, rank=rank, world_size=world_size)
        stream = StreamingImages(source, cfg, seed, state, block_size=STREAM_SHUFFLE_BLOCK)
        return StreamLoader(stream, micro, start_step, end_step, accumulation)
    ds = ImageDataset(load_source(cfg, cfg.train_split, seed), cfg, train=True)
    sampler = StepBatchSampler(len(ds), batch_size, seed, start_step, end_step, rank, world_size, accumulation)
    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )


def _rank_stream_state(data_state: list[dict] | None, start_step: int, rank: int, world_size: int) -> dict | None:
    """This rank's saved stream state for a run resumed at `start_step` (None: a new run)."""
    if not data_state:
        if start_step:
            raise UserError("checkpoint: it records no stream position; a streamed run resumes only from the "
                            "position its checkpoint records")
        return None
    if len(data_state) != world_size:
        raise UserError(f"checkpoint: this streamed run was saved by {len(data_state)} rank(s); resume it with "
                        f"as many (each rank streams its own part of the source)")
    state = dict(data_state[rank])
    if state.pop("step") != start_step:
        raise UserError(f"checkpoint: its stream position is for step {data_state[rank]['step']}, "
                        f"not the step {start_step} it resumes")
    return state


def load_images(cfg: DataConfig, split: str, limit: int | None = None, seed: int = 0) -> Batch:
    """Materialize up to `limit` center-cropped images of `split` (held-out sets for metrics and grids); a
    streamed split gives its first `limit` images."""
    source = load_source(cfg, split, seed)
    if hasattr(source, "select"):
        ds = ImageDataset(source, cfg, train=False)
        items = ds.__getitems__(list(range(len(ds) if limit is None else min(limit, len(ds)))))
    else:
        items = [example_from_row(row, i, cfg, False, 0) for i, row in enumerate(itertools.islice(source, limit))]
    batch = collate(items)
    report_skipped(batch.skipped, f"{cfg.source} [{split}]")
    if batch.images.numel() == 0:
        raise UserError(f"data: {cfg.source} [{split}] yielded no usable image")
    return batch


def data_settings(cfg: DataConfig) -> dict[str, Any]:
    """The data settings that decide which images a split yields (the worker count does not): part of
    every cache key built from a split."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_workers"}


def report_skipped(skipped: list[int], where: str) -> None:
    if skipped:
        warnings.warn(f"{where}: skipped {len(skipped)} unreadable image(s), first ids: {skipped[:5]}", stacklevel=2)
