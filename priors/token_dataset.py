"""Token datasets: an image split pushed once through a frozen tokenizer and cached as numpy arrays.

A prior trains for many epochs on the same tokens, so images are tokenized once. A cache folder holds
`tokens.npy` (every sequence concatenated: int32 ids, or float32 [total, c] latents for KL tokenizers),
`offsets.npy` (sequence i is tokens[offsets[i]:offsets[i+1]]), `labels.npy` (-1 = none) and
`meta.json`. The folder name is a hash of everything the tokens depend on: the tokenizer's weights and
config, the token mode (full / prefix k / adaptive PSNR / BPE codec), the data settings, split and seed.
Changing any input therefore builds a new cache; an unchanged one is reused. The tokenizer hash is also
written into `meta.json` and verified on load, so tokens of one tokenizer can never silently feed a
prior trained for another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from bpe_image import BPECodec

from flextok.data import Batch, ImageDataset, collate, data_settings, example_from_row, load_source, report_skipped
from flextok.errors import TokenizerMismatch, UserError
from flextok.files import atomic_directory
from flextok.fingerprint import fingerprint_files, fingerprint_model
from flextok.schema import DataConfig

from .schema import PriorConfig, PriorRunConfig

__all__ = ["TokenDataset", "TokenSpec", "build_token_dataset", "open_codec", "token_cache_dir"]

CACHE_VERSION = 1


def token_cache_dir(cfg: PriorRunConfig) -> Path:
    """Where an experiment's token caches live: `prior.cache_dir`, else <out_dir>/token_cache. Training,
    BPE training and evaluation all use this folder, so each reuses the caches the others built."""
    return Path(cfg.prior.cache_dir) if cfg.prior.cache_dir else Path(cfg.out_dir) / "token_cache"


def open_codec(path: str | Path) -> tuple[BPECodec, str]:
    """A saved bpe_image codec and the hash of its files (its identity in cache keys)."""
    try:
        return BPECodec.from_pretrained(path), fingerprint_files(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"bpe codec {path}: {err}") from None


def cache_key(tokenizer_hash: str, prior: PriorConfig, data: DataConfig, split: str, limit: int | None,
              seed: int, flips: bool, bpe_hash: str | None, decoding: dict | None = None) -> str:
    """Hash of every input the cached tokens depend on (`decoding`: the decoder settings that choose
    adaptive lengths)."""
    inputs = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_hash,
        "tokens": prior.tokens,
        "prefix_length": prior.prefix_length if prior.tokens == "prefix" else None,
        "target_psnr": prior.target_psnr if prior.tokens == "adaptive" else None,
        "decoding": decoding if prior.tokens == "adaptive" else None,
        "bpe": bpe_hash,
        "data": data_settings(data),
        "split": split,
        "limit": limit,
        "seed": seed,
        "flips": flips,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass
class TokenSpec:
    """What a prior must know about its tokens; stored in `meta.json` and in the prior's config."""

    continuous: bool  # KL latents [N, c] instead of ids
    vocab_size: int  # ids are in [0, vocab_size); 0 for continuous tokens
    token_dim: int  # c for continuous tokens; 0 for ids
    max_length: int  # longest sequence (every sequence, when not variable_length)
    variable_length: bool  # sequences end with EOS (adaptive length, BPE)
    token_set: bool  # each sequence is a sorted multiset
    tokenizer_hash: str


