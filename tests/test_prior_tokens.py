"""Token datasets: caching keyed by the tokenizer and settings, token modes, and rejecting foreign tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from base.errors import TokenizerMismatch, UserError
from base.fingerprint import fingerprint_model
from base.schema import DataConfig, SamplingConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig, QuantizerConfig
from priors import (
    DiscretePrior,
    PriorConfig,
    TokenDataset,
    build_token_dataset,
    generate_images,
)

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
    from base.hub import load_model

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
    real, calls, killed = token_dataset.tokenize_for_prior, [], []

    def dies_at_third_batch(*args):
        calls.append(1)
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise SystemExit("killed")  # stands in for a SIGKILL: nothing after this point runs
        return real(*args)

    monkeypatch.setattr(token_dataset, "tokenize_for_prior", dies_at_third_batch)
    with pytest.raises(SystemExit):
        build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "killed", progress=False)
    assert len(list((tmp_path / "killed").glob("*.parts/*/*.npz"))) == 2
    calls.clear()
    resumed = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "killed", progress=False)
    assert len(calls) == 4  # only the four shards that were not on disk
    assert np.array_equal(resumed.tokens, clean.tokens) and np.array_equal(resumed.labels, clean.labels)


def _killed_after_two_shards(monkeypatch, prior: PriorConfig, root) -> list:
    """A build of 24 images that dies (as a SIGKILL would) in its third batch: two shards stay on disk.
    Returns the list every later `tokenize_for_prior` call appends to."""
    import priors.token_dataset as token_dataset

    real, calls = token_dataset.tokenize_for_prior, []

    def dies_at_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise SystemExit("killed")
        return real(*args)

    monkeypatch.setattr(token_dataset, "tokenize_for_prior", dies_at_third_batch)
    with pytest.raises(SystemExit):
        build_token_dataset(grid_tokenizer(), prior, DATA, "train", root, progress=False)
    assert len(list(root.glob("*.parts/*/*.npz"))) == 2
    monkeypatch.setattr(token_dataset, "tokenize_for_prior", lambda *args: calls.append(1) or real(*args))
    calls.clear()
    return calls


def test_a_resume_with_another_shard_size_keeps_every_image(tmp_path, monkeypatch):
    """The reproduction of issue #24: killed after 2 shards of 4 images, resumed with shards of 8. The
    old shards cover other image ranges, so none is mixed in: all 24 images and all 6 classes arrive."""
    clean = build_token_dataset(grid_tokenizer(), PriorConfig(tokenizer="tok"), DATA, "train", tmp_path / "clean",
                                progress=False)
    small = PriorConfig(tokenizer="tok", cache_shard_size=4, tokenize_batch_size=4)
    calls = _killed_after_two_shards(monkeypatch, small, tmp_path / "killed")
    large = PriorConfig(tokenizer="tok", cache_shard_size=8, tokenize_batch_size=4)
    resumed = build_token_dataset(grid_tokenizer(), large, DATA, "train", tmp_path / "killed", progress=False)
    assert len(calls) == 6  # every image again: shards of 4 are no part of a build with shards of 8
    assert len(resumed) == 24 and set(resumed.labels.tolist()) == set(range(6))
    assert np.array_equal(resumed.tokens, clean.tokens) and np.array_equal(resumed.labels, clean.labels)
    assert resumed.meta["build"]["shard_size"] == 8 and resumed.meta["images"] == 24
    assert not list((tmp_path / "killed").glob("*.parts"))  # both shard folders are removed after the merge


def test_a_damaged_shard_is_tokenized_again_before_the_merge(tmp_path, monkeypatch, capsys):
    prior = PriorConfig(tokenizer="tok", cache_shard_size=4, tokenize_batch_size=4)
    clean = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "clean", progress=False)
    calls = _killed_after_two_shards(monkeypatch, prior, tmp_path / "killed")
    shard = sorted((tmp_path / "killed").glob("*.parts/*/000001.npz"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # outside damage: a truncated file
    resumed = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "killed", progress=False)
    assert len(calls) == 5  # the four missing shards, then the damaged one
    assert "redoing 1 shard(s)" in capsys.readouterr().out
    assert np.array_equal(resumed.tokens, clean.tokens) and np.array_equal(resumed.labels, clean.labels)


@pytest.mark.parametrize("damage", ["short labels", "truncated tokens", "short meta count"])
def test_a_cache_that_fails_verification_is_rebuilt_with_a_notice(tmp_path, capsys, damage):
    import json

    prior = PriorConfig(tokenizer="tok")
    clean = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path, flips=True, progress=False)
    assert clean.problem() is None and len(clean) == 48
    directory = clean.directory
    if damage == "short labels":
        np.save(directory / "labels.npy", clean.labels[:40])
    elif damage == "truncated tokens":
        path = directory / "tokens.npy"
        path.write_bytes(path.read_bytes()[:-64])
    else:  # a cache whose own record agrees with its short arrays, but not with the images it claims
        meta = json.loads((directory / "meta.json").read_text())
        meta["count"] = 40
        (directory / "meta.json").write_text(json.dumps(meta))
    del clean
    capsys.readouterr()
    rebuilt = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path, flips=True, progress=False)
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith(f"token cache {directory}:") and "rebuilding" in notice[0]
    again = build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path / "fresh", flips=True,
                                progress=False)
    assert rebuilt.directory == directory and rebuilt.problem() is None and len(rebuilt) == 48
    assert np.array_equal(rebuilt.tokens, again.tokens) and np.array_equal(rebuilt.labels, again.labels)
    assert capsys.readouterr().out == ""  # a verified cache is reused silently


def test_a_rank_waiting_for_the_merged_cache_times_out_with_one_line(tmp_path):
    """Rank 1 of 2 tokenizes its shard, then waits for rank 0's merge, which never comes."""
    from base.distributed import WaitTimeout

    prior = PriorConfig(tokenizer="tok", cache_shard_size=16)
    with pytest.raises(WaitTimeout) as err:
        build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path, progress=False, rank=1,
                            world_size=2, wait_timeout=0.5 / 60)
    message = str(err.value)
    assert "\n" not in message and "distributed.wait_timeout" in message and "meta.json" in message
    assert len(list(tmp_path.glob("*.parts/*/000001.npz"))) == 1  # its own shard is on disk


def test_rank_0_times_out_naming_the_missing_shard(tmp_path):
    from base.distributed import WaitTimeout

    prior = PriorConfig(tokenizer="tok", cache_shard_size=8)  # 24 images -> shards 0, 1, 2; rank 0 does 0, 2
    with pytest.raises(WaitTimeout, match=r"waiting for token-cache shard\(s\) 000001\.npz in "):
        build_token_dataset(grid_tokenizer(), prior, DATA, "train", tmp_path, progress=False, rank=0,
                            world_size=2, wait_timeout=0.5 / 60)
