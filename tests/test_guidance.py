"""Classifier-free guidance has one rule for every sampler (`flextok.guidance`): scale 1 runs the
conditional rows alone, scale 0 the null rows alone, any other scale both in one batch."""

from __future__ import annotations

import pytest
import torch

from flextok.guidance import Guidance
from flextok.schema import SamplingConfig
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


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_flow_prior_follows_the_same_rule(scale):
    torch.manual_seed(0)
    prior = FlowPrior(PriorConfig(kind="flow", dim=32, depth=1, heads=2, num_classes=3), num_tokens=4, token_dim=2)
    torch.nn.init.normal_(prior.out_proj.weight, std=0.1)  # zero-init output would make every scale equal
    labels = torch.tensor([0, 2])
    sampling = lambda s: SamplingConfig(steps=1, guidance_scale=s)  # noqa: E731
    got = torch.stack(prior.sample(labels, sampling=sampling(scale), seed=1))
    cond = torch.stack(prior.sample(labels, sampling=sampling(1.0), seed=1))
    uncond = torch.stack(prior.sample(None, num_samples=2, sampling=sampling(1.0), seed=1))
    # one Euler step from the same noise: the output is linear in the velocity, so it mixes like the velocities
    torch.testing.assert_close(got, torch.lerp(uncond, cond, scale), atol=1e-5, rtol=1e-5)