class TokenDataset:
    """Variable-length token sequences with labels, held as flat numpy arrays (cheap to slice and batch)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, labels: np.ndarray, meta: dict[str, Any]):
        self.tokens, self.offsets, self.labels, self.meta = tokens, offsets, labels, meta
        self.spec = TokenSpec(**meta["spec"])
        self.lengths = np.diff(offsets)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def directory(self) -> Path | None:
        return Path(self.meta["directory"]) if "directory" in self.meta else None

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def batch(self, indices: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """Model inputs for these sequences: `tokens` [B, L] long (zero-padded) or [B, N, c] float,
        `labels` [B], and `lengths` [B] for variable-length sequences."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = torch.from_numpy(self.labels[indices])
        if self.spec.continuous:
            return {"tokens": torch.from_numpy(np.stack([self.sequence(i) for i in indices])), "labels": labels}
        lengths = self.lengths[indices]
        out = np.zeros((len(indices), int(lengths.max())), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row, : lengths[row]] = self.sequence(i)
        batch = {"tokens": torch.from_numpy(out), "labels": labels}
        if self.spec.variable_length:
            batch["lengths"] = torch.from_numpy(lengths.astype(np.int64))
        return batch

    def save(self, directory: Path) -> None:
        """Written as a whole folder at once: a killed build never leaves a partial cache."""

        def fill(tmp: Path) -> None:
            np.save(tmp / "tokens.npy", self.tokens)
            np.save(tmp / "offsets.npy", self.offsets)
            np.save(tmp / "labels.npy", self.labels)
            meta = {k: v for k, v in self.meta.items() if k != "directory"}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

        atomic_directory(directory, fill)

    @classmethod
    def load(cls, directory: str | Path, expected_tokenizer_hash: str | None = None) -> TokenDataset:
        """Open a cache; `expected_tokenizer_hash` rejects tokens that another tokenizer produced."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
            # memory-mapped: ranks on one machine share the page cache instead of each holding a copy
            tokens = np.load(directory / "tokens.npy", mmap_mode="r")
            offsets, labels = np.load(directory / "offsets.npy"), np.load(directory / "labels.npy")
        except (OSError, ValueError) as err:
            raise UserError(f"{directory}: unreadable token cache ({err}); delete it to rebuild") from None
        found = meta["spec"]["tokenizer_hash"]
        if expected_tokenizer_hash is not None and found != expected_tokenizer_hash:
            raise TokenizerMismatch(
                f"{directory}: tokens come from tokenizer {found[:12]} ({meta.get('tokenizer')}), "
                f"not from the requested tokenizer {expected_tokenizer_hash[:12]}"
            )
        meta["directory"] = str(directory)
        return cls(tokens, offsets, labels, meta)


def build_token_dataset(
    tokenizer: torch.nn.Module,
    prior: PriorConfig,
    data: DataConfig,
    split: str,
    cache_root: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    flips: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TokenDataset:
    """Tokenize `split` of `data` with `tokenizer` as `prior` asks (full / prefix / adaptive / bpe), or
    reuse the cache built from exactly the same inputs. `flips` adds each image's mirror image."""
    tokenizer_hash = fingerprint_model(tokenizer)
    codec, bpe_hash = open_codec(prior.bpe) if prior.tokens == "bpe" else (None, None)
    sampling = getattr(getattr(tokenizer, "config", None), "sampling", None)
    decoding = dataclasses.asdict(sampling) if sampling is not None else None
    key = cache_key(tokenizer_hash, prior, data, split, limit, seed, flips, bpe_hash, decoding)
    directory = Path(cache_root) / f"{split}-{key[:20]}"
    if (directory / "meta.json").is_file():
        return TokenDataset.load(directory, tokenizer_hash)

    was_training = tokenizer.training
    tokenizer.eval().to(device)
    sequences: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    skipped: list[int] = []
    try:
        for batch in _image_batches(data, split, limit, seed, prior.tokenize_batch_size, progress):
            skipped += batch.skipped
            if batch.images.numel() == 0:
                continue
            views = [batch.images, batch.images.flip(-1)] if flips else [batch.images]
            for images in views:
                sequences += _tokenize(tokenizer, images.to(device), prior, codec)
                labels.append(batch.labels.numpy())
    finally:
        tokenizer.train(was_training)
    report_skipped(skipped, f"{data.source} [{split}]")
    if not sequences:
        raise UserError(f"data: {data.source} [{split}] yielded no usable image to tokenize")

    spec = _spec(tokenizer, prior, sequences, codec, tokenizer_hash)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    meta = {
        "key": key,
        "spec": dataclasses.asdict(spec),
        "tokenizer": prior.tokenizer,
        "tokens": prior.tokens,
        "prefix_length": prior.prefix_length,
        "target_psnr": prior.target_psnr,
        "bpe": prior.bpe,
        "split": split,
        "count": len(sequences),
        "mean_length": float(lengths.mean()),
    }
    dataset = TokenDataset(
        np.concatenate(sequences).astype(np.float32 if spec.continuous else np.int32),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.concatenate(labels).astype(np.int64),
        meta,
    )
    dataset.save(directory)
    return TokenDataset.load(directory, tokenizer_hash)


