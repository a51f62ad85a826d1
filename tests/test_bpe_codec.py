"""BPECodec: lossless round trips, 1d prefix alignment, 2D grids, id layout, compression."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bpe_image import BPECodec, BPEStats

K = 32
SEEN = 24  # training data only uses codes < SEEN; codes SEEN..K-1 are never seen
GRID = (6, 5)  # non-square on purpose, to catch h/w mix-ups
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def structured_sequences(n: int, length: int, seed: int) -> np.ndarray:
    """Runs of repeated codes with a little noise: BPE has something to learn."""
    rng = np.random.default_rng(seed)
    runs = rng.integers(0, SEEN, size=(n, length // 4 + 1)).repeat(4, axis=1)[:, :length]
    noise = rng.random(runs.shape) < 0.1
    runs[noise] = rng.integers(0, SEEN, size=int(noise.sum()))
    return runs


def structured_grids(n: int, seed: int) -> np.ndarray:
    """Blocky grids (2x2 blocks, cropped to GRID) with noise."""
    rng = np.random.default_rng(seed)
    h, w = GRID
    blocks = rng.integers(0, SEEN, size=(n, h // 2 + 1, w // 2 + 1)).repeat(2, axis=1).repeat(2, axis=2)[:, :h, :w]
    noise = rng.random(blocks.shape) < 0.1
    blocks[noise] = rng.integers(0, SEEN, size=int(noise.sum()))
    return np.ascontiguousarray(blocks)


@pytest.fixture(scope="module")
def sequences() -> np.ndarray:
    return structured_sequences(300, 32, seed=0)


@pytest.fixture(scope="module")
def grids() -> np.ndarray:
    return structured_grids(300, seed=1)


@pytest.fixture(scope="module", params=["tokenizers", "sentencepiece"])
def codec_1d(request, sequences) -> BPECodec:
    return BPECodec.train(sequences, codebook_size=K, vocab_size=120, mode="1d", backend=request.param)


@pytest.fixture(scope="module", params=["tokenizers", "sentencepiece"])
def codec_flat(request, sequences) -> BPECodec:
    return BPECodec.train(sequences, codebook_size=K, vocab_size=120, mode="flat", backend=request.param)


@pytest.fixture(scope="module")
def codec_2d(grids) -> BPECodec:
    return BPECodec.train(grids, codebook_size=K, vocab_size=200, mode="2d")


@pytest.fixture(scope="module")
def codec_2d_deep() -> BPECodec:
    """Tiny alphabet and many merges: big, oddly shaped rectangles of every kind."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 3, size=(200, *GRID))
    return BPECodec.train(data, codebook_size=4, vocab_size=150, mode="2d", max_token_length=30)


code_lists = st.lists(st.integers(0, K - 1), min_size=0, max_size=70)
seen_code_lists = st.lists(st.sampled_from([0, 1, 2, 3, 5, 8]), min_size=1, max_size=70)


def grid_strategy(alphabet: list[int]) -> st.SearchStrategy[np.ndarray]:
    h, w = GRID
    return st.lists(st.sampled_from(alphabet), min_size=h * w, max_size=h * w).map(
        lambda cells: np.array(cells, np.int64).reshape(h, w)
    )


@SETTINGS
@given(codes=code_lists)
def test_1d_round_trip_any_codes(codec_1d, codes):
    x = np.array(codes, np.int64)
    assert np.array_equal(codec_1d.decode(codec_1d.encode(x)), x)


@SETTINGS
@given(codes=code_lists)
def test_flat_round_trip_any_codes(codec_flat, codes):
    x = np.array(codes, np.int64)
    assert np.array_equal(codec_flat.decode(codec_flat.encode(x)), x)


@SETTINGS
@given(codes=seen_code_lists)
def test_1d_round_trip_with_many_merges(codec_1d, codes):
    x = np.array(codes * 3, np.int64)
    assert np.array_equal(codec_1d.decode(codec_1d.encode(x)), x)


