"""BPECodec: lossless BPE over VQ codes, in `1d`, `2d` and `flat` modes.

Shorter token sequences make priors cheaper, but a prior over image tokens is only useful
if the tokens decode back to the exact codes. Every mode here is exactly invertible:

* `1d`: for coarse-to-fine 1D tokenizers. Merges never cross position blocks
  ([0,1), [1,2), [2,4), ... by default), so cutting the codes at a block edge is a
  prefix of the token sequence (`BPECodec.truncate`).
* `2d`: for h x w grids. Tokens are rectangles joined horizontally or vertically and
  emitted in raster order of their top-left cell; decoding rebuilds the grid.
* `flat`: plain BPE over the row-major sequence, the baseline.

Base token ids equal code ids (0..K-1); merged tokens get K..V-1.

Saved codecs use the models' Hub format (`base.hub`): `config.json` with `model_type: bpe_codec`, the
backend file and a model card, loadable from a folder or a hub id `hf:owner/name`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from base.errors import ConfigError, UserError
from base.files import atomic_write_bytes
from base.fingerprint import fingerprint_files
from base.hub import (
    CONFIG_NAME,
    ModelCardInfo,
    card_load_path,
    push_folder_to_hub,
    read_model_meta,
    register_model,
    resolve_model_dir,
    usage_snippet,
    write_model_card,
)

from ._backends import BACKENDS
from ._grid import GridEngine
from ._inputs import (
    ArrayLike,
    as_output,
    concat_checked,
    is_torch,
    split_batch,
    to_int_array,
)
from ._sequence import SequenceEngine, block_edges
from ._text import MAX_CODEBOOK_SIZE
from .stats import BPEStats

__all__ = ["BACKEND_FILES", "BPECodec", "CONFIG_NAME", "GRID_BACKEND", "MODEL_TYPE", "MODES", "codec_dir", "open_codec"]

MODES = ("1d", "2d", "flat")
GRID_BACKEND = "grid"
MODEL_TYPE = "bpe_codec"
BACKEND_FILES = (*sorted(b.filename for b in BACKENDS.values()), GridEngine.filename)
_FORMAT = "bpe_image.BPECodec"
_VERSION = 1
_DEFAULT_BATCH_RATIO = 0.5
_CONFIG_KEYS = {
    "backend",
    "backend_file",
    "backend_sha256",
    "boundaries",
    "codebook_size",
    "grid_shape",
    "max_token_length",
    "vocab_size",
}

Engine = SequenceEngine | GridEngine
Ids = np.ndarray | torch.Tensor


@register_model(MODEL_TYPE)
class BPECodec:
    """Lossless BPE codec over VQ code sequences or grids.

    Build one with `train` or `from_pretrained` (the constructor takes an
    internal engine). Every method accepts numpy arrays, torch tensors or lists, and
    returns torch tensors when given torch input.
    """

    def __init__(self, engine: Engine, *, mode: str, backend: str, max_token_length: int) -> None:
        self._engine = engine
        self._mode = mode
        self._backend = backend
        self._max_token_length = max_token_length

    @classmethod
    def train(
        cls,
        sequences: ArrayLike,
        *,
        codebook_size: int,
        vocab_size: int,
        mode: str = "1d",
        backend: str | None = None,
        boundaries: Sequence[int] | None = None,
        max_token_length: int = 16,
        batch_ratio: float | None = None,
    ) -> BPECodec:
        """Learn `vocab_size - codebook_size` merges from code sequences.

        `sequences` is an [N, L] array or list of 1D arrays (`1d`/`flat`, lengths may
        differ), or an [N, h, w] array or list of same-shape grids (`2d`). `codebook_size`
        is K: codes must lie in [0, K), K <= 65534. `vocab_size` is V >= K; if the data has
        too few repeated pairs, training stops early with a warning and `codec.vocab_size`
        is the actual size. `mode` is `"1d"`, `"2d"` or `"flat"`.

        `backend` is `"tokenizers"` (default) or `"sentencepiece"` for 1d/flat. 2d merges
        cannot be expressed by a string BPE library; they run in the built-in vectorized
        grid engine (`backend=None` or `"grid"`).

        `boundaries` (1d only) are increasing positions where blocks start (merges never
        cross them); the default is powers of two, 1, 2, 4, 8, ... `max_token_length` is
        the most codes in one token (cells, in 2d). `batch_ratio` (2d only) is in (0, 1]:
        each training round merges, with disjoint token types, every pair whose count is
        at least this fraction of the round's top count. 1.0 is closest to
        one-merge-at-a-time greedy BPE; the default 0.5 needs far fewer rounds.
        """
        backend_name, cuts, ratio = _check_train_args(
            mode, codebook_size, vocab_size, backend, boundaries, max_token_length, batch_ratio
        )
        items, _ = split_batch(sequences, _item_ndim(mode), "sequences")
        if not items:
            raise ValueError("need at least one training sequence")
        engine: Engine
        if mode == "2d":
            engine = GridEngine.train(items, codebook_size, vocab_size, max_token_length, ratio)
        else:
            engine = SequenceEngine.train(
                items, codebook_size, vocab_size, backend_name, cuts, mode == "1d", max_token_length
            )
        if engine.vocab_size < vocab_size:
            warnings.warn(
                f"learned only {engine.vocab_size - codebook_size} of {vocab_size - codebook_size} merges "
                f"(too few repeated pairs in the training data); vocab_size is {engine.vocab_size}",
                stacklevel=2,
            )
        return cls(engine, mode=mode, backend=backend_name, max_token_length=max_token_length)

    @property
    def mode(self) -> str:
        """`"1d"`, `"2d"` or `"flat"`."""
        return self._mode

    @property
    def backend(self) -> str:
        """`"tokenizers"`, `"sentencepiece"` or `"grid"` (2d)."""
        return self._backend

    @property
    def codebook_size(self) -> int:
        """K: base token ids are code ids 0..K-1."""
        return self._engine.codebook_size

    @property
    def vocab_size(self) -> int:
        """V: merged tokens have ids K..V-1 (the size actually learned)."""
        return self._engine.vocab_size

    @property
    def num_merges(self) -> int:
        """V - K."""
        return self.vocab_size - self.codebook_size

    @property
    def boundaries(self) -> tuple[int, ...] | None:
        """1d block starts; None means powers of two (or not 1d)."""
        return self._engine.cuts if isinstance(self._engine, SequenceEngine) else None

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """(h, w) of the grids a 2d codec handles; None otherwise."""
        return (self._engine.h, self._engine.w) if isinstance(self._engine, GridEngine) else None

    @property
    def max_token_length(self) -> int:
        """Most codes (2d: cells) a token may hold."""
        return self._max_token_length

    def token_sizes(self) -> np.ndarray:
        """Number of codes in each token id, shape [V]."""
        return self._engine.token_sizes.copy()

    def encode(self, codes: ArrayLike) -> Ids:
        """Token ids of one sequence ([L]) or grid ([h, w]); ValueError names a bad code's position."""
        arr = self._item(codes, _item_ndim(self._mode), "codes")
        return as_output(self._engine.encode([arr], item_name=None)[0], is_torch(codes))

    def decode(self, ids: ArrayLike) -> Ids:
        """Codes ([L], or [h, w] in 2d) of one token sequence; unknown ids raise ValueError."""
        arr = self._item(ids, 1, "ids")
        return as_output(self._engine.decode([arr], item_name=None)[0], is_torch(ids))

    def encode_batch(self, batch: ArrayLike) -> list[Ids]:
        """Token ids of many sequences/grids: a stacked array or a list; uses every core."""
        items, torch_out = split_batch(batch, _item_ndim(self._mode), "sequences")
        return [as_output(ids, torch_out) for ids in self._engine.encode(items)]

    def encode_flat(self, sequences: list[np.ndarray]) -> list[Ids]:
        """Token ids of flat code sequences ([L] each) as tokenizers emit them; a 2d codec lays each one out
        on its `grid_shape` (row-major, the tokenizers' order) first."""
        if self._mode == "2d":
            sequences = [np.asarray(s).reshape(self.grid_shape) for s in sequences]
        return self.encode_batch(sequences)

    def decode_batch(self, batch: ArrayLike) -> list[Ids]:
        """Codes of many token sequences (list of 1D id arrays, or a stacked [N, T] array)."""
        items, torch_out = split_batch(batch, 1, "token sequences")
        return [as_output(codes, torch_out) for codes in self._engine.decode(items)]

    def truncate(self, ids: ArrayLike, num_codes: int) -> Ids:
        """Prefix of `ids` that decodes to the first `num_codes` codes.

        In 1d mode, when `num_codes` is a block edge (or the sequence length) this
        equals `encode(codes[:num_codes])`. Raises ValueError when no token ends at
        `num_codes`, and in 2d mode, whose tokens have no 1D code order.
        """
        if self._mode == "2d":
            raise ValueError("truncate needs a 1D code order; 2d tokens are rectangles and have none")
        arr = self._item(ids, 1, "ids")
        concat_checked([arr], self.vocab_size, ("position",), "token id", None)
        ends = np.cumsum(self._engine.token_sizes[arr])
        cut = int(np.searchsorted(ends, num_codes, side="right"))
        if (int(ends[cut - 1]) if cut else 0) != num_codes:
            total = int(ends[-1]) if ends.size else 0
            hint = f"; token edges always fall on block edges {list(block_edges(total, self.boundaries))}"
            raise ValueError(
                f"cannot truncate at {num_codes} codes: no token ends there (the ids cover {total} codes"
                f"{hint if self._mode == '1d' else ''})"
            )
        return as_output(arr[:cut], is_torch(ids))

    def stats(self, sequences: ArrayLike) -> BPEStats:
        """Compression statistics of this codec on `sequences` (same input forms as encode_batch)."""
        items, _ = split_batch(sequences, _item_ndim(self._mode), "sequences")
        return BPEStats.measure(self._engine.encode(items), self._engine.token_sizes, self.codebook_size)

    def save_pretrained(self, directory: str | os.PathLike, card: ModelCardInfo | dict | None = None, *,
                        load_path: str | None = None) -> Path:
        """Write the backend file, the model card `README.md` and `config.json` (atomically, config last),
        in the models' Hub format. `card` and `load_path` are as in `base.hub.HubMixin.save_pretrained`."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        data = self._engine.to_bytes()
        atomic_write_bytes(path / self._engine.filename, data)
        config = {
            "format": _FORMAT,
            "version": _VERSION,
            "mode": self._mode,
            "backend": self._backend,
            "codebook_size": self.codebook_size,
            "vocab_size": self.vocab_size,
            "boundaries": list(self.boundaries) if self.boundaries is not None else None,
            "grid_shape": list(self.grid_shape) if self.grid_shape is not None else None,
            "max_token_length": self._max_token_length,
            "backend_file": self._engine.filename,
            "backend_sha256": hashlib.sha256(data).hexdigest(),
        }
        meta = {"model_type": MODEL_TYPE, "config": config}
        write_model_card(path, meta, usage_snippet(BPECodec, card_load_path(path, load_path), "codec"), card)
        atomic_write_bytes(path / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
        return path

    def push_to_hub(self, repo_id: str, private: bool = True, token: str | None = None,
                    card: ModelCardInfo | dict | None = None) -> str:
        """Upload the saved codec, card included, to `repo_id` (`owner/name` or `hf:owner/name`; needs network
        access and a token); returns the `hf:owner/name` that loads it."""
        return push_folder_to_hub(repo_id, lambda tmp, ref: self.save_pretrained(tmp, card, load_path=ref),
                                  private, token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> BPECodec:
        """Load a codec saved by `save_pretrained` from a folder or a hub id `hf:owner/name`.

        Raises `base.errors.UserError` for a folder or hub id that is not there or holds another model
        type, FileNotFoundError naming a missing file, `base.errors.ConfigError` (a UserError and a
        ValueError) naming a file that is corrupt or does not match the config, each one line.
        """
        directory = codec_dir(path)
        config, config_path = _read_codec_config(directory)
        backend_path = directory / config["backend_file"]
        if not backend_path.is_file():
            raise FileNotFoundError(f"{backend_path}: backend file named in {config_path} is missing")
        data = backend_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != config["backend_sha256"]:  # a backend file swapped under it
            raise ConfigError(f"{backend_path} does not match {config_path} (checksum differs)")
        try:
            engine = _load_engine(config, data)
        except Exception as err:  # the backends raise many types (tokenizers: plain Exception) on bad bytes
            detail = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise ConfigError(f"{backend_path}: not a readable {config['backend']} backend file ({detail})") from None
        if (engine.codebook_size, engine.vocab_size) != (config["codebook_size"], config["vocab_size"]):
            raise ConfigError(
                f"{backend_path} holds K={engine.codebook_size}, V={engine.vocab_size} but "
                f"{config_path} says K={config['codebook_size']}, V={config['vocab_size']}"
            )
        return cls(engine, mode=config["mode"], backend=config["backend"], max_token_length=config["max_token_length"])

    def _item(self, x: ArrayLike, ndim: int, what: str) -> np.ndarray:
        """One unbatched input as int64, with the dimensionality this mode expects."""
        arr = to_int_array(x, what)
        if arr.ndim != ndim:
            raise ValueError(f"{what} must be {ndim}-dimensional for mode {self._mode!r}, got shape {arr.shape}")
        return arr

    def __repr__(self) -> str:
        return (
            f"BPECodec(mode={self._mode!r}, backend={self._backend!r}, codebook_size={self.codebook_size}, "
            f"vocab_size={self.vocab_size})"
        )


def open_codec(path: str | os.PathLike) -> tuple[BPECodec, str]:
    """A saved codec and the hash of its files (its identity in the cache keys of the tokens it made)."""
    try:
        directory = codec_dir(path)  # a hub id is fingerprinted by its downloaded files
        return BPECodec.from_pretrained(directory), fingerprint_files(directory)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"bpe codec {path}: {err}") from None


def codec_dir(path: str | os.PathLike) -> Path:
    """The local folder of a saved codec: `path` itself, or a hub id `hf:owner/name`'s snapshot in the Hugging
    Face cache (downloaded if needed: config, backend files)."""
    return resolve_model_dir(path, extra_files=BACKEND_FILES)


def _item_ndim(mode: str) -> int:
    """Dimensions of one input item: grids are 2D, sequences 1D."""
    return 2 if mode == "2d" else 1


def _check_train_args(
    mode: str,
    codebook_size: int,
    vocab_size: int,
    backend: str | None,
    boundaries: Sequence[int] | None,
    max_token_length: int,
    batch_ratio: float | None,
) -> tuple[str, tuple[int, ...] | None, float]:
    """Validate training options; return (backend name, block cuts, batch ratio)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 1 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook_size must be in [1, {MAX_CODEBOOK_SIZE}], got {codebook_size}")
    if vocab_size < codebook_size:
        raise ValueError(f"vocab_size ({vocab_size}) must be at least codebook_size ({codebook_size})")
    if max_token_length < 1:
        raise ValueError(f"max_token_length must be positive, got {max_token_length}")
    if mode == "2d":
        if backend not in (None, GRID_BACKEND):
            raise ValueError(
                f"mode '2d' runs in the built-in grid engine; backend must be None or 'grid', got {backend!r}"
            )
        backend = GRID_BACKEND
    elif (backend := backend or "tokenizers") not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if boundaries is not None and mode != "1d":
        raise ValueError("boundaries only apply to mode '1d'")
    cuts = tuple(int(b) for b in boundaries) if boundaries is not None else None
    if cuts is not None and (not cuts or cuts[0] < 1 or any(b <= a for a, b in zip(cuts, cuts[1:]))):
        raise ValueError(f"boundaries must be strictly increasing positive positions, got {list(cuts)}")
    if batch_ratio is not None and mode != "2d":
        raise ValueError("batch_ratio only applies to mode '2d'")
    ratio = _DEFAULT_BATCH_RATIO if batch_ratio is None else float(batch_ratio)
    if not 0 < ratio <= 1:
        raise ValueError(f"batch_ratio must be in (0, 1], got {ratio}")
    return backend, cuts, ratio


