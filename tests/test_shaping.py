"""Latent-shaping options: tail supervision for the 1D tokenizer (keep-count distributions, several prefixes
per encoder pass) and EQ-VAE-style equivariance for the grid autoencoders."""

import dataclasses
import math
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import fit
from torch import nn

from base.config import load_config
from base.errors import ConfigError
from base.plan import Hardware
from base.schema import SamplingConfig
from flextok import FlexTok
from flextok.model import FlexTokObjective
from flextok.nested_dropout import KEEP_DISTRIBUTIONS, sample_keep_counts
from flextok.plan import planned_tokenizer, tokenizer_plan, tokenizer_workloads
from flextok.schema import FlexTokConfig, TokenizerRunConfig
from grid.autoencoder import GridAutoencoder
from grid.objectives import GridObjective, SpatialTransform, equivariance_transforms
from grid.schema import EquivarianceConfig, GridConfig, LossConfig, QuantizerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
R = 32
SMALL = dict(input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32,
             decoder_depth=1, decoder_heads=2, quantizer=QuantizerConfig(fsq_levels=[5, 3]), nested_dropout="uniform",
             prefixes_per_example=1,
             sampling=SamplingConfig(steps=2))


def presence(keep: torch.Tensor, register: int) -> float:
    """Fraction of the images whose prefix holds register `register` (1-based)."""
    return (keep >= register).float().mean().item()


def draw(distribution: str, n: int = 40_000, **kwargs) -> torch.Tensor:
    return sample_keep_counts(n, R, distribution, generator=torch.Generator().manual_seed(0), **kwargs)


# --- keep-count distributions ----------------------------------------------------------------------------

def test_linear_and_keep_all_reach_the_tail_more_often_than_uniform():
    uniform, linear = draw("uniform"), draw("linear")
    half_full = draw("uniform", keep_all_fraction=0.5)
    # register j is present with probability (R-j+1)/R (uniform), 1 - (j-1)j/(R(R+1)) (linear)
    assert presence(uniform, R) == pytest.approx(1 / R, abs=0.004)
    assert presence(linear, R) == pytest.approx(2 / (R + 1), abs=0.005)
    assert presence(uniform, 17) == pytest.approx(0.5, abs=0.01)
    assert presence(linear, 17) == pytest.approx(1 - 16 * 17 / (R * (R + 1)), abs=0.01)  # 0.74
    for j in (17, 24, R):
        assert presence(linear, j) > presence(uniform, j) + 0.02
        assert presence(half_full, j) == pytest.approx(0.5 + 0.5 * (R - j + 1) / R, abs=0.01)
        assert presence(half_full, j) > presence(uniform, j) + 0.2
    assert linear.min() == 1 and linear.max() == R


@pytest.mark.parametrize("distribution", KEEP_DISTRIBUTIONS)
def test_keep_all_fraction_one_keeps_every_register_and_zero_draws_as_before(distribution):
    assert torch.equal(draw(distribution, n=500, keep_all_fraction=1.0), torch.full((500,), R))
    # off: the same draws as without the option (the default training consumes the random stream as before)
    assert torch.equal(draw(distribution, n=500, keep_all_fraction=0.0), draw(distribution, n=500))


def test_schema_lists_every_keep_distribution():
    assert typing.get_args(typing.get_type_hints(FlexTokConfig)["nested_dropout"]) == KEEP_DISTRIBUTIONS


@pytest.mark.parametrize("overrides, key", [
    (["flextok.nested_dropout=cubic"], "'flextok.nested_dropout'"),
    (["flextok.keep_all_fraction=1.5"], "'flextok.keep_all_fraction'"),
    (["flextok.keep_all_fraction=-0.1"], "'flextok.keep_all_fraction'"),
    (["flextok.prefixes_per_example=0"], "'flextok.prefixes_per_example'"),
    (["equivariance.weight=-1"], "'equivariance.weight'"),
    (["equivariance.scales=[1, 2]"], "'equivariance.scales'"),
    (["equivariance.scales=[]", "equivariance.rotations=false"], "'equivariance.scales'"),
    (["equivariance.fraction=0"], "'equivariance.fraction'"),
    (["equivariance.fraction=1.5"], "'equivariance.fraction'"),
])
def test_config_errors_name_the_key_on_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, cls=TokenizerRunConfig)
    assert key in str(err.value) and "\n" not in str(err.value)


# --- several prefixes per example from one encoder pass ----------------------------------------------------

