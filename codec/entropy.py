"""Token streams <-> range-coded bits, with a `DiscretePrior`'s next-token probabilities (constriction).

Encoder and decoder run the very same computation: the prior's KV-cached decoder (`priors.KVCacheDecoder`,
the sampler's), one position per step over a chunk of tiles of the same size, with the same torch thread
count, fed the same ids. The encoder knows every token in advance but still steps position by position,
because a whole-sequence forward pass rounds differently from the incremental one the decoder must use.
Its float32 logits become float64 probabilities, which constriction's `Categorical(perfect=False)`
quantizes to integers with a floor (every id keeps at least the smallest representable mass), identically
on both sides when the logits are bit-identical.

The distribution is the prior's own likelihood (what `DiscretePrior.nll_bits` scores): the null condition
first, the full output head, EOS included for variable-length priors, and for token sets the mass below
the previous id moved onto the allowed ids. So the payload tracks the prior's NLL of the same tokens.

Each tile's length is known one of three ways (`Layout.stream`): `fixed` (k tokens, from the header),
`eos` (the prior ends it with EOS, at most k tokens), `pow2` (one of 1, 2, 4, ..., k, coded with a uniform
model before the chunk's tokens, log2 of the number of lengths per tile, as the evaluation charges it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import constriction
import numpy as np
import torch

from base.errors import UserError
from flextok.nested_dropout import powers_of_two_upto
from priors import DiscretePrior, KVCacheDecoder

from .container import STREAMS

__all__ = ["Layout", "decode_streams", "encode_streams", "pinned_threads"]

FAMILY = constriction.stream.model.Categorical(perfect=False)  # a row of probabilities per symbol


@dataclass(frozen=True)
class Layout:
    """How a file's token streams are laid out: see the module docstring."""

    stream: str
    k: int
    chunk: int = 64  # tiles per prior batch: the batch shape must be the same when decoding
    threads: int = 1  # torch threads of the prior pass; one is deterministic and never oversubscribes

    def __post_init__(self):
        if self.stream not in STREAMS or min(self.k, self.chunk, self.threads) < 1:
            raise ValueError(f"bad layout {self}")

    @property
    def lengths(self) -> list[int]:
        """The lengths a `pow2` tile may have."""
        return powers_of_two_upto(self.k)


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run torch with exactly `threads` threads (reductions may split differently with another count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode_streams(prior: DiscretePrior, streams: list[np.ndarray], layout: Layout) -> bytes:
    """Range-code every tile's tokens; the payload's bytes (little-endian 32-bit words)."""
    _check_lengths(prior, streams, layout)
    encoder = constriction.stream.queue.RangeEncoder()
    for start in range(0, len(streams), layout.chunk):
        part = streams[start : start + layout.chunk]
        lengths = np.array([len(s) for s in part])
        if layout.stream == "pow2" and len(layout.lengths) > 1:
            encoder.encode(np.searchsorted(layout.lengths, lengths).astype(np.int32), _uniform(len(layout.lengths)))
        targets = np.full((len(part), layout.k + 1), prior.eos_id, dtype=np.int32)  # EOS right after each stream
        for row, tokens in enumerate(part):
            targets[row, : len(tokens)] = tokens

        def code(i: int, rows: np.ndarray, probs: np.ndarray) -> np.ndarray:
            symbols = targets[rows, i]
            encoder.encode(symbols, FAMILY, probs)
            return symbols

        _walk(prior, layout, len(part), None if layout.stream == "eos" else lengths, code)
    return encoder.get_compressed().astype("<u4").tobytes()


def decode_streams(prior: DiscretePrior, payload: bytes, num_tiles: int, layout: Layout) -> list[np.ndarray]:
    """The token streams of `num_tiles` tiles from `encode_streams`' payload."""
    if len(payload) % 4:
        raise UserError("corrupted payload (not a whole number of 32-bit words)")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
    streams = []
    for start in range(0, num_tiles, layout.chunk):
        count = min(layout.chunk, num_tiles - start)
        lengths = None
        if layout.stream == "fixed":
            lengths = np.full(count, layout.k)
        elif layout.stream == "pow2":
            lengths = np.array(layout.lengths)[decoder.decode(_uniform(len(layout.lengths)), count)
                                               if len(layout.lengths) > 1 else np.zeros(count, dtype=np.int64)]
        streams += _walk(prior, layout, count, lengths, lambda i, rows, probs: decoder.decode(FAMILY, probs))
    return streams


def _walk(prior: DiscretePrior, layout: Layout, batch: int, lengths: np.ndarray | None,
          code: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Step the prior over one chunk of `batch` tiles; at each position `code(position, rows, probs)` codes
    the symbols of the rows still going (probs [rows, V]) and returns them. `lengths` None: EOS ends a row.
    The one loop both directions run, so both see bit-identical probabilities."""
    eos = lengths is None
    steps = layout.k + 1 if eos else int(lengths.max())
    out = np.zeros((batch, steps), dtype=np.int64)
    ends = np.full(batch, -1) if eos else lengths
    with pinned_threads(layout.threads), torch.no_grad():
        try:
            decoder = KVCacheDecoder(prior, batch, steps)
        except TypeError as err:
            raise UserError(f"the prior cannot drive the codec: {err}") from None
        feed = prior.condition_ids(None, batch).cpu()  # unconditional: the null class
        for i in range(steps):
            rows = np.flatnonzero(ends < 0 if eos else i < lengths)
            if not len(rows):
                break
            logits = decoder.step(feed)[torch.from_numpy(rows)]
            floors = out[rows, i - 1] if prior.token_set and i else None
            out[rows, i] = code(i, rows, _probabilities(logits, floors))
            if eos:
                ended = rows[out[rows, i] == prior.eos_id]
                ends[ended] = i
            feed = torch.from_numpy(out[:, i])
    if eos and (ends < 0).any():
        raise UserError("corrupted payload (a tile's tokens do not end)")
    return [out[row, :end] for row, end in enumerate(ends)]


def _probabilities(logits: torch.Tensor, floors: np.ndarray | None) -> np.ndarray:
    """Next-token probabilities [rows, V] in float64; ids below a token set's floor get none (constriction
    still gives them its minimum mass)."""
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    if floors is not None:
        probs[np.arange(probs.shape[1])[None] < floors[:, None]] = 0.0
    return probs


def _uniform(n: int):
    return constriction.stream.model.Categorical(np.full(n, 1.0 / n), perfect=False)


def _check_lengths(prior: DiscretePrior, streams: list[np.ndarray], layout: Layout) -> None:
    """Refuse streams the layout cannot express (a bug upstream, not a user error)."""
    lengths = {len(s) for s in streams}
    allowed = {"fixed": {layout.k}, "pow2": set(layout.lengths), "eos": set(range(1, layout.k + 1))}[layout.stream]
    if not lengths <= allowed:
        raise ValueError(f"stream lengths {sorted(lengths - allowed)} do not fit the layout {layout}")
    if any(len(s) and (s.min() < 0 or s.max() >= prior.vocab_size) for s in streams):
        raise ValueError(f"token ids must be in [0, {prior.vocab_size})")