@SETTINGS
@given(codes=seen_code_lists)
def test_flat_round_trip_with_many_merges(codec_flat, codes):
    x = np.array(codes * 3, np.int64)
    assert np.array_equal(codec_flat.decode(codec_flat.encode(x)), x)


@SETTINGS
@given(grid=grid_strategy(list(range(K))))
def test_2d_round_trip_any_grid(codec_2d, grid):
    assert np.array_equal(codec_2d.decode(codec_2d.encode(grid)), grid)


@SETTINGS
@given(grid=grid_strategy([0, 1, 2, 3]))
def test_2d_round_trip_deep_merges(codec_2d_deep, grid):
    ids = codec_2d_deep.encode(grid)
    assert np.array_equal(codec_2d_deep.decode(ids), grid)
    assert codec_2d_deep.token_sizes()[ids].sum() == grid.size


def test_batches_round_trip_and_match_single(codec_1d, codec_flat, codec_2d, sequences, grids):
    for codec, data in ((codec_1d, sequences), (codec_flat, sequences), (codec_2d, grids)):
        ids = codec.encode_batch(data[:50])
        for x, single, back in zip(data[:50], ids, codec.decode_batch(ids)):
            assert np.array_equal(single, codec.encode(x))
            assert np.array_equal(back, x)


def test_variable_length_batches(codec_1d):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, K, size=n) for n in (0, 1, 2, 3, 17, 32, 64)]
    ids = codec_1d.encode_batch(seqs)
    assert len(ids[0]) == 0
    for x, back in zip(seqs, codec_1d.decode_batch(ids)):
        assert np.array_equal(back, x)


def test_deep_2d_codec_has_large_rectangles(codec_2d_deep):
    table = codec_2d_deep._engine.table
    tall_and_wide = (table.height > 1) & (table.width > 1)
    assert tall_and_wide.any()
    assert codec_2d_deep.token_sizes().max() > 4


def test_ids_below_k_are_single_codes_and_merged_ids_follow(codec_1d, codec_flat, codec_2d):
    for codec in (codec_1d, codec_flat, codec_2d):
        sizes = codec.token_sizes()
        assert (sizes[:K] == 1).all() and (sizes[K:] >= 2).all()
        assert len(sizes) == codec.vocab_size


def test_single_codes_encode_to_themselves(codec_1d, codec_flat):
    for codec in (codec_1d, codec_flat):
        for code in range(K):
            assert codec.encode(np.array([code])).tolist() == [code]


def test_2d_merges_equal_pairs_and_tokens_in_raster_order():
    grids = np.zeros((20, 1, 4), np.int64)
    codec = BPECodec.train(grids, codebook_size=2, vocab_size=4, mode="2d")
    assert codec.vocab_size == 4  # (0,0) then (00,00): equal pairs are merged
    assert codec.encode(np.array([[0, 0, 0, 0]])).tolist() == [3]
    # a run of three: greedy from the left, the odd one out is the last
    assert codec.encode(np.array([[0, 0, 0, 1]])).tolist() == [2, 0, 1]
    assert codec.encode(np.array([[1, 0, 0, 0]])).tolist() == [1, 2, 0]


def test_2d_vertical_merges_rebuild_columns():
    grids = np.tile(np.array([[1], [1], [0], [0]]), (30, 1, 3))  # rows of 1s over rows of 0s
    codec = BPECodec.train(grids, codebook_size=2, vocab_size=6, mode="2d", batch_ratio=1.0)
    x = grids[0]
    ids = codec.encode(x)
    assert len(ids) < x.size
    assert np.array_equal(codec.decode(ids), x)


def block_edges_of(length: int) -> list[int]:
    return [0] + [1 << i for i in range(length.bit_length()) if 1 << i < length] + [length]


@SETTINGS
@given(codes=st.lists(st.integers(0, K - 1), min_size=1, max_size=64))
def test_1d_truncation_at_every_block_edge_is_a_prefix(codec_1d, codes):
    x = np.array(codes, np.int64)
    ids = codec_1d.encode(x)
    for k in block_edges_of(len(x)):
        prefix = codec_1d.encode(x[:k])
        assert np.array_equal(ids[: len(prefix)], prefix)
        assert np.array_equal(codec_1d.truncate(ids, k), prefix)


