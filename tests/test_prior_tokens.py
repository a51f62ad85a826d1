"""Token datasets: caching keyed by the tokenizer and settings, token modes, and rejecting foreign tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flextok.errors import TokenizerMismatch, UserError
from flextok.fingerprint import fingerprint_model
from flextok.grid_autoencoder import GridAutoencoder
from flextok.schema import DataConfig, GridConfig, QuantizerConfig, SamplingConfig
from priors import DiscretePrior, PriorConfig, TokenDataset, build_token_dataset, generate_images

DATA = DataConfig(resolution=16, crops_per_photo=4, eval_crops_per_photo=2, eval_images=4)


def grid_tokenizer(bottleneck: str = "quantized", seed: int = 0) -> GridAutoencoder:
    torch.manual_seed(seed)
    fsq = QuantizerConfig(fsq_levels=[8, 5])  # 40 codes
    return GridAutoencoder(GridConfig(channels=16, bottleneck=bottleneck, quantizer=fsq), resolution=16)


class PrefixTokenizer(nn.Module):
    """A stand-in for FlexTok's API: 8 ordered tokens, prefixes by k, adaptive length by a PSNR target."""

    vocab_size, num_registers, token_set = 30, 8, False

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(7.0))
        self.calls: list[dict] = []

    def tokenize(self, images, k=None, target_psnr=None):
        self.calls.append({"k": k, "target_psnr": target_psnr})
        codes = (images.mean(1).flatten(1)[:, :8] * self.scale.detach()).long() % self.vocab_size
        if target_psnr is not None:  # "harder" images (larger first code) keep more tokens
            return [c[: 1 + int(c[0]) % 8] for c in codes]
        return [c[:k] for c in codes] if k else list(codes)


def test_cache_is_built_once_and_keyed_by_every_input(tmp_path):
    tokenizer = grid_tokenizer()
    prior = PriorConfig(tokenizer="tok")
    first = build_token_dataset(tokenizer, prior, DATA, "train", tmp_path, progress=False)
    assert len(first) == 6 * 4 and first.spec.max_length == 16 and not first.spec.variable_length
    assert set(first.labels.tolist()) == set(range(6)) and first.tokens.dtype == np.int32
    assert first.spec.vocab_size == 40 and first.spec.tokenizer_hash == fingerprint_model(tokenizer)

    tokenizer.tokenize = None  # a reused cache must not tokenize again
    again = build_token_dataset(tokenizer, prior, DATA, "train", tmp_path, progress=False)
    assert again.directory == first.directory and np.array_equal(again.tokens, first.tokens)

    flipped = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path, flips=True, progress=False)
    held_out = build_token_dataset(grid_tokenizer(), prior, DATA, "test", tmp_path, progress=False)
    other_data = build_token_dataset(grid_tokenizer(), prior, DataConfig(resolution=16, crops_per_photo=2), "train",
                                     tmp_path, progress=False)
    other_weights = build_token_dataset(grid_tokenizer(seed=1), prior, DATA, "train", tmp_path, progress=False)
    directories = {d.directory for d in (first, flipped, held_out, other_data, other_weights)}
    assert len(directories) == 5
    assert len(flipped) == 2 * len(first) and len(held_out) == 2 * 2 and len(other_data) == 6 * 2


def test_fingerprint_follows_the_weights(tmp_path):
    tokenizer = grid_tokenizer()
    first = fingerprint_model(tokenizer)
    assert fingerprint_model(tokenizer) == first  # cached
    tokenizer.save_pretrained(tmp_path / "tok")
    from flextok import load_model

    assert fingerprint_model(load_model(tmp_path / "tok")) == first  # a reloaded copy is the same tokenizer
    with torch.no_grad():
        next(tokenizer.parameters()).add_(1e-3)  # in place: the cache must notice
    assert fingerprint_model(tokenizer) != first


def test_tokens_from_another_tokenizer_are_rejected(tmp_path):
    ours, theirs = grid_tokenizer(seed=0), grid_tokenizer(seed=1)
    dataset = build_token_dataset(theirs, PriorConfig(), DATA, "test", tmp_path, progress=False)
    with pytest.raises(TokenizerMismatch, match="not from the requested tokenizer"):
        TokenDataset.load(dataset.directory, expected_tokenizer_hash=fingerprint_model(ours))
    TokenDataset.load(dataset.directory, expected_tokenizer_hash=fingerprint_model(theirs))


def test_batches_pad_variable_lengths_and_keep_labels(tmp_path):
    tokenizer = PrefixTokenizer()
    prior = PriorConfig(tokens="adaptive", target_psnr=25.0)
    dataset = build_token_dataset(tokenizer, prior, DATA, "train", tmp_path, progress=False)
    assert tokenizer.calls[0] == {"k": None, "target_psnr": 25.0}
    assert dataset.spec.variable_length and len(set(dataset.lengths.tolist())) > 1
    batch = dataset.batch([0, 1, 2, 3])
    assert batch["tokens"].shape == (4, int(dataset.lengths[:4].max())) and batch["tokens"].dtype == torch.long
    assert batch["lengths"].tolist() == dataset.lengths[:4].tolist()
    for row, n in enumerate(batch["lengths"].tolist()):
        assert batch["tokens"][row, :n].tolist() == dataset.sequence(row).tolist()
    assert batch["labels"].tolist() == dataset.labels[:4].tolist()

    prefix = build_token_dataset(tokenizer, PriorConfig(tokens="prefix", prefix_length=3), DATA, "train", tmp_path,
                                 progress=False)
    assert tokenizer.calls[-1] == {"k": 3, "target_psnr": None} and set(prefix.lengths.tolist()) == {3}
    assert not prefix.spec.variable_length


