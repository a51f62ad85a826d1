"""Token datasets: an image split pushed once through a frozen tokenizer and cached as numpy arrays.

A prior trains for many epochs on the same tokens, so images are tokenized once. A cache folder holds
`tokens.npy` (every sequence concatenated: int32 ids, or float32 [total, c] latents for KL tokenizers),
`offsets.npy` (sequence i is tokens[offsets[i]:offsets[i+1]]), `labels.npy` (-1 = none) and
`meta.json`. The folder name is a hash of everything the tokens depend on: the tokenizer's weights and
config, the token mode (full / prefix k / adaptive PSNR / BPE codec), the data settings, split and seed.
Changing any input therefore builds a new cache; an unchanged one is reused. The tokenizer hash is also
written into `meta.json` and verified on load, so tokens of one tokenizer can never silently feed a
prior trained for another.

A cache is trusted only after it is verified (`TokenDataset.problem`): `meta.json` records what built
it (the inputs above and the shard size) and how many source images it covers; the rows, labels and
offsets must add up to them. A cache that fails is rebuilt, with a one-line notice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from base.data import (
    Batch,
    ImageDataset,
    collate,
    data_settings,
    example_from_row,
    load_source,
    report_skipped,
)
from base.distributed import WAIT_TIMEOUT, wait_for
from base.errors import TokenizerMismatch, UserError
from base.files import atomic_directory, atomic_write, atomic_write_text
from base.fingerprint import fingerprint_model
from base.schema import DataConfig
from bpe_image import BPECodec, open_codec

from .schema import PriorConfig, PriorRunConfig

__all__ = ["TokenDataset", "TokenSpec", "build_token_dataset", "cache_inputs", "token_cache_dir", "tokenize_for_prior"]

# part of every cache's key: raised whenever what a cache holds or how it is built changes, so that a cache
# made another way is never reused
CACHE_VERSION = 3


def token_cache_dir(cfg: PriorRunConfig) -> Path:
    """Where an experiment's token caches live: `prior.cache_dir`, else <out_dir>/token_cache. Training,
    BPE training and evaluation all use this folder, so each reuses the caches the others built."""
    return Path(cfg.prior.cache_dir) if cfg.prior.cache_dir else Path(cfg.out_dir) / "token_cache"


def cache_inputs(tokenizer_hash: str, prior: PriorConfig, data: DataConfig, split: str, limit: int | None,
                 seed: int, flips: bool, bpe_hash: str | None, decoding: dict | None = None,
                 precision: str = "fp32") -> dict[str, Any]:
    """Every input the cached tokens depend on; the cache key is their hash (`decoding`: the decoder
    settings that choose adaptive lengths; `precision`: bf16 autocast on GPUs gives slightly different
    latents and lengths)."""
    return {
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
        "precision": precision,
    }


def _digest(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


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
            found = meta["spec"]["tokenizer_hash"]
            # memory-mapped: ranks on one machine share the page cache instead of each holding a copy
            tokens = np.load(directory / "tokens.npy", mmap_mode="r")
            offsets, labels = np.load(directory / "offsets.npy"), np.load(directory / "labels.npy")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{directory}: unreadable token cache ({err!r}); delete it to rebuild") from None
        if expected_tokenizer_hash is not None and found != expected_tokenizer_hash:
            raise TokenizerMismatch(
                f"{directory}: tokens come from tokenizer {found[:12]} ({meta.get('tokenizer')}), "
                f"not from the requested tokenizer {expected_tokenizer_hash[:12]}"
            )
        meta["directory"] = str(directory)
        return cls(tokens, offsets, labels, meta)

    def problem(self, key: str | None = None) -> str | None:
        """Why this cache cannot be trusted, or None: it must come from the inputs of `key` and hold one
        labelled row per usable source image (two with flips), and its offsets must cover its tokens."""
        meta, rows = self.meta, len(self.labels)
        if key is not None and meta.get("key") != key:
            return f"built from other inputs (key {str(meta.get('key'))[:12]}, expected {key[:12]})"
        if not {"images", "skipped", "build"} <= meta.keys():
            return "no record of what built it"
        expected = (meta["images"] - meta["skipped"]) * (2 if meta["build"]["flips"] else 1)
        if rows != expected or meta.get("count") != expected:
            return (f"{rows} labels (meta.json: {meta.get('count')} rows) for {meta['images']} source images "
                    f"({meta['skipped']} unreadable{', and their mirror images' if meta['build']['flips'] else ''}"
                    f"): expected {expected}")
        offsets = self.offsets
        if len(offsets) != rows + 1 or offsets[0] != 0 or np.any(self.lengths < 0) or offsets[-1] != len(self.tokens):
            return f"{len(offsets)} offsets do not cut {len(self.tokens)} tokens into {rows} rows"
        return None


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
    rank: int = 0,
    world_size: int = 1,
    wait_timeout: float = WAIT_TIMEOUT,
) -> TokenDataset:
    """Tokenize `split` of `data` with `tokenizer` as `prior` asks (full / prefix / adaptive / bpe), or
    reuse the verified cache built from exactly the same inputs. `flips` adds each image's mirror image.

    Called on every rank of a job (`rank` of `world_size`), the split is cut into shards of
    `prior.cache_shard_size` images; rank r tokenizes shards r, r + world_size, ... into
    `<cache>.parts/<manifest>/`, each written atomically, so a killed job redoes at most one shard per rank.
    The manifest folder is named by what builds the shards (the cache inputs and the shard size): a resume
    with another shard size starts a new folder instead of mixing shards of two sizes. Rank 0 verifies the
    shards once they all exist (redoing any that fail), merges them and removes them; the other ranks wait
    for the verified cache on disk. Every wait ends after `wait_timeout` minutes (`distributed.wait_timeout`).
    """
    tokenizer_hash = fingerprint_model(tokenizer)
    codec, bpe_hash = open_codec(prior.bpe) if prior.tokens == "bpe" else (None, None)
    sampling = getattr(getattr(tokenizer, "config", None), "sampling", None)
    decoding = dataclasses.asdict(sampling) if sampling is not None else None
    device = torch.device(device)
    inputs = cache_inputs(tokenizer_hash, prior, data, split, limit, seed, flips, bpe_hash, decoding,
                          precision="bf16" if device.type == "cuda" else "fp32")
    key = _digest(inputs)
    directory = Path(cache_root) / f"{split}-{key[:20]}"
    cached, problem = _open_verified(directory, key, tokenizer_hash)
    if cached is not None:
        return cached
    if problem is not None and rank == 0:
        print(f"token cache {directory}: {problem}; rebuilding it", flush=True)
        _discard(directory)

    manifest = {**inputs, "shard_size": prior.cache_shard_size}
    shards = _ShardWriter(directory.with_name(directory.name + ".parts"), manifest)
    job = _Tokenizing(tokenizer, prior, data, split, limit, seed, flips, device, codec, progress and rank == 0)
    job.run(shards, lambda index: index % world_size == rank)
    if rank == 0:
        wait_for(shards.missing, wait_timeout)
        _redo_invalid(shards, job)
        _merge(shards, directory, tokenizer, prior, data, split, codec, tokenizer_hash, key)
    else:
        meta = directory / "meta.json"
        merged = f"{meta} (the merged token cache, which rank 0 writes once every shard exists)"
        ready = lambda: meta.is_file() and _open_verified(directory, key, tokenizer_hash)[0] is not None  # noqa: E731
        wait_for(lambda: None if ready() else merged, wait_timeout)
    dataset, problem = _open_verified(directory, key, tokenizer_hash)
    if dataset is None:
        raise UserError(f"token cache {directory}: {problem}, right after it was built")
    return dataset


def _open_verified(directory: Path, key: str, tokenizer_hash: str) -> tuple[TokenDataset | None, str | None]:
    """(the cache, None) when it is there and verified; (None, why not) when it is there but fails;
    (None, None) when there is none. Tokens of another tokenizer stay an error (`TokenizerMismatch`)."""
    if not (directory / "meta.json").is_file():
        return None, None
    try:
        dataset = TokenDataset.load(directory, tokenizer_hash)
    except TokenizerMismatch:
        raise
    except UserError as err:
        return None, str(err).removeprefix(f"{directory}: ").removesuffix("; delete it to rebuild")
    problem = dataset.problem(key)
    return (None, problem) if problem else (dataset, None)


def _discard(directory: Path) -> None:
    """Remove a cache that failed verification: renamed away first, so no rank opens a half-deleted one."""
    doomed = directory.with_name(f".{directory.name}.discarded-{os.getpid()}")
    try:
        os.replace(directory, doomed)
    except FileNotFoundError:  # another job sharing the cache folder discarded it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


@dataclass
class _Tokenizing:
    """One split pushed through the tokenizer, shard by shard (the settings every shard shares)."""

    tokenizer: torch.nn.Module
    prior: PriorConfig
    data: DataConfig
    split: str
    limit: int | None
    seed: int
    flips: bool
    device: torch.device
    codec: BPECodec | None
    progress: bool

    def run(self, shards: _ShardWriter, wanted: Callable[[int], bool]) -> None:
        """Tokenize and write the `wanted` shards that are not on disk yet."""
        tokenizer, device = self.tokenizer, self.device
        was_training = tokenizer.training
        tokenizer.eval().to(device)
        bar = tqdm(desc=f"tokenize {self.split}", unit="img", disable=not self.progress, dynamic_ncols=True)
        try:
            for shard, batches in _shards_to_do(self.data, self.split, self.limit, self.seed,
                                                self.prior.tokenize_batch_size, shards, wanted):
                sequences, labels, skipped, images = [], [], [], 0
                for batch in batches:
                    skipped += batch.skipped
                    images += len(batch.skipped)
                    if batch.images.numel() == 0:
                        continue
                    for views in [batch.images, batch.images.flip(-1)] if self.flips else [batch.images]:
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                            sequences += tokenize_for_prior(tokenizer, views.to(device), self.prior, self.codec)
                        labels.append(batch.labels.numpy())
                    images += len(batch.images)
                    bar.update(len(batch.images))
                shards.write(shard, sequences, labels, skipped, images)
        finally:
            tokenizer.train(was_training)
            bar.close()


class _ShardWriter:
    """The shards of one cache being built, in `<cache>.parts/<manifest hash>/`: `manifest.json` (what
    builds them: the cache inputs and the shard size), `<index>.npz`, and `count.json` (shards and source
    images in all) once some rank has seen the end of the split. Shards of another manifest live in
    another folder, so they are never mixed in; the merge removes every folder."""

    def __init__(self, parts: Path, manifest: dict[str, Any]):
        self.parts, self.manifest, self.size = parts, manifest, int(manifest["shard_size"])
        self.folder = parts / _digest(manifest)[:16]
        if not (self.folder / "manifest.json").is_file():
            atomic_write_text(self.folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))

    def path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.npz"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, sequences: list[np.ndarray], labels: list[np.ndarray], skipped: list[int],
              images: int) -> None:
        """Shard `index`: the tokens of its `images` source images (`skipped` of them unreadable)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        dtype = np.float32 if sequences and sequences[0].dtype.kind == "f" else np.int32
        arrays = {
            "tokens": np.concatenate(sequences).astype(dtype) if sequences else np.zeros(0, np.int32),
            "lengths": lengths,
            "labels": np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
            "skipped": np.asarray(skipped, dtype=np.int64),
            "images": np.int64(images),
        }

        def save(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.savez would append ".npz" to a path
                np.savez(handle, **arrays)

        atomic_write(self.path(index), save)

    def set_count(self, images: int) -> None:
        shards = max(1, -(-images // self.size))
        atomic_write_text(self.folder / "count.json", json.dumps({"shards": shards, "images": images}))

    def counts(self) -> dict[str, int] | None:
        """{"shards": ..., "images": ...} once known."""
        path = self.folder / "count.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def count(self) -> int | None:
        counts = self.counts()
        return None if counts is None else counts["shards"]

    def missing(self) -> str | None:
        """What the merge still waits for (None: nothing), as one line."""
        count = self.count()
        if count is None:
            return f"{self.folder / 'count.json'} (written by the first rank to reach the end of the split)"
        absent = [self.path(i).name for i in range(count) if not self.done(i)]
        if not absent:
            return None
        more = f" and {len(absent) - 4} more" if len(absent) > 4 else ""
        return f"token-cache shard(s) {', '.join(absent[:4])}{more} in {self.folder}"

    def read(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(index)) as shard:
            return {k: shard[k] for k in shard.files}

    def problem(self, index: int) -> str | None:
        """Why shard `index` cannot be merged, or None: it must hold one labelled row per usable image
        (two with flips) of exactly the source images [index * size, (index + 1) * size)."""
        try:
            shard = self.read(index)
            images, lengths, labels = int(shard["images"]), shard["lengths"], shard["labels"]
            skipped, tokens = len(shard["skipped"]), shard["tokens"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            return f"unreadable ({err!r})"
        expected_images = min(self.size, self.counts()["images"] - index * self.size)
        rows = (images - skipped) * (2 if self.manifest["flips"] else 1)
        if images != expected_images or len(lengths) != rows or len(labels) != rows:
            return (f"{len(lengths)} sequences and {len(labels)} labels from {images} images; expected {rows} "
                    f"from {expected_images}")
        if len(tokens) != int(lengths.sum()):
            return f"{len(tokens)} tokens for lengths summing to {int(lengths.sum())}"
        return None


def _redo_invalid(shards: _ShardWriter, job: _Tokenizing) -> None:
    """Rank 0, before merging: tokenize again any shard that fails verification (damaged on disk)."""
    problems = {i: p for i in range(shards.count()) if (p := shards.problem(i)) is not None}
    if not problems:
        return
    first = min(problems)
    print(f"token cache: redoing {len(problems)} shard(s) of {shards.folder} that failed verification "
          f"({shards.path(first).name}: {problems[first]})", flush=True)
    for index in problems:
        shards.path(index).unlink(missing_ok=True)
    job.run(shards, lambda index: index in problems)
    for index in problems:
        if (problem := shards.problem(index)) is not None:
            raise UserError(f"{shards.path(index)}: {problem}, also after tokenizing it again")


def _shards_to_do(data: DataConfig, split: str, limit: int | None, seed: int, batch_size: int,
                  shards: _ShardWriter, wanted: Callable[[int], bool]) -> Iterator[tuple[int, Iterator[Batch]]]:
    """(shard index, its batches of center-cropped images) for the `wanted` shards that are not on disk
    yet, from map-style or streamed sources alike. Shard i holds images [i * size, (i + 1) * size)."""
    source = load_source(data, split, seed)
    todo = lambda index: wanted(index) and not shards.done(index)  # noqa: E731
    if hasattr(source, "__len__"):
        dataset = ImageDataset(source, data, train=False)
        n = len(dataset) if limit is None else min(limit, len(dataset))
        shards.set_count(n)
        for index in filter(todo, range(shards.count())):
            rows = range(index * shards.size, min(n, (index + 1) * shards.size))
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                                                 collate_fn=collate, num_workers=data.num_workers)
            yield index, iter(loader)
        return
    # a stream has no length: every rank reads it in order and decodes only the rows of its own shards
    rows: list[dict] = []
    index = -1
    for index, row in enumerate(source):
        if limit is not None and index >= limit:
            index -= 1
            break
        shard = index // shards.size
        if todo(shard):
            rows.append(example_from_row(row, index, data, False, 0))
        if rows and (index + 1) % shards.size == 0:
            yield shard, _collated(rows, batch_size)
            rows = []
    if rows:
        yield (index // shards.size), _collated(rows, batch_size)
    shards.set_count(index + 1)
    if index < 0 and todo(0):  # an empty stream still gets its (empty) shard, for the merge's error
        shards.write(0, [], [], [], 0)


def _collated(rows: list[dict], batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start : start + batch_size])


def _merge(shards: _ShardWriter, directory: Path, tokenizer, prior: PriorConfig, data: DataConfig, split: str,
           codec, tokenizer_hash: str, key: str) -> None:
    """Rank 0: concatenate the verified shards in order into the cache folder, then delete every shard."""
    parts = [shards.read(i) for i in range(shards.count())]
    skipped = [int(i) for part in parts for i in part["skipped"]]
    report_skipped(skipped, f"{data.source} [{split}]")
    lengths = np.concatenate([part["lengths"] for part in parts])
    if len(lengths) == 0:
        raise UserError(f"data: {data.source} [{split}] yielded no usable image to tokenize")
    tokens = np.concatenate([part["tokens"] for part in parts if len(part["lengths"])])
    continuous = tokens.dtype.kind == "f"
    if continuous:
        tokens = tokens.reshape(int(lengths.sum()), -1)
    spec = _spec(tokenizer, prior, continuous, tokens.shape[1] if continuous else 0, int(lengths.max()), codec,
                 tokenizer_hash)
    meta = {
        "key": key,
        "spec": dataclasses.asdict(spec),
        "tokenizer": prior.tokenizer,
        "tokens": prior.tokens,
        "prefix_length": prior.prefix_length,
        "target_psnr": prior.target_psnr,
        "bpe": prior.bpe,
        "split": split,
        "count": len(lengths),
        "images": shards.counts()["images"],  # source images covered, unreadable ones included
        "skipped": len(skipped),
        "build": shards.manifest,  # what built it: every cache input, and the shard size
        "mean_length": float(lengths.mean()),
    }
    labels = np.concatenate([part["labels"] for part in parts])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    TokenDataset(tokens, offsets, labels, meta).save(directory)
    shutil.rmtree(shards.parts, ignore_errors=True)


def tokenize_for_prior(tokenizer, images: torch.Tensor, prior: PriorConfig, codec) -> list[np.ndarray]:
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


def _spec(tokenizer, prior: PriorConfig, continuous: bool, token_dim: int, max_length: int, codec,
          tokenizer_hash: str) -> TokenSpec:
    if continuous != (prior.kind == "flow"):
        needed = "a quantized tokenizer (integer codes)" if prior.kind == "discrete" else "a KL tokenizer (latents)"
        raise UserError(
            f"prior.kind: {prior.kind} needs {needed}; {prior.tokenizer} gives "
            f"{'continuous latents' if continuous else 'integer codes'} (use prior.kind="
            f"{'flow' if continuous else 'discrete'})"
        )
    return TokenSpec(
        continuous=continuous,
        vocab_size=0 if continuous else int(codec.vocab_size if codec is not None else tokenizer.vocab_size),
        token_dim=token_dim,
        max_length=max_length,
        variable_length=prior.tokens in ("adaptive", "bpe"),
        token_set=bool(getattr(tokenizer, "token_set", False)) and prior.tokens in ("full", "prefix"),
        tokenizer_hash=tokenizer_hash,
    )
