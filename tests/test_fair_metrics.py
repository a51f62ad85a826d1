"""The fair-measurement pieces of the evaluation: multiset bits, KID, bootstrap intervals, and the
posterior-mean decoding of a generative decoder."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from evaluation.bits import length_code_bits, multiset_bits
from evaluation.bootstrap import bootstrap_interval
from evaluation.kid import kernel_inception_distance, mmd2_unbiased
from flextok import FlexTok
from flextok.schema import FlexTokConfig
from grid.schema import QuantizerConfig


@pytest.mark.parametrize("vocab, count", [(4, 3), (5, 2), (3, 5), (1, 4)])
def test_multiset_bits_match_a_brute_force_count(vocab, count):
    multisets = set(tuple(sorted(t)) for t in itertools.product(range(vocab), repeat=count))
    assert multiset_bits(vocab, count) == pytest.approx(math.log2(len(multisets)))
    assert multiset_bits(vocab, count) <= count * math.log2(vocab) + 1e-9  # never more than the ordered cost
    assert length_code_bits(6) == pytest.approx(math.log2(6)) and length_code_bits(1) == 0


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.normal(0.5, 1.0, size=(15, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    within_x = sum(k(x[i], x[j]) for i in range(20) for j in range(20) if i != j) / (20 * 19)
    within_y = sum(k(y[i], y[j]) for i in range(15) for j in range(15) if i != j) / (15 * 14)
    across = sum(k(a, b) for a in x for b in y) / (20 * 15)
    assert mmd2_unbiased(x, y) == pytest.approx(within_x + within_y - 2 * across)
    small = kernel_inception_distance(x, y, subsets=3, subset_size=100)
    assert small.subset_size == 7 and small.std > 0  # at most half the smaller side: subsets differ
    same = kernel_inception_distance(rng.normal(size=(400, 3)), rng.normal(size=(400, 3)), subsets=20, subset_size=200)
    assert abs(same.value) < 3 * same.std + 1e-3  # unbiased: about zero for two samples of one distribution
    assert mmd2_unbiased(x, y + 3.0) > mmd2_unbiased(x, y)


def test_bootstrap_interval_covers_the_true_mean():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(40):
        low, high = bootstrap_interval(rng.normal(2.0, 1.0, size=200), resamples=500, seed=int(rng.integers(1e9)))
        covered += low <= 2.0 <= high
        assert high - low < 0.4  # about 2 x 1.96 / sqrt(200) = 0.28 wide
    assert covered >= 34  # a 95% interval: expect 38 of 40


def _known_posterior_tokenizer(prediction: str) -> FlexTok:
    torch.manual_seed(0)
    cfg = FlexTokConfig(input="pixels", patch_size=4, num_registers=4, dim=32, depth=1, heads=2, decoder_dim=32,
                        decoder_depth=1, decoder_heads=2, quantizer=QuantizerConfig(fsq_levels=[5, 3]),
                        prediction=prediction)
    model = FlexTok.from_config(cfg, 16).eval()
    model.target_scale.fill_(1.0)
    return model


def test_mean_decoding_is_the_posterior_mean_of_a_known_model():
    """A rectified flow whose velocity at t = 1 is x - m(c) has E[x0 | c] = m(c): one Euler step from t = 1
    returns m exactly, whatever the noise, while sampling with more steps does not."""
    model = _known_posterior_tokenizer("v")
    target = torch.randn(1, 16, 48)  # 16 patches of 4x4x3
    model.decoder.trunk.forward = lambda x_t, t, cond: x_t - target
    tokens = [torch.tensor([0, 1, 2, 3])] * 2
    for seed in (0, 1):
        mean = model.sample_targets(tokens, model.decoding(steps=1), seed=seed)
        torch.testing.assert_close(mean, target.expand(2, -1, -1))
    sample = model.sample_targets(tokens, model.decoding(steps=8), seed=0)
    assert not torch.allclose(sample, target.expand(2, -1, -1), atol=1e-2)


def test_x0_prediction_turns_the_clean_estimate_into_the_velocity():
    """With prediction x0 the trunk's output is the clean estimate: one step from t = 1 returns it, and for a
    model sure of its answer (a point-mass posterior) every Euler path x_t = t*eps + (1-t)*x0 ends on it."""
    model = _known_posterior_tokenizer("x0")
    target = torch.randn(1, 16, 48)
    model.decoder.trunk.forward = lambda x_t, t, cond: target.expand(len(x_t), -1, -1)
    tokens = [torch.tensor([0, 1, 2, 3])] * 2
    for steps in (1, 8):
        torch.testing.assert_close(model.sample_targets(tokens, model.decoding(steps=steps), seed=steps),
                                   target.expand(2, -1, -1))
    x0, eps, t = torch.randn(3, 16, 48), torch.randn(3, 16, 48), torch.tensor([0.9, 0.5, 0.01])
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * x0
    velocity = model.decoder.velocity(x0, x_t, t)  # a perfect x0 gives the true velocity where t >= MIN_T
    torch.testing.assert_close(velocity[:2], (eps - x0)[:2])
    assert velocity[2].abs().max() < (eps - x0)[2].abs().max()  # clamped: bounded near clean targets


def test_prediction_must_suit_the_decoder():
    with pytest.raises(ValueError, match="prediction"):
        FlexTokConfig(prediction="eps")
    with pytest.raises(ValueError, match="prediction"):
        FlexTokConfig(decoder="diffusion", prediction="x0")


def test_token_set_rows_pay_the_multiset_cost():
    from evaluation.schema import EvalConfig, EvalTokenizerConfig
    from evaluation.tokenizer_rows import Mode, TokenizerUnderTest, rate_record

    cfg = FlexTokConfig(input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32,
                        decoder_depth=1, decoder_heads=2, quantizer=QuantizerConfig(fsq_levels=[5, 3]), token_set=True)
    model = FlexTok.from_config(cfg, 16).eval()
    tested = TokenizerUnderTest(EvalTokenizerConfig(name="set", path="x"), model, "fingerprint", EvalConfig())
    assert tested.modes() == [Mode(), Mode(mean=True)]
    record = rate_record(tested, Mode(), [model.tokenize(torch.rand(3, 3, 16, 16) * 2 - 1)])
    assert record["bits_per_image"] == pytest.approx(multiset_bits(15, 8))
    assert record["bits_per_image"] < 8 * math.log2(15)
    assert "multiset" in tested.describe(Mode())["bits_basis"]
