"""Discrete prior sampling: the KV-cache decoder, length / EOS / top-k / top-p, CFG, token sets, images."""

from __future__ import annotations

import itertools

import pytest
import torch

from base.errors import TokenizerMismatch
from base.fingerprint import fingerprint_model
from base.hub import load_model
from base.schema import SamplingConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig, QuantizerConfig
from priors import (
    DiscretePrior,
    KVCacheDecoder,
    PriorConfig,
    filter_and_sample,
    generate_images,
    sample_tokens,
)
from priors.sampling import GuidedDecoder

VOCAB, CLASSES = 40, 3
FSQ_40 = QuantizerConfig(fsq_levels=[8, 5])


def make_prior(variable_length: bool = False, token_set: bool = False, max_length: int = 12,
               tokenizer_hash: str = "") -> DiscretePrior:
    torch.manual_seed(0)
    config = PriorConfig(dim=64, depth=2, heads=2, num_classes=CLASSES)
    return DiscretePrior(config, VOCAB, max_length, variable_length, token_set, tokenizer_hash).eval()


@pytest.mark.parametrize("variable_length", [False, True])
def test_kv_cache_decoder_matches_full_forward(variable_length):
    prior = make_prior(variable_length)
    tokens = torch.randint(0, VOCAB, (4, 11))
    condition = prior.condition_ids(torch.tensor([0, 1, 2, -1]), 4)
    full = prior.logits(tokens, condition)
    decoder = KVCacheDecoder(prior, batch_size=4, max_positions=12)
    steps = [decoder.step(condition)] + [decoder.step(tokens[:, i]) for i in range(11)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)
    with pytest.raises(IndexError):
        decoder.step(tokens[:, 0])


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guidance_scales_0_and_1_are_the_unconditional_and_conditional_model(scale):
    prior = make_prior()
    labels = torch.tensor([0, 2, 1])
    tokens = torch.randint(0, VOCAB, (3, 5))
    cond = prior.logits(tokens, prior.condition_ids(labels, 3))
    uncond = prior.logits(tokens, prior.condition_ids(None, 3))
    guided = GuidedDecoder(prior, labels, 3, scale, max_positions=6)
    got = torch.stack([guided.start()] + [guided.next(tokens[:, i]) for i in range(5)], 1)
    expected = {0.0: uncond, 1.0: cond}.get(scale, uncond + scale * (cond - uncond))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert len(guided.condition) == (6 if scale == 3.0 else 3)  # rows are doubled only when guiding


def test_fixed_length_and_forced_length():
    prior = make_prior(max_length=12)
    samples = sample_tokens(prior, torch.tensor([0, 1, 2, 0]), seed=1)
    assert [len(s) for s in samples] == [12] * 4
    assert all(s.dtype == torch.long and 0 <= s.min() and s.max() < VOCAB for s in samples)
    assert [len(s) for s in sample_tokens(prior, num_samples=3, length=5)] == [5, 5, 5]
    with pytest.raises(ValueError):
        sample_tokens(prior, num_samples=2, length=13)


def test_variable_length_stops_at_eos():
    prior = make_prior(variable_length=True, max_length=12)
    # a flat distribution (high temperature) draws EOS at about 1 in 41 per position
    samples = sample_tokens(prior, num_samples=32, sampling=SamplingConfig(temperature=3.0), seed=0)
    lengths = [len(s) for s in samples]
    assert all(1 <= n <= 12 for n in lengths)
    assert min(lengths) < 12 and len(set(lengths)) > 2, "EOS never ended a row early"
    assert all(int(s.max()) < VOCAB for s in samples), "EOS or special ids leaked into a sequence"
    forced = sample_tokens(prior, num_samples=32, sampling=SamplingConfig(temperature=3.0), length=12, seed=0)
    assert [len(s) for s in forced] == [12] * 32  # a forced length never draws EOS
    assert all(int(s.max()) < VOCAB for s in forced)


def test_top_k_and_top_p_restrict_the_candidates():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    generator = torch.Generator().manual_seed(0)
    top5 = logits.topk(5).indices
    for _ in range(20):
        picked = filter_and_sample(logits, temperature=2.0, top_k=5, generator=generator)
        assert (picked[:, None] == top5).any(1).all()
    greedy = filter_and_sample(logits, top_k=1, generator=generator)
    assert torch.equal(greedy, logits.argmax(-1))
    peaked = torch.full((4, 50), -10.0)
    peaked[:, 7] = 10.0  # holds almost all of the mass
    assert (filter_and_sample(peaked, top_p=0.5, generator=generator) == 7).all()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.8)])
