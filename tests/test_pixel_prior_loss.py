"""The 1D tokenizer's pixel-space decoder term (`pixel_loss`) and its jointly trained prior (`prior_loss`)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import fit
from torch import nn

from base.config import load_config
from base.errors import ConfigError, UserError
from base.lpips import LPIPS, lpips_state_dict_shapes
from base.plan import Hardware, per_token_weights
from base.schema import SamplingConfig
from flextok import FlexTok
from flextok.decoders import DecoderEstimate, build_decoder, cosine_alpha_bar
from flextok.joint_prior import scale_gradient
from flextok.model import FlexTokObjective, pixel_t_weights
from flextok.plan import planned_tokenizer, tokenizer_plan, tokenizer_workloads
from flextok.schema import (
    FlexTokConfig,
    PixelLossConfig,
    PriorLossConfig,
    TokenizerRunConfig,
)
from flextok.training import build_objective, build_tokenizer
from grid.schema import GridConfig, QuantizerConfig

SMALL = dict(input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32,
             decoder_depth=1, decoder_heads=2, quantizer=QuantizerConfig(fsq_levels=[5, 3]), nested_dropout="uniform",
             prefixes_per_example=1,
             sampling=SamplingConfig(steps=2))
TINY_AE = GridConfig(downsample=4, latent_channels=4, channels=8, num_res_blocks=0)  # a 4x4 latent grid at 16px
PRIOR = dict(dim=32, depth=1, heads=2)


def tokenizer(**fields) -> FlexTok:
    """A tiny tokenizer on 16x16 images: pixels in, or (input='latents') a random frozen KL autoencoder's latents."""
    torch.manual_seed(0)
    cfg = FlexTokConfig(**{**SMALL, **fields})
    ae = dataclasses.asdict(TINY_AE) if cfg.input == "latents" else None
    model = FlexTok(cfg, 16, autoencoder_config=ae)
    # the zero-initialized output layer would give the encoder no gradient through the decoder at all
    nn.init.normal_(model.decoder.trunk.proj_out.weight, std=0.1)
    return model


def latent_tokenizer(**fields) -> FlexTok:
    return tokenizer(input="latents", patch_size=1, **fields)


