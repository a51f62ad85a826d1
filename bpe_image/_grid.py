"""Invertible 2D BPE over code grids (h x w), vectorized with numpy.

Tokens are rectangles. A horizontal merge joins two equal-height tokens whose top rows
align; a vertical merge joins two equal-width tokens whose left columns align, so a
merged token is again a rectangle and its id alone fixes its shape and codes. Tokens are
emitted in raster order of their anchor (top-left) cell.

Decoding places each token at the first unfilled cell in raster order. The filled region
is always a "skyline" (every column filled from the top), so that cell is the top of the
lowest column, leftmost on ties: decode needs only the ids and the grid shape.

Training is greedy BPE run in rounds. Each round takes the most frequent pairs whose
token types are pairwise disjoint, so their occurrences cannot overlap except along runs
of one type, which are resolved greedily in raster order. All of a round's merges are
applied at once and pair counts are updated only around the changed tokens. Encoding
replays the same rounds, so on training data it reproduces the training segmentation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ._arrays import group, ranges, split_by_counts
from ._backends import MIN_PAIR_COUNT
from ._inputs import concat_checked
from ._parallel import map_chunks

_HASH_MULTIPLIER = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 (Fibonacci hashing), as int64


class ShapeTable:
    """Height, width and cells of every token id, grown as merges are learned.

    A token's cells are stored as (flat offset from its anchor in a grid of width
    `grid_width`, code) pairs, concatenated over ids, so that painting a tiling and
    rebuilding grids are single gathers rather than per-token loops.
    """

    def __init__(self, codebook_size: int, grid_width: int) -> None:
        self.grid_width = grid_width
        self.height = np.ones(codebook_size, np.int64)
        self.width = np.ones(codebook_size, np.int64)
        self.area = np.ones(codebook_size, np.int64)
        self.cell_start = np.arange(codebook_size, dtype=np.int64)
        self.cell_offset = np.zeros(codebook_size, np.int64)
        self.cell_code = np.arange(codebook_size, dtype=np.int64)

    @property
    def size(self) -> int:
        """Number of token ids (codes plus merged tokens)."""
        return len(self.height)

    def cells(self, ids: np.ndarray) -> np.ndarray:
        """Indices into `cell_offset`/`cell_code` of all cells of `ids`, id by id."""
        return ranges(self.cell_start[ids], self.area[ids])

    def extend(self, left: np.ndarray, right: np.ndarray, vertical: np.ndarray) -> None:
        """Append one id per merge: `right` placed right of (or below) `left`."""
        left_h, left_w = self.height[left], self.width[left]
        left_area, right_area = self.area[left], self.area[right]
        shift = np.where(vertical, left_h * self.grid_width, left_w)
        new_area = left_area + right_area
        local_start = np.cumsum(new_area) - new_area
        new_start = len(self.cell_offset) + local_start
        into_left = ranges(local_start, left_area)
        into_right = ranges(local_start + left_area, right_area)
        src_left, src_right = self.cells(left), self.cells(right)
        offsets = np.empty(int(new_area.sum()), np.int64)
        codes = np.empty_like(offsets)
        offsets[into_left] = self.cell_offset[src_left]
        offsets[into_right] = self.cell_offset[src_right] + np.repeat(shift, right_area)
        codes[into_left] = self.cell_code[src_left]
        codes[into_right] = self.cell_code[src_right]
        self.height = np.concatenate([self.height, np.where(vertical, left_h + self.height[right], left_h)])
        self.width = np.concatenate([self.width, np.where(vertical, left_w, left_w + self.width[right])])
        self.area = np.concatenate([self.area, new_area])
        self.cell_start = np.concatenate([self.cell_start, new_start])
        self.cell_offset = np.concatenate([self.cell_offset, offsets])
        self.cell_code = np.concatenate([self.cell_code, codes])


@dataclass(frozen=True)
class Pairs:
    """Adjacent token pairs: anchors of the first and second token, and the direction."""

    left: np.ndarray
    right: np.ndarray
    vertical: np.ndarray

    def ids(self) -> np.ndarray:
        """Pair ids `left * 2 + vertical` (a left anchor has one pair per direction)."""
        return self.left * 2 + self.vertical

    def take(self, index: np.ndarray) -> Pairs:
        """Subset by mask or index array."""
        return Pairs(self.left[index], self.right[index], self.vertical[index])


class GridState:
    """Current tiling of a batch of grids, flattened to cells `(n * h + r) * w + c`.

    `tok` holds the token id at each anchor cell and -1 elsewhere; `owner` maps every
    cell to the anchor of the token covering it, which is how left and upper neighbours
    are found. A pair is identified by `left_anchor * 2 + vertical`.
    """

    def __init__(self, grids: np.ndarray, table: ShapeTable) -> None:
        n, self.h, self.w = grids.shape
        self.table = table
        self.tok = grids.reshape(-1).astype(np.int64, copy=True)
        self.owner = np.arange(self.tok.size, dtype=np.int64)
        self.row = np.tile(np.repeat(np.arange(self.h), self.w), n)
        self.col = np.tile(np.arange(self.w), n * self.h)

    def partners_after(self, anchors: np.ndarray, vertical: bool) -> tuple[np.ndarray, np.ndarray]:
        """Mask of anchors whose right (lower) neighbour can merge with them, and that neighbour."""
        t = self.tok[anchors]
        if vertical:
            step = self.table.height[t]
            inside = self.row[anchors] + step < self.h
            partner, same = anchors + step * self.w, self.table.width
        else:
            step = self.table.width[t]
            inside = self.col[anchors] + step < self.w
            partner, same = anchors + step, self.table.height
        partner = np.where(inside, partner, anchors)
        u = self.tok[partner]
        return inside & (u >= 0) & (same[u] == same[t]), partner

    def partners_before(self, anchors: np.ndarray, vertical: bool) -> tuple[np.ndarray, np.ndarray]:
        """Mask of anchors whose left (upper) neighbour can merge with them, and that neighbour."""
        if vertical:
            inside = self.row[anchors] > 0
            cell = anchors - self.w
        else:
            inside = self.col[anchors] > 0
            cell = anchors - 1
        other = self.owner[np.where(inside, cell, anchors)]
        if vertical:
            aligned, same = self.col[other] == self.col[anchors], self.table.width
        else:
            aligned, same = self.row[other] == self.row[anchors], self.table.height
        return inside & aligned & (same[self.tok[other]] == same[self.tok[anchors]]), other

    def initial_pairs(self) -> Pairs:
        """Every pair of a fresh tiling (all tokens 1x1), straight from index arithmetic."""
        cells = np.arange(self.tok.size).reshape(-1, self.h, self.w)
        across = (cells[:, :, :-1].ravel(), cells[:, :, 1:].ravel())
        down = (cells[:, :-1, :].ravel(), cells[:, 1:, :].ravel())
        return Pairs(
            np.concatenate([across[0], down[0]]),
            np.concatenate([across[1], down[1]]),
            np.repeat([False, True], [across[0].size, down[0].size]),
        )

    def pairs_touching(self, anchors: np.ndarray) -> Pairs:
        """Every mergeable pair in which any of `anchors` takes part, each listed once."""
        involved = np.zeros(self.tok.size, bool)
        involved[anchors] = True
        parts = []
        for vertical in (False, True):
            ok, partner = self.partners_after(anchors, vertical)
            parts.append((anchors[ok], partner[ok], vertical))
            ok, other = self.partners_before(anchors, vertical)
            ok &= ~involved[other]
            parts.append((other[ok], anchors[ok], vertical))
        return Pairs(
            np.concatenate([left for left, _, _ in parts]),
            np.concatenate([right for _, right, _ in parts]),
            np.concatenate([np.full(left.size, vertical) for left, _, vertical in parts]),
        )

    def right_member(self, left: np.ndarray, left_ids: np.ndarray, vertical: np.ndarray) -> np.ndarray:
        """Anchor of the second token of pairs whose first token is `left_ids` at `left`."""
        return left + np.where(vertical, self.table.height[left_ids] * self.w, self.table.width[left_ids])

    def members(self, pair_ids: np.ndarray) -> Pairs:
        """The live pairs with these ids."""
        left, vertical = pair_ids >> 1, (pair_ids & 1).astype(bool)
        return Pairs(left, self.right_member(left, self.tok[left], vertical), vertical)

    def keys(self, pairs: Pairs, stride: int) -> np.ndarray:
        """Integer key of each pair's (left id, right id, direction)."""
        return (self.tok[pairs.left] * stride + self.tok[pairs.right]) * 2 + pairs.vertical

    def merge(self, left: np.ndarray, right: np.ndarray, new_ids: np.ndarray) -> None:
        """Replace each (left, right) token pair by `new_ids`, anchored at `left`."""
        right_ids = self.tok[right]
        area = self.table.area[right_ids]
        cells = np.repeat(right, area) + self.table.cell_offset[self.table.cells(right_ids)]
        self.owner[cells] = np.repeat(left, area)
        self.tok[right] = -1
        self.tok[left] = new_ids

    def tokens(self) -> list[np.ndarray]:
        """Token ids of each grid in raster order of their anchors."""
        anchors = np.flatnonzero(self.tok >= 0)
        counts = np.bincount(anchors // (self.h * self.w), minlength=self.tok.size // (self.h * self.w))
        return split_by_counts(self.tok[anchors], counts)


def first_of_runs(left: np.ndarray, right: np.ndarray, n_cells: int) -> np.ndarray:
    """Which occurrences to apply when a pair (a, a) forms runs, greedily in raster order.

    Each left anchor must occur once. An occurrence is dropped when its first token is
    the second token of a kept occurrence; the first occurrence of a run (no
    predecessor) is always kept, so a Jacobi sweep settles one run element per pass.
    """
    index_of_left = np.full(n_cells, -1, np.int64)
    index_of_left[left] = np.arange(len(left))
    succ = index_of_left[right]
    pred = np.flatnonzero(succ >= 0)
    linked = succ[pred]
    keep = np.ones(len(left), bool)
    while linked.size:
        update = ~keep[pred]
        if np.array_equal(update, keep[linked]):
            break
        keep[linked] = update
    return keep


class _PairCounter:
    """Incremental pair counts for training.

    Every live pair points at a slot, one slot per distinct (left id, right id,
    direction). A new pair always involves a token created in the current round, so a
    key never reappears once its pairs are gone: slots are only appended, and a slot's
    count only falls after its birth.
    """

    def __init__(self, state: GridState, stride: int, max_area: int) -> None:
        self.state, self.stride, self.max_area = state, stride, max_area
        self.slot = np.full(2 * state.tok.size, -1, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.keys = np.zeros(0, np.int64)
        self.add(state.initial_pairs())

    def add(self, pairs: Pairs) -> None:
        """Count newly formed pairs (all of them have keys never seen before)."""
        area = self.state.table.area
        pairs = pairs.take(area[self.state.tok[pairs.left]] + area[self.state.tok[pairs.right]] <= self.max_area)
        unique, inverse, counts = group(self.state.keys(pairs, self.stride))
        self.slot[pairs.ids()] = inverse + len(self.keys)
        self.keys = np.concatenate([self.keys, unique])
        self.counts = np.concatenate([self.counts, counts])

    def forget(self, anchors: np.ndarray) -> None:
        """Uncount every pair that involves a token about to be consumed."""
        pair_ids = self.state.pairs_touching(anchors).ids()
        slots = self.slot[pair_ids]
        live = slots >= 0
        self.counts -= np.bincount(slots[live], minlength=len(self.counts))
        self.slot[pair_ids[live]] = -1

    def choose(self, budget: int, batch_ratio: float) -> np.ndarray:
        """Most frequent slots with pairwise disjoint token types, at most `budget`.

        Only pairs within `batch_ratio` of the top count qualify, so one round stays
        close to what one-merge-at-a-time greedy BPE would pick.
        """
        if not self.counts.size or self.counts.max() < MIN_PAIR_COUNT:
            return np.zeros(0, np.int64)
        floor = max(MIN_PAIR_COUNT, math.ceil(batch_ratio * int(self.counts.max())))
        candidates = np.flatnonzero(self.counts >= floor)
        candidates = candidates[np.lexsort((self.keys[candidates], -self.counts[candidates]))]
        pair = self.keys[candidates] >> 1
        used: set[int] = set()
        chosen: list[int] = []
        for slot, a, b in zip(candidates.tolist(), (pair // self.stride).tolist(), (pair % self.stride).tolist()):
            if a in used or b in used:
                continue
            used.update((a, b))
            chosen.append(slot)
            if len(chosen) == budget:
                break
        return np.asarray(chosen, np.int64)

    def occurrences(self, slots: np.ndarray) -> np.ndarray:
        """Sorted pair ids of all live occurrences of `slots`."""
        wanted = np.zeros(len(self.counts) + 1, bool)
        wanted[slots + 1] = True
        return np.flatnonzero(wanted[self.slot + 1])


@dataclass(frozen=True)
class GridMerges:
    """Learned merges in order: id `K + i` joins `left[i]` and `right[i]`.

    `vertical[i]` says whether `right[i]` sits below (else right of) `left[i]`;
    `rounds[i]` is the training round, merges of one round are applied together.
    """

    codebook_size: int
    left: np.ndarray
    right: np.ndarray
    vertical: np.ndarray
    rounds: np.ndarray

    @property
    def vocab_size(self) -> int:
        """Codes plus merged tokens."""
        return self.codebook_size + len(self.left)

    def shape_table(self, grid_width: int) -> ShapeTable:
        """Geometry of every id, for grids of the given width."""
        table = ShapeTable(self.codebook_size, grid_width)
        for r in np.unique(self.rounds):
            sel = self.rounds == r
            table.extend(self.left[sel], self.right[sel], self.vertical[sel])
        return table

    def to_json(self) -> dict:
        """Plain-JSON form, the backend file of a saved 2D codec."""
        return {
            "codebook_size": self.codebook_size,
            "merges": np.stack([self.left, self.right, self.vertical.astype(np.int64), self.rounds], 1).tolist(),
        }

    @classmethod
    def from_json(cls, data: dict) -> GridMerges:
        """Inverse of `to_json`, with sanity checks so a corrupt file fails loudly."""
        try:
            k = int(data["codebook_size"])
            rows = np.asarray(data["merges"], np.int64).reshape(-1, 4)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"grid merges are malformed: {err}") from err
        left, right, vertical, rounds = rows.T
        if (np.diff(rounds) < 0).any() or (len(rounds) and rounds[0] < 0):
            raise ValueError("grid merges are malformed: rounds must start at 0 or more and never decrease")
        round_start = k + np.searchsorted(rounds, rounds)
        if ((left < 0) | (left >= round_start) | (right < 0) | (right >= round_start)).any():
            raise ValueError("grid merges are malformed: a merge may only join tokens from earlier rounds")
        return cls(k, left, right, vertical.astype(bool), rounds)


def learn_merges(
    grids: np.ndarray, codebook_size: int, max_merges: int, max_area: int, batch_ratio: float
) -> GridMerges:
    """Greedy 2D BPE in rounds of type-disjoint merges (see module docstring)."""
    table = ShapeTable(codebook_size, grids.shape[2])
    state = GridState(grids, table)
    counter = _PairCounter(state, codebook_size + max_merges, max_area)
    rounds: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    learned = 0
    while learned < max_merges:
        slots = counter.choose(max_merges - learned, batch_ratio)
        if not slots.size:
            break
        rounds.append(_apply_round(state, counter, slots))
        learned += len(slots)
    sizes = [len(a) for a, _, _ in rounds]
    return GridMerges(
        codebook_size,
        np.concatenate([a for a, _, _ in rounds] + [np.zeros(0, np.int64)]),
        np.concatenate([b for _, b, _ in rounds] + [np.zeros(0, np.int64)]),
        np.concatenate([v for _, _, v in rounds] + [np.zeros(0, bool)]),
        np.repeat(np.arange(len(sizes)), sizes),
    )


def _apply_round(
    state: GridState, counter: _PairCounter, slots: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge all occurrences of the chosen pairs at once; return (left id, right id, vertical).

    The new ids follow the order of `slots`.
    """
    table = state.table
    pair = counter.keys[slots]
    first, second = (pair >> 1) // counter.stride, (pair >> 1) % counter.stride
    vertical = (pair & 1).astype(bool)
    new_id = np.zeros(len(counter.counts), np.int64)
    new_id[slots] = table.size + np.arange(len(slots))
    pair_ids = counter.occurrences(slots)
    found = state.members(pair_ids)
    keep = first_of_runs(found.left, found.right, state.tok.size)
    left, right = found.left[keep], found.right[keep]
    ids = new_id[counter.slot[pair_ids[keep]]]
    counter.forget(np.concatenate([left, right]))
    table.extend(first, second, vertical)
    state.merge(left, right, ids)
    counter.add(state.pairs_touching(left))
    return first, second, vertical


class PairLookup:
    """Vectorized open-addressing hash from pair key to merge rank (-1 when absent).

    A dense (V*V*2) table would be too big for large vocabularies and a binary search
    too slow; a table 4x the number of merges stays cache-resident and almost every
    key is settled by its first probe.
    """

    def __init__(self, keys: np.ndarray) -> None:
        bits = max(4, math.ceil(math.log2(max(1, len(keys)) * 4)))
        self._shift = 64 - bits
        self._mask = (1 << bits) - 1
        self._keys = np.full(1 << bits, -1, np.int64)
        self._ranks = np.full(1 << bits, -1, np.int64)
        pending = np.arange(len(keys))
        slot = self._hash(keys)
        while pending.size:
            candidates = pending[self._keys[slot[pending]] == -1]
            _, first = np.unique(slot[candidates], return_index=True)
            winners = candidates[first]
            self._keys[slot[winners]] = keys[winners]
            self._ranks[slot[winners]] = winners
            pending = np.setdiff1d(pending, winners, assume_unique=True)
            slot[pending] = (slot[pending] + 1) & self._mask

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        """Top bits of a multiplicative hash (int64 products wrap, which is intended)."""
        return ((keys * _HASH_MULTIPLIER) >> self._shift) & self._mask

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """Merge rank of each key, -1 where the pair was never merged."""
        slot = self._hash(keys)
        stored = self._keys[slot]
        out = np.where(stored == keys, self._ranks[slot], -1)
        index = np.flatnonzero((stored != keys) & (stored != -1))
        slot = (slot[index] + 1) & self._mask
        while index.size:
            stored = self._keys[slot]
            hit = stored == keys[index]
            out[index[hit]] = self._ranks[slot[hit]]
            more = ~hit & (stored != -1)
            index, slot = index[more], (slot[more] + 1) & self._mask
        return out


class _RoundQueue:
    """Pending pairs bucketed by the training round of the merge that would join them."""

    def __init__(self, n_rounds: int) -> None:
        self._buckets: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_rounds)]

    def push(self, pair_ids: np.ndarray, ranks: np.ndarray, rounds: np.ndarray) -> None:
        """File each pair under its round."""
        if rounds.size and rounds.min() == rounds.max():
            self._buckets[rounds[0]].append((pair_ids, ranks))
            return
        order = np.argsort(rounds, kind="stable")
        rounds = rounds[order]
        cuts = np.flatnonzero(np.diff(rounds)) + 1
        for start, stop in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])):
            if stop > start:
                self._buckets[rounds[start]].append((pair_ids[order[start:stop]], ranks[order[start:stop]]))

    def pop(self, round_index: int) -> tuple[np.ndarray, np.ndarray]:
        """All pairs of a round, in no particular order (applying a round is order-free)."""
        bucket = self._buckets[round_index]
        self._buckets[round_index] = []
        if not bucket:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate([p for p, _ in bucket]), np.concatenate([r for _, r in bucket])


class GridEngine:
    """Learned 2D merges for grids of one shape: encode, decode, save."""

    filename = "grid_merges.json"

    def __init__(self, merges: GridMerges, grid_shape: tuple[int, int]) -> None:
        self.merges = merges
        self.h, self.w = grid_shape
        self.table = merges.shape_table(self.w)
        self._stride = merges.vocab_size
        self._lookup = PairLookup((merges.left * self._stride + merges.right) * 2 + merges.vertical)
        self._n_rounds = int(merges.rounds.max()) + 1 if len(merges.rounds) else 0

    @property
    def codebook_size(self) -> int:
        """K."""
        return self.merges.codebook_size

    @property
    def vocab_size(self) -> int:
        """Codes plus merged tokens."""
        return self.merges.vocab_size

    @property
    def token_sizes(self) -> np.ndarray:
        """Number of codes (cells) in each token id."""
        return self.table.area

    @classmethod
    def train(
        cls, grids: list[np.ndarray], codebook_size: int, vocab_size: int, max_area: int, batch_ratio: float
    ) -> GridEngine:
        """Learn up to `vocab_size - codebook_size` merges from same-shape grids."""
        shape = grids[0].shape
        stacked = cls._stack(grids, shape, codebook_size, "grid")
        merges = learn_merges(stacked, codebook_size, vocab_size - codebook_size, max_area, batch_ratio)
        return cls(merges, shape)

    @staticmethod
    def _stack(
        grids: list[np.ndarray], shape: tuple[int, ...], codebook_size: int, item_name: str | None
    ) -> np.ndarray:
        """Validate shapes and code range (errors name the grid and cell), then stack."""
        for i, grid in enumerate(grids):
            if grid.shape != shape:
                which = f"grid {i}" if item_name is not None else "grid"
                raise ValueError(f"{which} has shape {tuple(grid.shape)}, expected {tuple(shape)}")
        flat = concat_checked(grids, codebook_size, ("row", "col"), "code", item_name)
        return flat.reshape(len(grids), *shape)

    def encode(self, grids: list[np.ndarray], item_name: str | None = "grid") -> list[np.ndarray]:
        """Token ids per grid, in raster order of token anchors; chunks run on every core."""
        if not grids:
            return []
        stacked = self._stack(grids, (self.h, self.w), self.codebook_size, item_name)
        return map_chunks(lambda start, stop: self._apply(stacked[start:stop]), len(stacked))

    def decode(self, token_lists: list[np.ndarray], item_name: str | None = "grid") -> list[np.ndarray]:
        """Grids rebuilt from token ids; bad ids or tilings raise ValueError naming the position."""
        concat_checked(token_lists, self.vocab_size, ("position",), "token id", item_name)
        return map_chunks(
            lambda start, stop: self._rebuild(token_lists[start:stop], start, item_name), len(token_lists)
        )

    def to_bytes(self) -> bytes:
        """The merges as JSON."""
        return json.dumps(self.merges.to_json()).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, grid_shape: tuple[int, int]) -> GridEngine:
        """Rebuild from saved merges."""
        return cls(GridMerges.from_json(json.loads(data)), grid_shape)

    def _queue_pairs(self, state: GridState, queue: _RoundQueue, pairs: Pairs) -> None:
        """File the pairs that some learned merge joins under that merge's round."""
        ranks = self._lookup(state.keys(pairs, self._stride))
        known = ranks >= 0
        queue.push(pairs.ids()[known], ranks[known], self.merges.rounds[ranks[known]])

    def _apply(self, grids: np.ndarray) -> list[np.ndarray]:
        """Replay the training rounds on validated [N, h, w] grids."""
        state = GridState(grids, self.table)
        queue = _RoundQueue(self._n_rounds)
        self._queue_pairs(state, queue, state.initial_pairs())
        k = self.merges.codebook_size
        for round_index in range(self._n_rounds):
            pair_ids, ranks = queue.pop(round_index)
            if not pair_ids.size:
                continue
            left, vertical = pair_ids >> 1, (pair_ids & 1).astype(bool)
            first = self.merges.left[ranks]
            live = state.tok[left] == first
            right = state.right_member(left, first, vertical)
            live[live] = state.tok[right[live]] == self.merges.right[ranks[live]]
            left, right, ranks = left[live], right[live], ranks[live]
            keep = first_of_runs(left, right, state.tok.size)
            left, right, ranks = left[keep], right[keep], ranks[keep]
            state.merge(left, right, k + ranks)
            self._queue_pairs(state, queue, state.pairs_touching(left))
        return state.tokens()

    def _rebuild(self, token_lists: list[np.ndarray], first_index: int, item_name: str | None) -> list[np.ndarray]:
        """Decode in-range token lists; `first_index` is their offset in the caller's batch."""
        if not token_lists:
            return []
        lengths = np.array([len(t) for t in token_lists], np.int64)
        padded = np.zeros((len(lengths), int(lengths.max())), np.int64)
        filled = np.arange(padded.shape[1]) < lengths[:, None]
        ids = np.concatenate(token_lists)
        padded[filled] = ids
        rows, cols = self._place(padded, lengths, first_index, item_name)
        anchors = (np.nonzero(filled)[0] * self.h + rows[filled]) * self.w + cols[filled]
        return list(self._paint(ids, anchors, len(lengths)))

    def _place(
        self, padded: np.ndarray, lengths: np.ndarray, first_index: int, item_name: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Anchor (row, col) of every token: the leftmost lowest column top of the skyline.

        Steps over token positions, vectorized across grids; grids are visited longest
        first so the still-active ones are always a leading slice (views, no copies).
        Raises ValueError naming the grid and position of a token that overlaps or
        spills out, or of a grid left incomplete.
        """
        order = np.argsort(-lengths, kind="stable")
        padded, by_length = padded[order], lengths[order]
        n, steps = padded.shape
        h, w = self.h, self.w
        heights, widths = self.table.height[padded], self.table.width[padded]
        skyline = np.zeros((n, w), np.int64)
        rows = np.zeros((n, steps), np.int64)
        cols = np.zeros((n, steps), np.int64)
        column = np.arange(w)
        active = n
        for t in range(steps):
            while by_length[active - 1] <= t:
                active -= 1
            sky = skyline[:active]
            c = sky.argmin(1)
            r = np.take_along_axis(sky, c[:, None], 1)[:, 0]
            th, tw = heights[:active, t], widths[:active, t]
            span = (column >= c[:, None]) & (column < (c + tw)[:, None])
            fits = (c + tw <= w) & (r + th <= h) & ~(span & (sky != r[:, None])).any(1)
            if not fits.all():
                g = int(order[:active][~fits].min())
                bad = int(np.flatnonzero(order == g)[0])
                raise ValueError(
                    f"token {int(padded[bad, t])} at {_item(item_name, first_index + g)}position {t} "
                    f"does not fit the {h}x{w} grid "
                    f"(shape {int(th[bad])}x{int(tw[bad])} at row {int(r[bad])}, col {int(c[bad])})"
                )
            np.copyto(sky, (r + th)[:, None], where=span)
            rows[:active, t], cols[:active, t] = r, c
        short = (skyline != h).any(1)
        if short.any():
            g = int(order[short].min())
            raise ValueError(
                f"{_item(item_name, first_index + g)}the {int(lengths[g])} tokens leave part of the {h}x{w} grid empty "
                f"(the sequence ends too early)"
            )
        unsorted = np.empty_like(order)
        unsorted[order] = np.arange(n)
        return rows[unsorted], cols[unsorted]

    def _paint(self, ids: np.ndarray, anchors: np.ndarray, n: int) -> np.ndarray:
        """Write every token's codes at its anchor: [n, h, w] grids."""
        cells = self.table.cells(ids)
        out = np.empty(n * self.h * self.w, np.int64)
        out[np.repeat(anchors, self.table.area[ids]) + self.table.cell_offset[cells]] = self.table.cell_code[cells]
        return out.reshape(n, self.h, self.w)


def _item(item_name: str | None, index: int) -> str:
    """'grid 3, ' prefix for batch error messages, nothing for a lone item."""
    return "" if item_name is None else f"{item_name} {index}, "