def test_sampled_frequencies_match_the_filtered_softmax(top_k, top_p):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5]]).repeat(40_000, 1)
    probs = torch.softmax(logits[0] / 1.5, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(6, dtype=torch.bool)
    keep[order[: top_k or 6]] = True
    renormalized = torch.where(keep, probs, 0.0) / probs[keep].sum()  # top-p applies after top-k
    mass_before = renormalized[order].cumsum(0) - renormalized[order]
    keep[order[mass_before >= top_p]] = False
    expected = torch.where(keep, probs, 0.0) / probs[keep].sum()
    picked = filter_and_sample(logits, 1.5, top_k, top_p, torch.Generator().manual_seed(0))
    observed = torch.bincount(picked, minlength=6).float() / len(picked)
    torch.testing.assert_close(observed, expected, atol=0.01, rtol=0)


def test_top_k_1_sampling_is_greedy_decoding():
    prior = make_prior(max_length=6)
    labels = torch.tensor([0, 1])
    samples = torch.stack(sample_tokens(prior, labels, sampling=SamplingConfig(top_k=1)))
    condition = prior.condition_ids(labels, 2)
    greedy = torch.empty(2, 0, dtype=torch.long)
    for _ in range(6):
        greedy = torch.cat([greedy, prior.logits(greedy, condition)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(samples, greedy)


def test_sampling_is_seeded():
    prior = make_prior()
    a = sample_tokens(prior, torch.tensor([0, 1]), seed=3, sampling=SamplingConfig(guidance_scale=2.0))
    b = sample_tokens(prior, torch.tensor([0, 1]), seed=3, sampling=SamplingConfig(guidance_scale=2.0))
    c = sample_tokens(prior, torch.tensor([0, 1]), seed=4, sampling=SamplingConfig(guidance_scale=2.0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_token_set_samples_are_sorted_multisets():
    prior = make_prior(token_set=True)
    for s in sample_tokens(prior, num_samples=6, sampling=SamplingConfig(temperature=2.0)):
        assert torch.equal(s, s.sort().values)


def test_generate_images_end_to_end_and_tokenizer_check(tmp_path):
    torch.manual_seed(0)
    tokenizer = GridAutoencoder(GridConfig(channels=16, bottleneck="quantized", quantizer=FSQ_40), resolution=16)
    prior = DiscretePrior(PriorConfig(dim=64, depth=2, heads=2, num_classes=CLASSES), tokenizer.vocab_size,
                          tokenizer.tokens_per_image, tokenizer_hash=fingerprint_model(tokenizer)).eval()
    prior.save_pretrained(tmp_path / "prior")
    reloaded = load_model(tmp_path / "prior")
    assert isinstance(reloaded, DiscretePrior) and reloaded.tokenizer_hash == prior.tokenizer_hash
    path = tmp_path / "grid.png"
    images = generate_images(reloaded, tokenizer, [0, 1, 2, 0, 1, 2], path=path,
                             sampling=SamplingConfig(top_k=10, guidance_scale=2.0))
    assert images.shape == (6, 3, 16, 16) and images.abs().max() <= 1
    assert path.stat().st_size > 0
    other = GridAutoencoder(GridConfig(channels=16, bottleneck="quantized", quantizer=FSQ_40), resolution=16)
    with pytest.raises(TokenizerMismatch):
        generate_images(reloaded, other, [0])


def test_token_set_likelihood_is_a_distribution_over_sorted_multisets():
    """Training and NLL use the order the sampler enforces: the probabilities of all sorted sequences
    (the multisets) sum to one, so held-out bits are a real code length for a set."""
    torch.manual_seed(0)
    prior = DiscretePrior(PriorConfig(dim=32, depth=1, heads=2), vocab_size=4, max_length=3, token_set=True).eval()
    multisets = torch.tensor([t for t in itertools.product(range(4), repeat=3) if list(t) == sorted(t)])
    with torch.no_grad():
        bits = prior.nll_bits(multisets)
    assert torch.exp2(-bits).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_prefix_bits_are_the_marginal_likelihood_of_the_prefix():
    """The bits of the first k tokens equal -log2 of the prior's probability summed over every continuation
    (brute force on a 4-code vocabulary), and at k = the full length they are the sequence's bits."""
    torch.manual_seed(0)
    prior = DiscretePrior(PriorConfig(dim=32, depth=1, heads=2), vocab_size=4, max_length=4).eval()
    everything = torch.tensor(list(itertools.product(range(4), repeat=4)))
    with torch.no_grad():
        full = prior.nll_bits(everything)
        prefix = prior.prefix_nll_bits(everything[:5], [1, 2, 4])
    for row in range(5):
        for column, k in enumerate([1, 2, 4]):
            same_prefix = (everything[:, :k] == everything[row, :k]).all(1)
            marginal = torch.exp2(-full[same_prefix]).sum()
            assert prefix[row, column].item() == pytest.approx(-torch.log2(marginal).item(), abs=1e-4)
    torch.testing.assert_close(prefix[:, -1], full[:5])
    assert (prefix.diff(dim=1) >= 0).all()
    with pytest.raises(ValueError, match="prefix lengths"):
        prior.prefix_nll_bits(everything[:2], [5])
    set_prior = DiscretePrior(PriorConfig(dim=32, depth=1, heads=2), vocab_size=4, max_length=4, token_set=True)
    with pytest.raises(ValueError, match="ordered"):
        set_prior.prefix_nll_bits(everything[:2], [2])