def tokenizer(**fields) -> FlexTok:
    torch.manual_seed(0)
    model = FlexTok.from_config(FlexTokConfig(**{**SMALL, **fields}), 16)
    # the zero-initialized output layer would give the encoder no gradient through the decoder at all
    nn.init.normal_(model.decoder.trunk.proj_out.weight, std=0.1)
    return model


def images16(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def todays_loss(objective: FlexTokObjective, images: torch.Tensor) -> torch.Tensor:
    """FlexTokObjective.forward as it was before tail supervision (one prefix per image), for comparison."""
    m, cfg = objective.model, objective.model.config
    x0 = m.to_target(images)
    codes, _, aux = m.encode_targets(x0)
    keep = sample_keep_counts(len(images), m.num_registers, cfg.nested_dropout, device=images.device)
    null = torch.rand(len(images), device=images.device) < cfg.cond_dropout
    keep = torch.where(null, torch.zeros_like(keep), keep)
    return m.decoder.loss(x0, m.condition(codes, keep)) + aux


@pytest.mark.parametrize("decoder", ["rectified_flow", "diffusion"])
def test_one_prefix_per_example_is_todays_loss(decoder):
    model, images = tokenizer(decoder=decoder, prediction="v"), images16()
    objective = FlexTokObjective(model)
    model.to_target(images)  # fit the target scale outside the compared calls
    torch.manual_seed(5)
    default, logs = objective(images, 0)
    torch.manual_seed(5)
    reference = todays_loss(objective, images)
    model.config = dataclasses.replace(model.config, prefixes_per_example=1, keep_all_fraction=0.0)
    torch.manual_seed(5)
    explicit, _ = objective(images, 0)
    assert torch.equal(default, reference) and torch.equal(explicit, reference)
    assert set(logs) == {"decoder_loss", "codebook_used"}


def test_prefixes_per_example_share_one_encoder_pass():
    n, batch = 3, 4
    model, images = tokenizer(prefixes_per_example=n), images16(batch)
    encoder_calls, decoder_rows, keeps = [], [], []
    model.encoder.register_forward_hook(lambda module, args, out: encoder_calls.append(len(args[0])))
    model.decoder.trunk.register_forward_pre_hook(lambda module, args: decoder_rows.append(args[0]))
    condition = model.condition
    model.condition = lambda codes, keep: keeps.append(keep) or condition(codes, keep)
    torch.manual_seed(0)
    loss, logs = FlexTokObjective(model)(images, 0)
    assert encoder_calls == [batch]  # once per step, over the batch's images only
    assert len(decoder_rows) == 1 and len(decoder_rows[0]) == n * batch  # one batched decoder call
    x_t, keep = decoder_rows[0].split(batch), keeps[0].split(batch)
    assert not torch.allclose(x_t[0], x_t[1])  # each copy its own noise and t
    assert any(not torch.equal(keep[0], k) for k in keep[1:])  # and its own keep counts
    assert math.isfinite(loss.item()) and 0 < logs["decoder_loss"] <= loss.item()
    loss.backward()
    grad = sum(p.grad.abs().sum().item() for p in model.encoder.parameters() if p.grad is not None)
    assert grad > 0


def test_a_token_set_decodes_one_row_per_image_whatever_prefixes_per_example():
    model, images = tokenizer(prefixes_per_example=3, token_set=True), images16(4)
    rows = []
    model.decoder.trunk.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    FlexTokObjective(model)(images, 0)
    assert rows == [4]  # the set has no prefixes to vary: more rows would only repeat the noise draw


def test_keep_all_fraction_reaches_the_objective():
    model = tokenizer(keep_all_fraction=1.0, cond_dropout=0.0)
    keeps = []
    condition = model.condition
    model.condition = lambda codes, keep: keeps.append(keep) or condition(codes, keep)
    FlexTokObjective(model)(images16(), 0)
    assert torch.equal(keeps[0], torch.full((4,), model.num_registers))


# --- equivariance (grid autoencoders) ----------------------------------------------------------------------

def test_transforms_on_a_known_tensor():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(SpatialTransform(factor=2)(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    square = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    assert torch.equal(SpatialTransform(quarter_turns=1)(square), torch.tensor([[[[1.0, 3.0], [0.0, 2.0]]]]))
    assert torch.equal(SpatialTransform(quarter_turns=2)(square), torch.tensor([[[[3.0, 2.0], [1.0, 0.0]]]]))
    assert SpatialTransform(factor=4, quarter_turns=3)(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 8, 8)
    assert equivariance_transforms(EquivarianceConfig()) == [
        SpatialTransform(factor=2), SpatialTransform(factor=4), *[SpatialTransform(quarter_turns=q) for q in (1, 2, 3)]]
    assert equivariance_transforms(EquivarianceConfig(scales=[2], rotations=False)) == [SpatialTransform(factor=2)]


class PoolAutoencoder(nn.Module):
    """Latents = 4x4 average pooling, decode = nearest upsampling: a lossless round trip for images constant
    over 16x16 blocks, and exactly equivariant on them. `positional` scales the latents by a horizontal ramp
    that the decoder divides out again: still lossless, but no longer equivariant."""

    config = SimpleNamespace(kl_weight=0.0)
    grid_size = 8

    def __init__(self, positional: bool = False):
        super().__init__()
        self.positional = positional

    def ramp(self, latents: torch.Tensor) -> torch.Tensor:
        return 1 + torch.linspace(0, 1, latents.shape[-1]) if self.positional else torch.ones(())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latents / self.ramp(latents), scale_factor=4, mode="nearest")

    def forward(self, images: torch.Tensor):
        latents = F.avg_pool2d(images, 4)
        latents = latents * self.ramp(latents)
        return self.decode(latents), {"latents": latents, "kl": torch.zeros(len(images))}


def test_equivariance_loss_is_zero_exactly_for_an_equivariant_autoencoder():
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(3, 3, 2, 2, generator=g) * 2 - 1, scale_factor=16, mode="nearest")
    cfg = EquivarianceConfig(weight=1.0)
    for positional in (False, True):
        model = PoolAutoencoder(positional)
        recon, out = model(images)
        assert torch.allclose(recon, images, atol=1e-6)  # both reconstruct these images
        objective = GridObjective(model, LossConfig(l1=1.0, l2=1.0), equivariance=cfg)
        for transform in objective.transforms:
            loss = objective.equivariance_loss(images, out["latents"], transform).item()
            assert (loss > 0.01) if positional else (loss < 1e-6), (positional, transform, loss)


def tiny_autoencoder(bottleneck: str = "kl") -> GridAutoencoder:
    torch.manual_seed(0)
    cfg = GridConfig(downsample=4, latent_channels=4, channels=8, num_res_blocks=0, bottleneck=bottleneck,
                     quantizer=QuantizerConfig(fsq_levels=[5, 5, 5, 5]))
    return GridAutoencoder(cfg, resolution=16).train()  # a 4x4 latent grid


def smooth_images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    """Low-frequency 16x16 images, which both a downscale and a decoder can represent."""
    coarse = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


def test_weight_zero_is_todays_loss():
    model, images, loss_cfg = tiny_autoencoder(), smooth_images(), LossConfig(l1=1.0, l2=0.5)
    losses = []
    for objective in (GridObjective(model, loss_cfg),
                      GridObjective(model, loss_cfg, equivariance=EquivarianceConfig(weight=0.0, fraction=1.0))):
        torch.manual_seed(3)
        loss, logs = objective(images, 0)
        losses.append(loss)
        assert set(logs) == {"l1", "l2", "kl"}
    torch.manual_seed(3)  # today's objective: L1 + L2 + KL of the sampled posterior
    recon, out = model(images)
    reference = ((recon - images).abs().mean() + 0.5 * F.mse_loss(recon, images)
                 + model.config.kl_weight * out["kl"].mean())
    assert torch.equal(losses[0], reference) and torch.equal(losses[1], reference)


@pytest.mark.parametrize("bottleneck", ["kl", "quantized"])
def test_equivariance_adds_a_finite_term_that_reaches_the_encoder(bottleneck):
    model, images, loss_cfg = tiny_autoencoder(bottleneck), smooth_images(), LossConfig(l1=1.0, l2=1.0)
    off = GridObjective(model, loss_cfg)
    on = GridObjective(model, loss_cfg, equivariance=EquivarianceConfig(weight=0.5))
    torch.manual_seed(1)
    base, _ = off(images, 0)
    torch.manual_seed(1)
    loss, logs = on(images, 0)
    assert math.isfinite(logs["equivariance_loss"]) and logs["equivariance_loss"] > 0
    assert loss.item() == pytest.approx(base.item() + 0.5 * logs["equivariance_loss"], rel=1e-5)
    latents = model.encode(images, sample=True)["latents"]  # quantized: straight through the quantizer
    on.equivariance_loss(images, latents, SpatialTransform(quarter_turns=1)).backward()
    grad = sum(p.grad.abs().sum().item() for p in model.encoder.parameters() if p.grad is not None)
    assert grad > 0


def test_equivariance_checks_its_scales_and_loss_terms():
    with pytest.raises(ConfigError, match=r"^equivariance\.scales: 8 does not divide the 4x4 latent grid"):
        GridObjective(tiny_autoencoder(), LossConfig(), equivariance=EquivarianceConfig(weight=1.0, scales=[2, 8]))
    with pytest.raises(ConfigError, match=r"^equivariance\.weight:"):
        GridObjective(tiny_autoencoder(), LossConfig(l1=0.0, l2=0.0, lpips=0.0),
                      equivariance=EquivarianceConfig(weight=1.0))


def mean_equivariance_loss(objective: GridObjective, images: torch.Tensor) -> float:
    """Over every transform, on the posterior mean, without gradients."""
    with torch.no_grad():
        latents = objective.model.encode(images)["latents"]
        losses = [objective.equivariance_loss(images, latents, t).item() for t in objective.transforms]
    return sum(losses) / len(losses)


def test_training_with_equivariance_lowers_the_equivariance_loss():
    images, loss_cfg = smooth_images(), LossConfig(l1=1.0, l2=1.0)
    cfg = EquivarianceConfig(weight=1.0, scales=[2], fraction=1.0)
    trained = {}
    for weight in (0.0, 1.0):
        model = tiny_autoencoder()
        objective = GridObjective(model, loss_cfg, equivariance=dataclasses.replace(cfg, weight=weight))
        judge = GridObjective(model, loss_cfg, equivariance=cfg)
        before = mean_equivariance_loss(judge, images)
        torch.manual_seed(0)
        fit(objective, images, steps=100, lr=3e-3)
        trained[weight] = mean_equivariance_loss(judge, images)
    # training for reconstruction alone lowers it too (the decoder learns to decode); the term, much more
    # (measured: 0.87 before, 0.57 without the term, 0.27 with it)
    assert trained[1.0] < 0.5 * before, (before, trained)
    assert trained[1.0] < 0.7 * trained[0.0], trained


# --- the plan (train_tokenizer.py --plan) counts what the options cost ---------------------------------------

def workloads(config: str, *overrides: str) -> dict[str, object]:
    c = load_config(CONFIGS / config, list(overrides), cls=TokenizerRunConfig)
    return {w.name.split(" ")[0] + (" eq" if "equivariance" in w.name else ""): w
            for w in tokenizer_workloads(c, planned_tokenizer(c))}


def test_the_plan_counts_n_decoder_passes_per_image():
    one, four = (workloads("1d_tiny.yaml", f"flextok.prefixes_per_example={n}") for n in (1, 4))
    assert four["decoder"].train_flops == 4 * one["decoder"].train_flops
    assert four["decoder"].activations == 4 * one["decoder"].activations
    assert four["decoder"].checkpointed == 4 * one["decoder"].checkpointed
    assert four["encoder"] == one["encoder"]  # one encoder pass serves every prefix
    # a token set has no prefixes: one decoder row per image whatever the setting
    sets = (workloads("1d_tiny.yaml", "flextok.token_set=true", f"flextok.prefixes_per_example={n}") for n in (1, 4))
    assert next(sets)["decoder"] == next(sets)["decoder"] == one["decoder"]


def test_the_plan_counts_the_equivariance_decoder_pass():
    off = workloads("grid_kl.yaml")
    on = workloads("grid_kl.yaml", "equivariance.weight=1", "equivariance.scales=[2]", "equivariance.fraction=0.5")
    assert "decoder eq" not in off
    # a quarter of the area for the downscale, the full grid for each of the three rotations
    area = (1 / 4 + 3) / 4
    assert on["decoder eq"].train_flops == pytest.approx(0.5 * area * off["decoder"].train_flops)
    assert on["decoder eq"].activations == pytest.approx(0.5 * area * off["decoder"].activations)
    c = load_config(CONFIGS / "1d_tiny.yaml", ["equivariance.weight=1"], cls=TokenizerRunConfig)
    assert "equivariance applies to the grid tokenizer only" in tokenizer_plan(c, Hardware())