def images16(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_images(batch: int = 8) -> torch.Tensor:
    """Low-frequency 16x16 images: 8 tokens of 15 codes can describe them, unlike noise."""
    coarse = torch.rand(batch, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


def grad_sum(module: nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


# --- the default loss is unchanged -------------------------------------------------------------------------

def loss_before_estimate(decoder: nn.Module, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The decoders' `loss` as it was before they exposed x̂0 and t, for comparison."""
    if hasattr(decoder, "time_logit_mean"):
        t = torch.sigmoid(torch.randn(len(x0)) + decoder.time_logit_mean)
        eps = torch.randn_like(x0)
        x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * x0
        return F.mse_loss(decoder.velocity(decoder.trunk(x_t, t, cond), x_t, t), eps - x0)
    t = torch.rand(len(x0))
    a = cosine_alpha_bar(t)[:, None, None]
    eps = torch.randn_like(x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = a.sqrt() * eps - (1 - a).sqrt() * x0 if decoder.prediction == "v" else eps
    return F.mse_loss(decoder.trunk(x_t, t, cond), target)


@pytest.mark.parametrize("decoder, prediction", [("rectified_flow", "v"), ("rectified_flow", "x0"),
                                                 ("diffusion", "v"), ("diffusion", "eps")])
def test_weight_zero_is_the_default_loss(decoder, prediction):
    model, images = tokenizer(decoder=decoder, prediction=prediction), images16()
    x0 = model.to_target(images)  # fits the target scale outside the compared calls
    cond = model.condition(model.encode_targets(x0)[0], torch.full((4,), 3))
    torch.manual_seed(2)
    before = loss_before_estimate(model.decoder, x0, cond)
    torch.manual_seed(2)
    assert torch.equal(model.decoder.loss(x0, cond), before)
    default = FlexTokObjective(model)
    off = FlexTokObjective(model, pixel_loss=PixelLossConfig(weight=0.0, l2=1.0),
                           prior_loss=PriorLossConfig(weight=0.0, **PRIOR))
    assert off.joint_prior is None and off.lpips is None
    losses = []
    for objective in (default, off):
        torch.manual_seed(5)
        loss, logs = objective(images, 0)
        losses.append(loss)
        assert set(logs) == {"decoder_loss", "codebook_used"}
    assert torch.equal(losses[0], losses[1])


# --- pixel_loss ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder, prediction", [("rectified_flow", "v"), ("rectified_flow", "x0"),
                                                 ("diffusion", "v"), ("diffusion", "eps")])
def test_x0_estimate_of_the_true_prediction_is_the_clean_target(decoder, prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 5, 4, generator=g), torch.randn(6, 5, 4, generator=g)
    t = torch.linspace(0.02, 0.98, 6)
    dec = build_decoder(decoder, nn.Identity(), prediction)
    if decoder == "rectified_flow":
        x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * x0
        out = eps - x0 if prediction == "v" else x0
    else:
        a = cosine_alpha_bar(t)[:, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction == "v" else eps
    assert torch.allclose(dec.x0_from(out, x_t, t), x0, atol=1e-4)


class OracleVelocity(nn.Module):
    """A rectified-flow trunk that knows the clean target: it outputs the true velocity (x_t - x0) / t."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x_t, t, cond):
        return (x_t - self.x0) / t[:, None, None]


def test_estimate_returns_the_x0_and_t_of_its_own_loss():
    x0 = torch.randn(8, 5, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    estimate = build_decoder("rectified_flow", OracleVelocity(x0), "v").estimate(x0, torch.zeros(8, 2, 4))
    assert estimate.loss.item() < 1e-8
    assert torch.allclose(estimate.x0_hat, x0, atol=1e-4)
    assert estimate.t.shape == (8,) and bool(((estimate.t > 0) & (estimate.t < 1)).all())


def test_t_weightings():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(pixel_t_weights(t, PixelLossConfig()), torch.tensor([1.0, 0.75, 0.5, 0.0]))
    assert torch.equal(pixel_t_weights(t, PixelLossConfig(t_max=0.3)), torch.tensor([1.0, 0.75, 0.0, 0.0]))
    assert torch.equal(pixel_t_weights(t, PixelLossConfig(t_weighting="uniform", t_max=0.5)),
                       torch.tensor([1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("input_kind", ["pixels", "latents"])
def test_the_pixel_term_of_the_true_target_is_the_frozen_autoencoders_error(input_kind):
    model = tokenizer() if input_kind == "pixels" else latent_tokenizer()
    images = images16()
    cfg = PixelLossConfig(weight=1.0, l1=1.0, l2=0.5, t_weighting="uniform")
    objective = FlexTokObjective(model, pixel_loss=cfg)
    x0 = model.to_target(images)
    exact = DecoderEstimate(torch.zeros(()), x0.repeat(2, 1, 1), torch.zeros(8))  # two prefixes per image
    term = objective._pixel_loss(images, exact).item()
    if input_kind == "pixels":  # the target is the image: nothing to decode (up to the scale's rounding)
        assert term < 1e-6
    else:  # x̂0 = the image's latents: what is left is the autoencoder's own reconstruction error
        recon = model.autoencoder.decode(model.autoencoder.encode(images)["latents"])
        expected = (recon - images).abs().mean() + 0.5 * F.mse_loss(recon, images)
        assert term == pytest.approx(expected.item(), rel=1e-5) and term > 0.1


def test_pixel_term_reaches_the_decoder_and_encoder_but_not_the_frozen_autoencoder():
    model, images = latent_tokenizer(), images16()
    objective = FlexTokObjective(model, pixel_loss=PixelLossConfig(weight=0.5, l1=1.0, l2=1.0))
    torch.manual_seed(3)
    base, _ = FlexTokObjective(model)(images, 0)
    torch.manual_seed(3)
    loss, logs = objective(images, 0)
    assert math.isfinite(logs["pixel_loss"]) and logs["pixel_loss"] > 0
    assert loss.item() == pytest.approx(base.item() + 0.5 * logs["pixel_loss"], rel=1e-5)
    x0 = model.to_target(images)
    codes, _, _ = model.encode_targets(x0)
    objective._pixel_loss(images, objective._decoder_estimate(x0, codes)).backward()
    assert grad_sum(model.decoder) > 0 and grad_sum(model.encoder) > 0
    assert all(p.grad is None for p in model.autoencoder.parameters())


def pixel_loss_at(objective: FlexTokObjective, images: torch.Tensor) -> float:
    torch.manual_seed(7)  # the same noise, t and keep counts for every call
    with torch.no_grad():
        return objective(images, 0)[1]["pixel_loss"]


def test_training_with_the_pixel_term_lowers_it():
    # pixel input: a random frozen KL decoder gives the term no reachable floor, and training one here is slow
    model, images = tokenizer(), smooth_images()
    objective = FlexTokObjective(model, pixel_loss=PixelLossConfig(weight=1.0, l1=1.0, l2=1.0))
    before = pixel_loss_at(objective, images)
    torch.manual_seed(0)
    fit(objective, images, steps=40, lr=3e-3)
    after = pixel_loss_at(objective, images)
    assert after < 0.75 * before, (before, after)  # measured: 0.199 -> 0.131


def test_l2_on_pixel_input_only_reweights_the_velocity_loss():
    """||x̂0 - x0||² = t²·||v̂ - v||²: for input 'pixels' an L2-only term changes the weight of each t, not
    the velocity field that minimizes the loss (the README's note on what the term does to the flow)."""
    model, images = tokenizer(), smooth_images(4)
    cfg = PixelLossConfig(weight=1.0, l1=0.0, l2=1.0, t_weighting="uniform")
    objective = FlexTokObjective(model, pixel_loss=cfg)
    x0 = model.to_target(images)
    cond = model.condition(model.encode_targets(x0)[0], torch.full((4,), 8))
    torch.manual_seed(2)
    term = objective._pixel_loss(images, model.decoder.estimate(x0, cond))
    torch.manual_seed(2)  # the same t and noise, by hand
    t = torch.sigmoid(torch.randn(4) + model.decoder.time_logit_mean)
    eps = torch.randn_like(x0)
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * x0
    velocity_error = (model.decoder.trunk(x_t, t, cond) - (eps - x0)).square().flatten(1).mean(1)
    expected = (t.square() * velocity_error).mean() / model.target_scale.square()
    assert term.item() == pytest.approx(expected.item(), rel=1e-4)


def test_pixel_term_with_lpips_from_local_weights(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "lpips.safetensors"
    LPIPS({k: torch.randn(s).abs() * 0.05 for k, s in lpips_state_dict_shapes().items()}).save_weights(weights)
    model, images = tokenizer(), images16()
    cfg = PixelLossConfig(weight=1.0, l1=1.0, lpips=1.0, lpips_weights=str(weights))
    terms = {}
    for lpips in (0.0, 1.0):
        objective = FlexTokObjective(model, pixel_loss=dataclasses.replace(cfg, lpips=lpips))
        torch.manual_seed(3)  # after building: LPIPS's layers draw their (replaced) initial weights
        terms[lpips] = objective(images, 0)[1]
    assert math.isfinite(terms[1.0]["pixel_loss"]) and terms[1.0]["pixel_loss"] > terms[0.0]["pixel_loss"]
    with pytest.raises(UserError) as err:
        FlexTokObjective(model, pixel_loss=dataclasses.replace(cfg, lpips_weights=str(tmp_path / "missing")))
    assert str(err.value).startswith("pixel_loss.lpips_weights: ") and "\n" not in str(err.value)


# --- prior_loss ----------------------------------------------------------------------------------------------

def prior_objective(model: FlexTok, weight: float) -> FlexTokObjective:
    torch.manual_seed(4)  # the same prior initialization for every weight
    return FlexTokObjective(model, prior_loss=PriorLossConfig(weight=weight, **PRIOR))


def test_the_prior_is_a_normalized_next_token_model():
    model = tokenizer()
    objective = prior_objective(model, 1.0)
    v, r = model.vocab_size, model.num_registers
    codebook = model.quantizer.codes_from_indices(torch.arange(v)[None])[0]
    indices = torch.randint(v, (1, r), generator=torch.Generator().manual_seed(0)).repeat(v, 1)
    indices[:, -1] = torch.arange(v)  # one sequence, each possible last token
    with torch.no_grad():
        nll = objective.joint_prior(codebook[indices], indices, codebook)
    assert torch.logsumexp(-nll[:, -1], 0).item() == pytest.approx(0.0, abs=1e-5)  # probabilities sum to 1
    assert torch.allclose(nll[:, :-1], nll[:1, :-1].expand(v, -1))  # causal: earlier tokens do not see it


def test_prior_gradient_reaches_the_encoder_through_the_codes_scaled_by_the_weight():
    grads = {}
    for weight in (0.5, 2.0):
        model = tokenizer()
        objective = prior_objective(model, weight)
        x0 = model.to_target(images16())
        codes, indices, _ = model.encode_targets(x0)
        objective._prior_loss(codes, indices).backward()  # the prior's NLL alone: no decoder loss
        grads[weight] = (torch.cat([p.grad.flatten() for p in model.encoder.parameters() if p.grad is not None]),
                         torch.cat([p.grad.flatten() for p in objective.joint_prior.parameters()]))
        assert all(p.grad is None for p in model.decoder.parameters())
    (encoder_low, prior_low), (encoder_high, prior_high) = grads[0.5], grads[2.0]
    assert encoder_low.abs().sum() > 0
    assert torch.allclose(encoder_high, 4 * encoder_low, rtol=1e-4, atol=1e-9)  # the encoder sees `weight` x it
    assert torch.allclose(prior_high, prior_low)  # the prior itself trains at weight 1 either way
    x = torch.ones(3, requires_grad=True)
    y = scale_gradient(x, 0.25)
    y.sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.full((3,), 0.25))


def prior_bits(objective: FlexTokObjective, images: torch.Tensor) -> float:
    torch.manual_seed(7)
    with torch.no_grad():
        return objective(images, 0)[1]["prior_loss_bits"]


def code_entropy_bits(model: FlexTok, images: torch.Tensor) -> float:
    """Mean over register positions of the empirical entropy of the batch's codes there."""
    with torch.no_grad():
        indices = model.encode(images)[1]
    total = 0.0
    for column in indices.T:
        p = torch.bincount(column, minlength=model.vocab_size).float() / len(column)
        total -= (p[p > 0] * p[p > 0].log2()).sum().item()
    return total / indices.shape[1]


def test_training_lowers_the_priors_nll_on_a_fixed_batch():
    model, images = tokenizer(), smooth_images(8)
    objective = prior_objective(model, 0.1)
    before = prior_bits(objective, images)
    torch.manual_seed(0)
    fit(objective, images, steps=30, lr=3e-3)
    after = prior_bits(objective, images)
    assert after < 0.5 * before, (before, after)


def test_a_big_weight_makes_the_codes_more_modelable():
    images, trained = smooth_images(16), {}
    for weight in (1e-6, 3.0):  # about off (the prior still trains) against a big weight
        model = tokenizer()
        objective = prior_objective(model, weight)
        torch.manual_seed(0)
        fit(objective, images, steps=40, lr=3e-3)
        trained[weight] = prior_bits(objective, images), code_entropy_bits(model, images)
    (nll_off, entropy_off), (nll_on, entropy_on) = trained[1e-6], trained[3.0]
    # measured: reconstruction alone spreads the codes (0.54 -> 1.58 bits per position) and the prior
    # reaches 2.24 bits per token; at weight 3 the codes collapse (0 bits, the useless extreme) and cost 0.02
    assert nll_on < 0.1 * nll_off, trained
    assert entropy_on < 0.5 * entropy_off, trained


def test_a_token_set_is_refused_a_causal_prior():
    with pytest.raises(ConfigError, match=r"^prior_loss\.weight: .*token_set") as err:
        FlexTokObjective(tokenizer(token_set=True), prior_loss=PriorLossConfig(weight=1.0, **PRIOR))
    assert "\n" not in str(err.value)


def test_the_trainer_builds_both_terms_and_the_prior_stays_out_of_the_tokenizer():
    overrides = ["tokenizer=flextok", "data.resolution=16", "flextok.input=pixels", "flextok.patch_size=4",
                 "flextok.num_registers=4", "flextok.dim=32", "flextok.depth=1", "flextok.heads=2",
                 "flextok.decoder_dim=32", "flextok.decoder_depth=1", "flextok.decoder_heads=2",
                 "pixel_loss.weight=0.5", "pixel_loss.t_max=0.5", "prior_loss.weight=0.25", "prior_loss.dim=32",
                 "prior_loss.heads=2", "prior_loss.depth=1"]
    cfg = load_config(None, overrides, cls=TokenizerRunConfig)
    model = build_tokenizer(cfg)
    objective = build_objective(cfg, model)
    assert objective.pixel_cfg == cfg.pixel_loss and objective.prior_cfg == cfg.prior_loss
    assert objective.joint_prior is not None
    assert any(k.startswith("joint_prior.") for k in objective.state_dict())  # checkpointed with the objective
    assert not any("joint_prior" in k for k in model.state_dict())  # not in the exported tokenizer


@pytest.mark.parametrize("overrides, key", [
    (["pixel_loss.weight=-1"], "'pixel_loss.weight'"),
    (["pixel_loss.l2=-0.5"], "'pixel_loss.l2'"),
    (["pixel_loss.weight=1", "pixel_loss.l1=0"], "'pixel_loss.l1'"),
    (["pixel_loss.t_max=0"], "'pixel_loss.t_max'"),
    (["pixel_loss.t_max=1.5"], "'pixel_loss.t_max'"),
    (["pixel_loss.t_weighting=linear"], "'pixel_loss.t_weighting'"),
    (["prior_loss.weight=-1"], "'prior_loss.weight'"),
    (["prior_loss.dim=30", "prior_loss.heads=4"], "'prior_loss.dim'"),
    (["prior_loss.depth=0"], "'prior_loss.depth'"),
])
def test_config_errors_name_the_key_on_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, cls=TokenizerRunConfig)
    assert key in str(err.value) and "\n" not in str(err.value)


# --- the plan (train_tokenizer.py --plan) counts what the terms cost ------------------------------------------

def test_the_plan_counts_the_joint_prior_and_the_pixel_decode():
    tiny = Path(__file__).resolve().parents[1] / "configs" / "1d_tiny.yaml"
    terms = ["prior_loss.weight=0.1", "prior_loss.dim=64", "prior_loss.depth=2", "prior_loss.heads=4",
             "pixel_loss.weight=1", "flextok.prefixes_per_example=2"]
    off = load_config(tiny, ["flextok.prefixes_per_example=2"], cls=TokenizerRunConfig)
    on = load_config(tiny, terms, cls=TokenizerRunConfig)
    parts_off, parts_on = planned_tokenizer(off), planned_tokenizer(on)
    work_off = {w.name: w for w in tokenizer_workloads(off, parts_off)}
    work_on = {w.name: w for w in tokenizer_workloads(on, parts_on)}
    assert set(work_on) - set(work_off) == {"autoencoder decode (frozen, pixel_loss)", "joint prior (prior_loss)"}
    (prior,) = parts_on.extras
    assert prior.pos.shape == (32, 64)  # R positions of the prior's width
    decode, joint = work_on["autoencoder decode (frozen, pixel_loss)"], work_on["joint prior (prior_loss)"]
    assert decode.passes == 4.0  # forward + backward to x̂0, for each of the 2 decoder rows per image
    # 2·W·s + 4·L·h·s² over the 32 registers, plus the 32 x 1000 logits of width 64
    expected = 2 * per_token_weights(prior) * 32 + 4 * 2 * 64 * 32**2 + 2 * 64 * 1000 * 32
    assert joint.forward_flops == expected
    report = tokenizer_plan(on, Hardware())
    assert "joint prior (prior_loss; objective only, not exported)" in report
