"""The 2D grid engine: training on arbitrary data, hashing, run resolution, skyline decode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bpe_image import BPECodec
from bpe_image._grid import PairLookup, first_of_runs

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def grid_datasets(draw) -> np.ndarray:
    """Small datasets of same-shape grids over a tiny alphabet, including 1xN and Nx1."""
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    n = draw(st.integers(1, 12))
    return draw(hnp.arrays(np.int64, (n, h, w), elements=st.integers(0, 2)))


@pytest.mark.filterwarnings("ignore:learned only")
@SETTINGS
@given(data=grid_datasets(), ratio=st.sampled_from([0.3, 1.0]), max_area=st.sampled_from([2, 6, 25]))
def test_training_on_arbitrary_grids_round_trips(data, ratio, max_area):
    codec = BPECodec.train(
        data, codebook_size=3, vocab_size=40, mode="2d", batch_ratio=ratio, max_token_length=max_area
    )
    assert codec.token_sizes().max() <= max(max_area, 1)
    ids = codec.encode_batch(data)
    for grid, tokens, back in zip(data, ids, codec.decode_batch(ids)):
        assert np.array_equal(back, grid)
        assert codec.token_sizes()[tokens].sum() == grid.size
    assert sum(map(len, ids)) <= data.size


@pytest.mark.filterwarnings("ignore:learned only")
def test_encoding_the_training_data_reaches_the_training_compression():
    """Encoding replays the training rounds, so a uniform dataset collapses completely."""
    data = np.zeros((10, 4, 4), np.int64)
    codec = BPECodec.train(data, codebook_size=1, vocab_size=20, mode="2d")
    assert [len(t) for t in codec.encode_batch(data)] == [1] * 10


@SETTINGS
@given(
    keys=st.lists(st.integers(0, 2**40), max_size=300, unique=True),
    probes=st.lists(st.integers(0, 2**40), max_size=300),
)
def test_pair_lookup_matches_a_dict(keys, probes):
    lookup = PairLookup(np.array(keys, np.int64))
    expected = {k: i for i, k in enumerate(keys)}
    query = np.array(keys + probes, np.int64)
    assert lookup(query).tolist() == [expected.get(k, -1) for k in query.tolist()]


def test_runs_keep_every_other_pair_from_the_start():
    # one row of five equal tokens at cells 0..4: pairs (0,1) (1,2) (2,3) (3,4), plus a lone pair (7,8)
    left, right = np.array([0, 1, 2, 3, 7]), np.array([1, 2, 3, 4, 8])
    assert first_of_runs(left, right, 10).tolist() == [True, False, True, False, True]
    # order of the occurrences must not matter
    order = np.array([4, 2, 0, 3, 1])
    assert first_of_runs(left[order], right[order], 10).tolist() == [True, True, True, False, False]


def test_large_batches_run_in_parallel_chunks_and_name_global_positions():
    rng = np.random.default_rng(5)
    data = rng.integers(0, 3, size=(1500, 3, 4))
    codec = BPECodec.train(data, codebook_size=3, vocab_size=30, mode="2d")
    ids = codec.encode_batch(data)
    assert all(np.array_equal(a, codec.encode(x)) for a, x in zip(ids[::97], data[::97]))
    assert np.array_equal(np.stack(codec.decode_batch(ids)), data)
    broken = list(ids)
    broken[1234] = broken[1234][:-1]
    with pytest.raises(ValueError, match="grid 1234, the"):
        codec.decode_batch(broken)
    bad = data.copy()
    bad[1400, 2, 1] = 3
    with pytest.raises(ValueError, match="grid 1400, row 2, col 1"):
        codec.encode_batch(bad)
