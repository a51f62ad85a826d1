"""Classifier-free guidance has one rule for every sampler (`base.guidance`): scale 1 runs the
conditional rows alone, scale 0 the null rows alone, any other scale both in one batch."""

from __future__ import annotations

import pytest
import torch

from base.guidance import Guidance
from base.schema import SamplingConfig
from priors import FlowPrior, PriorConfig


def test_rows_and_combination():
    cond, null, x = torch.tensor([[1.0], [2.0]]), torch.tensor([[10.0], [20.0]]), torch.tensor([[5.0], [6.0]])
    assert torch.equal(Guidance(1.0).conditions(cond, null), cond)
    assert torch.equal(Guidance(0.0).conditions(cond, null), null)
    assert torch.equal(Guidance(3.0, conditional=False).conditions(cond, null), null)  # nothing to guide with
    guided = Guidance(3.0)
    assert torch.equal(guided.conditions(cond, null), torch.cat([cond, null]))
    assert torch.equal(guided.repeat(x), torch.cat([x, x]))
    out = torch.cat([cond, null])  # pretend the model returned its condition
    assert torch.allclose(guided.combine(out), null + 3.0 * (cond - null))
    assert torch.equal(Guidance(1.0).combine(cond), cond)


def random_flow_prior() -> FlowPrior:
    """A small flow prior with every weight random: zero-initialized gates would hide the class."""
    torch.manual_seed(0)
    prior = FlowPrior(PriorConfig(kind="flow", dim=32, depth=1, heads=2, num_classes=3), num_tokens=4, token_dim=2)
    with torch.no_grad():
        for param in prior.parameters():
            param.normal_(std=0.3)
    return prior.eval()


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_flow_prior_follows_the_same_rule(scale):
    prior = random_flow_prior()
    labels = torch.tensor([0, 2])
    sampling = lambda s: SamplingConfig(steps=1, guidance_scale=s)  # noqa: E731
    got = torch.stack(prior.sample(labels, sampling=sampling(scale), seed=1))
    cond = torch.stack(prior.sample(labels, sampling=sampling(1.0), seed=1))
    uncond = torch.stack(prior.sample(None, num_samples=2, sampling=sampling(1.0), seed=1))
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the class matters, so the scales differ
    # one Euler step from the same noise: the output is linear in the velocity, so it mixes like the velocities
    torch.testing.assert_close(got, torch.lerp(uncond, cond, scale), atol=1e-5, rtol=1e-5)


def test_guidance_interval_runs_one_pass_outside_it():
    sampling = SamplingConfig(guidance_scale=4.0, guidance_interval=[0.25, 0.75])
    assert Guidance.at(sampling, 0.5) == Guidance(4.0)
    assert Guidance.at(sampling, 0.9) == Guidance(1.0) and Guidance.at(sampling, 0.1) == Guidance(1.0)
    assert Guidance.at(sampling, 0.5, conditional=False).conditions(torch.zeros(1), torch.ones(1)) == 1
    unconditional = SamplingConfig(guidance_scale=0.0, guidance_interval=[0.25, 0.75])
    assert Guidance.at(unconditional, 0.9) == Guidance(0.0)  # scale 0 is the unconditional model at every step


def test_the_full_interval_is_plain_guidance_and_a_narrower_one_differs():
    prior = random_flow_prior()
    labels = torch.tensor([0, 2])
    full = SamplingConfig(steps=4, guidance_scale=3.0)
    half = SamplingConfig(steps=4, guidance_scale=3.0, guidance_interval=[0.0, 0.6])
    a = torch.stack(prior.sample(labels, sampling=full, seed=2))
    assert torch.equal(a, torch.stack(prior.sample(labels, sampling=SamplingConfig(**{**vars(full)}), seed=2)))
    assert not torch.allclose(a, torch.stack(prior.sample(labels, sampling=half, seed=2)))