def test_kl_tokens_need_the_flow_prior(tmp_path):
    kl = grid_tokenizer("kl")
    with pytest.raises(UserError, match="prior.kind"):
        build_token_dataset(kl, PriorConfig(kind="discrete"), DATA, "test", tmp_path, progress=False)
    latents = build_token_dataset(kl, PriorConfig(kind="flow"), DATA, "test", tmp_path, progress=False)
    assert latents.spec.continuous and latents.spec.token_dim == 4
    assert latents.batch([0, 1])["tokens"].shape == (2, 16, 4)
    with pytest.raises(UserError, match="prefixes"):
        build_token_dataset(grid_tokenizer(), PriorConfig(tokens="prefix", prefix_length=2), DATA, "test",
                            tmp_path, progress=False)


def test_bpe_tokens_round_trip_and_samples_decode(tmp_path):
    from bpe_image import BPECodec

    tokenizer = grid_tokenizer()
    codes = build_token_dataset(tokenizer, PriorConfig(), DATA, "train", tmp_path, progress=False)
    codec = BPECodec.train(codes.tokens.reshape(-1, 16), codebook_size=40, vocab_size=56, mode="flat")
    codec.save_pretrained(tmp_path / "bpe")
    prior_cfg = PriorConfig(tokens="bpe", bpe=str(tmp_path / "bpe"), dim=32, depth=1, heads=2)
    dataset = build_token_dataset(tokenizer, prior_cfg, DATA, "train", tmp_path, progress=False)
    assert dataset.spec.variable_length and dataset.spec.vocab_size == codec.vocab_size
    for i in range(len(dataset)):
        assert np.array_equal(codec.decode(dataset.sequence(i)), codes.sequence(i))
    prior = DiscretePrior(prior_cfg, codec.vocab_size, dataset.spec.max_length, variable_length=True,
                          tokenizer_hash=dataset.spec.tokenizer_hash).eval()
    # every sample spells 16 codes
    images = generate_images(prior, tokenizer, num_samples=4, sampling=SamplingConfig(temperature=2.0))
    assert images.shape == (4, 3, 16, 16)


def test_ranks_tokenize_their_own_shards_and_rank_0_merges_them(tmp_path):
    """Two ranks (threads here; processes in the launcher tests) each tokenize every other shard; the
    merged cache equals a one-rank build, image for image, flips and labels included."""
    import threading

    prior = PriorConfig(tokenizer="tok", cache_shard_size=5)  # 24 images -> 5 shards
    single = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "one", flips=True,
                                 progress=False)
    tokenizers = [grid_tokenizer(), grid_tokenizer()]
    seen = [[], []]
    for rank, tokenizer in enumerate(tokenizers):
        tokenize = tokenizer.tokenize
        tokenizer.tokenize = lambda images, _t=tokenize, _r=rank: seen[_r].append(len(images)) or _t(images)
    results: list = [None, None]

    def build(rank: int) -> None:
        results[rank] = build_token_dataset(tokenizers[rank], prior, DATA, "train", tmp_path / "two", flips=True,
                                            progress=False, rank=rank, world_size=2)

    threads = [threading.Thread(target=build, args=(r,)) for r in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results[0].directory == results[1].directory
    assert sum(seen[0]) == 2 * 14 and sum(seen[1]) == 2 * 10  # shards 0, 2, 4 vs 1, 3 (and their flips)
    for merged in results:
        assert np.array_equal(merged.tokens, single.tokens) and np.array_equal(merged.labels, single.labels)
    assert not list((tmp_path / "two").glob("*.parts"))  # shards are removed once merged


def test_killed_build_resumes_at_shard_granularity(tmp_path, monkeypatch):
    import priors.token_dataset as token_dataset

    prior = PriorConfig(tokenizer="tok", cache_shard_size=4, tokenize_batch_size=4)  # 24 images -> 6 shards
    clean = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "clean", progress=False)
    real, calls, killed = token_dataset._tokenize, [], []

    def dies_at_third_batch(*args):
        calls.append(1)
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise SystemExit("killed")  # stands in for a SIGKILL: nothing after this point runs
        return real(*args)

    monkeypatch.setattr(token_dataset, "_tokenize", dies_at_third_batch)
    with pytest.raises(SystemExit):
        build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "killed", progress=False)
    assert len(list((tmp_path / "killed").glob("*.parts/*.npz"))) == 2
    calls.clear()
    resumed = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "killed", progress=False)
    assert len(calls) == 4  # only the four shards that were not on disk
    assert np.array_equal(resumed.tokens, clean.tokens) and np.array_equal(resumed.labels, clean.labels)
