"""The priors' drop-in layers: FastDropout drops at its rate, keeps the expectation, and is the
identity in eval mode; both swaps keep the parameter names."""

import torch
from torch import nn

from priors.fast_layers import FastDropout, FusedLayerNorm, use_fast_layers
from priors.schema import PriorConfig


def test_fast_dropout_drops_at_its_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(64, 128, 256, requires_grad=True)
    layer = FastDropout(0.1).train()
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.003
    assert abs(y.mean().item() - 1.0) < 0.005  # kept values are scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.9)
    assert torch.equal(layer.eval()(x), x) and torch.equal(FastDropout(0.0).train()(x), x)
    torch.manual_seed(1)
    a = layer.train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, layer(x))  # seeded like any torch random op


def test_priors_use_the_fast_layers_under_the_same_parameter_names():
    from priors import DiscretePrior

    config = PriorConfig(dim=32, heads=2, depth=1, dropout=0.1)
    torch.manual_seed(0)
    prior = DiscretePrior(config, vocab_size=20, max_length=8)
    kinds = {type(m) for m in prior.modules()}
    assert FastDropout in kinds and FusedLayerNorm in kinds and nn.Dropout not in kinds
    plain = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2))
    names = list(plain.state_dict())
    use_fast_layers(plain)
    assert type(plain[1]) is FastDropout and plain[1].p == 0.2 and list(plain.state_dict()) == names