def _read_codec_config(directory: Path) -> tuple[dict, Path]:
    """The codec config (`config.json`'s `config`) of a saved folder and the file it came from."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: no saved BPE codec here (no {CONFIG_NAME})")
    _, meta = read_model_meta(directory)
    if meta["model_type"] != MODEL_TYPE:
        raise UserError(f"{config_path}: holds a '{meta['model_type']}' model, not a BPE codec")
    return _check_config(meta.get("config"), config_path), config_path


def _check_config(config: object, config_path: Path) -> dict:
    """Check a codec config (the `config` of `config.json`): every key present
    with the right type, the values `train` would accept, and the backend file its backend writes (never
    a path elsewhere). ConfigError naming the file and the key."""
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ConfigError(f"{config_path} is not a {_FORMAT} config")
    if config.get("version") != _VERSION:
        raise ConfigError(f"{config_path} has version {config.get('version')!r}, this library reads {_VERSION}")
    if not isinstance(config.get("mode"), str) or config["mode"] not in MODES:
        raise ConfigError(f"{config_path} has unknown mode {config.get('mode')!r}")
    missing = sorted(_CONFIG_KEYS - config.keys())
    if missing:
        raise ConfigError(f"{config_path} lacks {missing}")
    for key, kind in (("codebook_size", int), ("vocab_size", int), ("max_token_length", int), ("backend", str),
                      ("backend_file", str), ("backend_sha256", str)):
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise ConfigError(f"{config_path}: '{key}' must be {'an integer' if kind is int else 'a string'}, "
                              f"got {config[key]!r}")
    for key, length in (("boundaries", None), ("grid_shape", 2)):
        value = config[key]
        if value is not None and not (isinstance(value, list) and all(type(v) is int and v > 0 for v in value)
                                      and length in (None, len(value))):
            raise ConfigError(f"{config_path}: '{key}' must be null or a list of {length or 'some'} positive "
                              f"integers, got {value!r}")
    try:
        backend, _, _ = _check_train_args(config["mode"], config["codebook_size"], config["vocab_size"],
                                          config["backend"], config["boundaries"], config["max_token_length"], None)
    except ValueError as err:
        raise ConfigError(f"{config_path}: {err}") from None
    filename = GridEngine.filename if backend == GRID_BACKEND else BACKENDS[backend].filename
    if config["backend_file"] != filename:
        raise ConfigError(f"{config_path}: 'backend_file' must be {filename!r} for backend {backend!r}, "
                          f"got {config['backend_file']!r}")
    return config


def _load_engine(config: dict, data: bytes) -> Engine:
    """Rebuild the mode's engine from the backend file contents."""
    if config["mode"] == "2d":
        shape = config.get("grid_shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise ConfigError("a 2d codec config needs grid_shape [h, w]")
        return GridEngine.from_bytes(data, (int(shape[0]), int(shape[1])))
    if config["backend"] not in BACKENDS:
        raise ValueError(f"unknown backend {config['backend']!r} in config")
    cuts = tuple(config["boundaries"]) if config["boundaries"] is not None else None
    blocked = config["mode"] == "1d"
    return SequenceEngine.from_bytes(data, config["backend"], int(config["codebook_size"]), cuts, blocked)