def _image_batches(data: DataConfig, split: str, limit: int | None, seed: int, batch_size: int,
                   progress: bool) -> Iterator[Batch]:
    """Center-cropped images of a split in batches, from map-style or streamed sources alike."""
    source = load_source(data, split, seed)
    if hasattr(source, "__len__"):
        dataset = ImageDataset(source, data, train=False)
        n = len(dataset) if limit is None else min(limit, len(dataset))
        subset = torch.utils.data.Subset(dataset, range(n))
        loader = torch.utils.data.DataLoader(
            subset, batch_size=batch_size, collate_fn=collate, num_workers=data.num_workers
        )
        yield from tqdm(loader, desc=f"tokenize {split}", unit="batch", disable=not progress, dynamic_ncols=True)
        return
    rows: list[dict] = []
    bar = tqdm(total=limit, desc=f"tokenize {split}", unit="img", disable=not progress, dynamic_ncols=True)
    for index, row in enumerate(source):
        if limit is not None and index >= limit:
            break
        rows.append(example_from_row(row, index, data, False, 0))
        if len(rows) == batch_size:
            bar.update(len(rows))
            yield collate(rows)
            rows = []
    if rows:
        bar.update(len(rows))
        yield collate(rows)
    bar.close()


def _tokenize(tokenizer, images: torch.Tensor, prior: PriorConfig, codec) -> list[np.ndarray]:
    """One batch of images -> one numpy array per image, in the token mode the prior asks for."""
    try:
        if prior.tokens == "prefix":
            tokens = tokenizer.tokenize(images, k=prior.prefix_length)
        elif prior.tokens == "adaptive":
            tokens = tokenizer.tokenize(images, target_psnr=prior.target_psnr)
        else:
            tokens = tokenizer.tokenize(images)
    except TypeError as err:
        raise UserError(
            f"prior.tokens: {prior.tokens} needs a tokenizer with prefixes (k=, target_psnr=); "
            f"{type(tokenizer).__name__} has none ({err})"
        ) from None
    except ValueError as err:  # e.g. a prefix length the tokenizer cannot give
        raise UserError(f"prior.tokens: {prior.tokens}: {err}") from None
    arrays = [t.detach().cpu().numpy() for t in tokens]
    if codec is None:
        return arrays
    if arrays[0].dtype.kind == "f":
        raise UserError("prior.tokens: bpe needs a quantized tokenizer (integer codes)")
    return [np.asarray(ids) for ids in codec.encode_flat(arrays)]


def _spec(tokenizer, prior: PriorConfig, sequences: list[np.ndarray], codec, tokenizer_hash: str) -> TokenSpec:
    continuous = sequences[0].dtype.kind == "f"
    if continuous != (prior.kind == "flow"):
        needed = "a quantized tokenizer (integer codes)" if prior.kind == "discrete" else "a KL tokenizer (latents)"
        raise UserError(
            f"prior.kind: {prior.kind} needs {needed}; {prior.tokenizer} gives "
            f"{'continuous latents' if continuous else 'integer codes'} (use prior.kind="
            f"{'flow' if continuous else 'discrete'})"
        )
    lengths = {len(s) for s in sequences}
    return TokenSpec(
        continuous=continuous,
        vocab_size=0 if continuous else int(codec.vocab_size if codec is not None else tokenizer.vocab_size),
        token_dim=int(sequences[0].shape[1]) if continuous else 0,
        max_length=max(lengths),
        variable_length=prior.tokens in ("adaptive", "bpe"),
        token_set=bool(getattr(tokenizer, "token_set", False)) and prior.tokens in ("full", "prefix"),
        tokenizer_hash=tokenizer_hash,
    )