def test_1d_prefix_alignment_on_training_like_data(codec_1d, sequences):
    for x in sequences[:40]:
        ids = codec_1d.encode(x)
        for k in block_edges_of(len(x)):
            assert np.array_equal(codec_1d.truncate(ids, k), codec_1d.encode(x[:k]))
            assert np.array_equal(codec_1d.decode(codec_1d.truncate(ids, k)), x[:k])


def test_custom_boundaries(sequences):
    codec = BPECodec.train(sequences, codebook_size=K, vocab_size=80, mode="1d", boundaries=[3, 10, 20])
    assert codec.boundaries == (3, 10, 20)
    for x in sequences[:30]:
        ids = codec.encode(x)
        for k in (0, 3, 10, 20, len(x)):
            assert np.array_equal(codec.truncate(ids, k), codec.encode(x[:k]))


def test_flat_merges_do_cross_block_edges(codec_flat, sequences):
    crossing = 0
    for x in sequences[:50]:
        ends = np.cumsum(codec_flat.token_sizes()[codec_flat.encode(x)])
        crossing += not set(block_edges_of(len(x))[1:]) <= set(ends.tolist())
    assert crossing > 0  # the 1d restriction is what keeps prefixes aligned


def test_truncate_rejects_a_cut_inside_a_token(codec_flat, codec_2d, sequences, grids):
    x = sequences[0]
    ids = codec_flat.encode(x)
    ends = set(np.cumsum(codec_flat.token_sizes()[ids]).tolist())
    inside = next(k for k in range(1, len(x)) if k not in ends)
    with pytest.raises(ValueError, match=f"truncate at {inside} codes"):
        codec_flat.truncate(ids, inside)
    with pytest.raises(ValueError, match="beyond|no token ends"):
        codec_flat.truncate(ids, len(x) + 1)
    with pytest.raises(ValueError, match="2d"):
        codec_2d.truncate(codec_2d.encode(grids[0]), 4)


def test_compression_ratio_above_one_on_structured_codes(codec_1d, codec_flat, codec_2d, sequences, grids):
    for codec, data in ((codec_1d, sequences), (codec_flat, sequences), (codec_2d, grids)):
        stats = codec.stats(data)
        assert isinstance(stats, BPEStats)
        assert stats.compression_ratio > 1.3
        assert stats.num_codes == data.size
        assert stats.mean_tokens_per_sequence == pytest.approx(stats.num_tokens / len(data))
        assert 0 < stats.vocab_usage <= 1
        assert stats.mean_codes_per_merged_token >= 2
        assert set(stats.as_dict()) >= {"compression_ratio", "mean_tokens_per_sequence", "vocab_usage"}


def test_2d_beats_flat_on_blocky_grids(codec_2d, grids):
    flat = BPECodec.train(grids.reshape(len(grids), -1), codebook_size=K, vocab_size=200, mode="flat")
    assert codec_2d.stats(grids).compression_ratio > flat.stats(grids.reshape(len(grids), -1)).compression_ratio


def test_torch_in_torch_out(codec_1d, codec_2d, sequences, grids):
    x = torch.as_tensor(sequences[0])
    ids = codec_1d.encode(x)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.long
    assert torch.equal(codec_1d.decode(ids), x.long())
    g = torch.as_tensor(grids[:3], dtype=torch.int32)
    batch = codec_2d.encode_batch(g)
    assert all(isinstance(b, torch.Tensor) for b in batch)
    assert torch.equal(torch.stack(codec_2d.decode_batch(batch)), g.long())
    assert isinstance(codec_1d.truncate(ids, 4), torch.Tensor)


def test_lists_accepted(codec_1d):
    assert np.array_equal(codec_1d.decode(codec_1d.encode([1, 2, 3])), [1, 2, 3])
