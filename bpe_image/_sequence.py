"""1D and flat BPE: merges learned and applied by a string BPE backend.

Codes become private-use characters. In `1d` mode each sequence is cut into position
blocks ([0,1), [1,2), [2,4), ... by default) with a separator character between blocks
that the backend never merges across, so truncating the codes at a block edge is a
prefix of the token sequence. `flat` mode passes whole sequences unseparated.

Public ids are code ids for base tokens and K, K+1, ... for merged tokens in the
backend's order; a lookup table translates when the backend numbers them differently.
Decoding never calls the backend: it is one gather through a table of token codes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ._arrays import ranges, split_by_counts
from ._backends import BACKENDS, BLOCK_SEPARATOR, Backend
from ._inputs import concat_checked
from ._text import CODE_BASE, alphabet, codes_to_text, text_to_codes

_SEPARATOR_CODE = ord(BLOCK_SEPARATOR) - CODE_BASE


@lru_cache(maxsize=1024)
def block_edges(length: int, cuts: tuple[int, ...] | None) -> tuple[int, ...]:
    """Block edges [0, ..., length] of a sequence; `cuts=None` means powers of two."""
    if cuts is None:
        inner = itertools.takewhile(lambda c: c < length, (1 << i for i in itertools.count()))
    else:
        inner = (c for c in cuts if c < length)
    return (0, *inner, length) if length else (0,)


def _texts(flat: np.ndarray, lengths: list[int], cuts: tuple[int, ...] | None, blocked: bool) -> list[str]:
    """Backend text of each sequence: its codes, plus separators at inner block edges (1d).

    Separators are inserted into the concatenated codes and the whole batch is turned
    into one string at once; only the final per-sequence slicing is a Python loop.
    """
    if blocked:
        inner = [block_edges(n, cuts)[1:-1] for n in lengths]
        starts = (np.cumsum(lengths) - lengths).tolist()
        flat = np.insert(flat, [s + e for s, edges in zip(starts, inner) for e in edges], _SEPARATOR_CODE)
        lengths = [n + len(edges) for n, edges in zip(lengths, inner)]
    text = codes_to_text(flat)
    bounds = np.cumsum([0, *lengths]).tolist()
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class TokenTable:
    """Codes of every public id, concatenated, so decoding is a single gather."""

    lengths: np.ndarray
    starts: np.ndarray
    codes: np.ndarray

    @classmethod
    def build(cls, codebook_size: int, merged_lengths: np.ndarray, merged_codes: np.ndarray) -> TokenTable:
        """Base tokens 0..K-1 followed by the merged tokens (concatenated), in public id order."""
        lengths = np.concatenate([np.ones(codebook_size, np.int64), merged_lengths])
        codes = np.concatenate([np.arange(codebook_size, dtype=np.int64), merged_codes])
        return cls(lengths, np.cumsum(lengths) - lengths, codes)

    def expand(self, ids: np.ndarray) -> np.ndarray:
        """Concatenated codes of `ids`."""
        return self.codes[ranges(self.starts[ids], self.lengths[ids])]


def _public_ids(pieces: list[str | None], codebook_size: int) -> tuple[np.ndarray, TokenTable]:
    """Backend id -> public id (-1 for non-code pieces), and the table of public tokens.

    All pieces are converted to codes in one bulk call, so loading a large vocabulary
    costs no per-piece Python work beyond `len`.
    """
    backend_ids = np.array([i for i, piece in enumerate(pieces) if piece is not None], np.int64)
    texts = [pieces[i] for i in backend_ids.tolist()]
    lengths = np.array([len(text) for text in texts], np.int64)
    codes = text_to_codes("".join(texts))
    bad = np.flatnonzero((codes < 0) | (codes >= codebook_size))
    empty = np.flatnonzero(lengths == 0)
    if bad.size or empty.size:
        piece = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right")) if bad.size else int(empty[0])
        raise ValueError(
            f"backend token {int(backend_ids[piece])} ({texts[piece]!r}) is not made of codes in [0, {codebook_size})"
        )
    single = lengths == 1
    to_public = np.full(len(pieces), -1, np.int64)
    to_public[backend_ids[single]] = codes[(np.cumsum(lengths) - lengths)[single]]
    to_public[backend_ids[~single]] = codebook_size + np.arange(np.count_nonzero(~single))
    if not np.array_equal(np.sort(to_public[backend_ids[single]]), np.arange(codebook_size)):
        raise ValueError(f"backend vocabulary does not hold each of the {codebook_size} codes exactly once")
    merged_codes = codes[np.repeat(~single, lengths)]
    return to_public, TokenTable.build(codebook_size, lengths[~single], merged_codes)


class SequenceEngine:
    """Encodes and decodes batches of 1D code sequences through a string backend."""

    def __init__(self, backend: Backend, codebook_size: int, cuts: tuple[int, ...] | None, blocked: bool) -> None:
        self.backend = backend
        self.codebook_size = codebook_size
        self.cuts = cuts
        self.blocked = blocked
        to_public, self.table = _public_ids(backend.pieces(), codebook_size)
        identity = np.array_equal(to_public, np.arange(len(to_public)))
        self._to_public = None if identity else to_public

    @property
    def vocab_size(self) -> int:
        """Codes plus merged tokens."""
        return len(self.table.lengths)

    @property
    def token_sizes(self) -> np.ndarray:
        """Number of codes in each token id."""
        return self.table.lengths

    @property
    def filename(self) -> str:
        """Name of the backend file in a saved codec."""
        return self.backend.filename

    def to_bytes(self) -> bytes:
        """Backend model, as saved next to the codec config."""
        return self.backend.to_bytes()

    @classmethod
    def from_bytes(
        cls, data: bytes, backend_name: str, codebook_size: int, cuts: tuple[int, ...] | None, blocked: bool
    ) -> SequenceEngine:
        """Rebuild from a saved backend model."""
        return cls(BACKENDS[backend_name].from_bytes(data), codebook_size, cuts, blocked)

    @classmethod
    def train(
        cls,
        sequences: list[np.ndarray],
        codebook_size: int,
        vocab_size: int,
        backend_name: str,
        cuts: tuple[int, ...] | None,
        blocked: bool,
        max_token_length: int,
    ) -> SequenceEngine:
        """Learn merges with the named backend; merges never cross block edges."""
        flat = concat_checked(sequences, codebook_size, ("position",), "code", "sequence")
        texts = _texts(flat, [len(s) for s in sequences], cuts, blocked)
        backend = BACKENDS[backend_name].train(texts, alphabet(codebook_size), vocab_size, max_token_length, blocked)
        return cls(backend, codebook_size, cuts, blocked)

    def encode(self, sequences: list[np.ndarray], item_name: str | None = "sequence") -> list[np.ndarray]:
        """Token ids per sequence; codes are validated (ValueError naming the position)."""
        flat = concat_checked(sequences, self.codebook_size, ("position",), "code", item_name)
        encoded = self.backend.encode(_texts(flat, [len(s) for s in sequences], self.cuts, self.blocked))
        if self._to_public is None:
            return encoded
        public = [self._to_public[ids] for ids in encoded]
        if any((ids < 0).any() for ids in public):
            raise ValueError("the backend emitted a token that is not made of codes")
        return public

    def decode(self, token_lists: list[np.ndarray], item_name: str | None = "sequence") -> list[np.ndarray]:
        """Codes per token sequence; unknown ids raise ValueError naming the position."""
        ids = concat_checked(token_lists, self.vocab_size, ("position",), "token id", item_name)
        code_ends = np.concatenate([[0], np.cumsum(self.table.lengths[ids])])
        token_ends = np.cumsum([len(t) for t in token_lists], dtype=np.int64)
        return split_by_counts(self.table.expand(ids), np.diff(code_ends[token_ends], prepend=0))
