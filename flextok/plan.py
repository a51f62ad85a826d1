"""`train_tokenizer.py --plan`: the tokenizer stage's parameters, memory and compute (the arithmetic and its
sources: `base.plan`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from base.data import micro_batch_size
from base.errors import ConfigError
from base.plan import (
    FP32,
    Hardware,
    ModelStates,
    Workload,
    batch_line,
    compute_lines,
    conv_workload,
    count,
    format_bytes,
    parameter_rows,
    parameter_table,
    per_token_weights,
    plan_report,
    table,
    transformer_workload,
)
from base.teachers import Alignment
from grid.schema import EquivarianceConfig

from .schema import TokenizerRunConfig

__all__ = ["TokenizerParts", "planned_tokenizer", "print_tokenizer_plan", "tokenizer_eval_bytes", "tokenizer_plan",
           "tokenizer_workloads"]


@dataclass
class TokenizerParts:
    """What the tokenizer trainer holds, built on the meta device: the model (EMA'd) and the objective's
    extras (a discriminator, LPIPS), grouped for the parameter table."""

    model: nn.Module
    extras: list[nn.Module]
    groups: dict[str, nn.Module | list[nn.Module | None]]
    notes: list[str]


def planned_tokenizer(cfg: TokenizerRunConfig) -> TokenizerParts:
    """The modules `TokenizerTrainer` builds for `cfg`, on the meta device and without reading any file but a
    REPA teacher's `config.json` (FlexTok's frozen autoencoder is built from this config's grid section)."""
    with torch.device("meta"):
        parts = _grid_parts(cfg) if cfg.tokenizer == "grid" else _flextok_parts(cfg)
        if cfg.repa.weight > 0:
            _add_alignment(cfg, parts)
        return parts


def _add_alignment(cfg: TokenizerRunConfig, parts: TokenizerParts) -> None:
    """The objective's REPA modules: the frozen teacher, built from its `config.json` (its weights are not
    read), and the projectors around it; an extra with a row in the parameter table."""
    from base.teachers import teacher_architecture
    from grid.objectives import GridObjective

    from .model import FlexTokObjective

    teacher = teacher_architecture(cfg.repa.teacher)
    if cfg.tokenizer == "grid":
        alignment = GridObjective.alignment_for(teacher, parts.model)
    else:
        alignment = FlexTokObjective.alignment_for(teacher, parts.model, cfg.repa)
    parts.extras.append(alignment)
    parts.groups["REPA teacher (frozen, objective only)"] = alignment.teacher
    parts.groups["REPA projectors (objective only, not exported)"] = alignment.projectors


def tokenizer_plan(cfg: TokenizerRunConfig, hw: Hardware) -> str:
    """The plan of `train_tokenizer.py` for `cfg` on `hw`, as printable text."""
    parts = planned_tokenizer(cfg)
    t = cfg.train
    accumulation = t.grad_accumulation
    micro = micro_batch_size(t.batch_size, hw.gpus, accumulation)
    workloads = tokenizer_workloads(cfg, parts)
    title = (f"plan: train_tokenizer.py, run '{cfg.name}' ({cfg.tokenizer} tokenizer, "
             f"{cfg.data.resolution}px) on {hw.gpus} GPU(s); nothing is trained or written")
    notes = [f"  {n}" for n in parts.notes]
    batch = [batch_line("train.batch_size", t.batch_size, "images", accumulation, hw)]
    memory = _tokenizer_memory(cfg, parts, workloads, micro, hw)
    compute = compute_lines(workloads, t.batch_size, "image", t.steps, hw)
    return plan_report("\n".join([title, *notes]),
                       [parameter_table(parameter_rows(parts.groups)), batch, memory, compute])


def print_tokenizer_plan(cfg: TokenizerRunConfig, hw: Hardware) -> int:
    print(tokenizer_plan(cfg, hw))
    return 0


def _grid_parts(cfg: TokenizerRunConfig) -> TokenizerParts:
    """`GridAutoencoder` and `GridObjective`'s PatchGAN (loss.adversarial > 0) and LPIPS (loss.lpips > 0,
    from its weight shapes: the weights file is not read)."""
    from base.lpips import LPIPS, lpips_state_dict_shapes
    from grid.autoencoder import GridAutoencoder
    from grid.objectives import PatchDiscriminator

    model = GridAutoencoder(cfg.grid, resolution=cfg.data.resolution)
    groups: dict = {"encoder": model.encoder, "decoder": model.decoder}
    if model.quantizer is not None:
        groups["quantizer"] = model.quantizer
    extras: list[nn.Module] = []
    if cfg.loss.adversarial > 0:
        extras.append(PatchDiscriminator())
        groups["discriminator"] = extras[-1]
    if cfg.loss.lpips > 0:
        extras.append(LPIPS({k: torch.empty(s) for k, s in lpips_state_dict_shapes().items()}))
        groups["LPIPS (frozen)"] = extras[-1]
    notes = []
    if cfg.pixel_loss.weight > 0 or cfg.prior_loss.weight > 0:
        notes.append("pixel_loss and prior_loss apply to the 1D tokenizer only: the grid tokenizer ignores them")
    return TokenizerParts(model, extras, groups, notes)


def _flextok_parts(cfg: TokenizerRunConfig) -> TokenizerParts:
    """FlexTok as `FlexTok.from_config` builds it, its frozen autoencoder's architecture taken from this
    config's grid section (stage 1 of the recipe) instead of the saved `flextok.autoencoder`."""
    from .model import FlexTok

    f, notes = cfg.flextok, []
    if f.input == "latents":
        if cfg.grid.bottleneck != "kl":
            raise ConfigError("grid.bottleneck: flextok.input=latents plans its frozen autoencoder from the grid "
                              f"section, which must be a KL autoencoder (got {cfg.grid.bottleneck})")
        notes.append(f"frozen autoencoder: this config's grid section (f{cfg.grid.downsample}, "
                     f"{cfg.grid.latent_channels} channels, KL) stands in for flextok.autoencoder={f.autoencoder}")
    if cfg.loss.adversarial > 0 or cfg.loss.lpips > 0:
        notes.append("loss.adversarial and loss.lpips apply to the grid tokenizer only (stage 1): FlexTok's "
                     "objective has neither")
    if cfg.equivariance.weight > 0:
        notes.append("equivariance applies to the grid tokenizer only (stage 1): the 1D tokenizer has no spatial "
                     "latent to transform")
    ae = dataclasses.asdict(cfg.grid) if f.input == "latents" else None
    model = FlexTok(f, cfg.data.resolution, autoencoder_config=ae)
    groups: dict = {"autoencoder (frozen)": model.autoencoder} if model.autoencoder is not None else {}
    groups.update({"encoder": model.encoder, "decoder": model.decoder,
                   "other (to_code, code_to_cond, register_pos, mask_token)":
                   [model.to_code, model.quantizer, model.code_to_cond, _own_parameters(model)]})
    return TokenizerParts(model, _flextok_extras(cfg, model, groups), groups, notes)


def _flextok_extras(cfg: TokenizerRunConfig, model: nn.Module, groups: dict) -> list[nn.Module]:
    """`FlexTokObjective`'s own modules: the joint prior (prior_loss) and LPIPS (pixel_loss.lpips, from its
    weight shapes: the weights file is not read); each also gets a row in `groups`."""
    from base.lpips import LPIPS, lpips_state_dict_shapes

    from .model import FlexTokObjective

    extras = []
    if cfg.prior_loss.weight > 0:
        extras.append(FlexTokObjective(model, prior_loss=cfg.prior_loss).joint_prior)
        groups["joint prior (prior_loss; objective only, not exported)"] = extras[-1]
    if cfg.pixel_loss.weight > 0 and cfg.pixel_loss.lpips > 0:
        extras.append(LPIPS({k: torch.empty(s) for k, s in lpips_state_dict_shapes().items()}))
        groups["LPIPS (frozen, pixel_loss)"] = extras[-1]
    return extras


def _own_parameters(model: nn.Module) -> nn.Module:
    """A module holding `model`'s direct parameters (not its children's), for counting."""
    holder = nn.Module()
    for name, p in model.named_parameters(recurse=False):
        holder.register_parameter(name, p)
    return holder


def tokenizer_workloads(cfg: TokenizerRunConfig, parts: TokenizerParts) -> list[Workload]:
    """Per-image workloads of one training step."""
    from grid.autoencoder import ResBlock
    from grid.objectives import PatchDiscriminator

    if cfg.tokenizer != "grid":
        return _flextok_workloads(cfg, parts.model) + _flextok_term_workloads(cfg, parts) + _repa_workloads(cfg, parts)
    m, res, g = parts.model, cfg.data.resolution, cfg.grid
    side = res // g.downsample
    work = [conv_workload("encoder", m.encoder, (3, res, res), blocks=(ResBlock,)),
            conv_workload("decoder", m.decoder, (g.latent_channels, side, side), blocks=(ResBlock,))]
    if cfg.equivariance.weight > 0:
        work.append(_equivariance_workload(cfg.equivariance, work[-1]))
    for extra in parts.extras:
        if isinstance(extra, Alignment):
            continue  # `_repa_workloads`
        if isinstance(extra, PatchDiscriminator):
            # generator term: forward + input gradient (2); the discriminator's own term on real and on
            # reconstructed images: forward + weight gradients (2 each); only from loss.adversarial_start
            probe = conv_workload("discriminator", extra, (3, res, res))
            work.append(dataclasses.replace(probe, passes=6.0, activations=3 * probe.activations,
                                            checkpointed=3 * probe.activations,
                                            start_step=cfg.loss.adversarial_start))
        else:  # LPIPS, frozen: forward on both images, backward to the reconstruction
            work.append(conv_workload("LPIPS (frozen)", extra.features, (3, res, res), passes=3.0))
    return work + _repa_workloads(cfg, parts)


class _PatchFeatures(nn.Module):
    """A teacher's `patch_features` as a module's forward, for `conv_workload`."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.patch_features(images)


def _repa_workloads(cfg: TokenizerRunConfig, parts: TokenizerParts) -> list[Workload]:
    """REPA, per image: the teacher's forward on the clean image (under no_grad: nothing kept; the FLOPs of
    its convolutions and linear layers), and each projector over its rows (forward + backward): the decoder's
    patch positions of every prefix copy, the encoder's patch positions, or a grid's latent positions."""
    alignment = next((extra for extra in parts.extras if isinstance(extra, Alignment)), None)
    if alignment is None:
        return []
    res, m = cfg.data.resolution, parts.model
    probe = conv_workload("REPA teacher (frozen)", _PatchFeatures(alignment.teacher), (3, res, res))
    work = [dataclasses.replace(probe, passes=1.0, activations=0.0, checkpointed=0.0)]
    if cfg.tokenizer == "grid":
        rows = {"latents": m.grid_size**2}
    else:
        rows = {"decoder": cfg.flextok.decoder_rows_per_image * m.grid**2, "encoder": m.grid**2}
    for name, projector in alignment.projectors.items():
        work.append(conv_workload(f"REPA projector ({name})", projector, (rows[name], alignment.widths[name])))
    return work


def _equivariance_workload(eq: EquivarianceConfig, decoder: Workload) -> Workload:
    """One more decoder pass on `eq.fraction` of the images, over a latent grid of 1/factor^2 the area for
    a downscale (a conv net's cost and activations scale with it), averaged over the equally likely
    transforms."""
    from grid.objectives import equivariance_transforms

    transforms = equivariance_transforms(eq)
    area = sum(1 / t.factor**2 for t in transforms) / len(transforms)
    kept = eq.fraction * area
    return dataclasses.replace(decoder, name=f"decoder (equivariance, {eq.fraction:g} of the images)",
                               forward_flops=area * decoder.forward_flops, passes=eq.fraction * decoder.passes,
                               activations=kept * decoder.activations, checkpointed=kept * decoder.checkpointed,
                               formula=f"the decoder's x {area:.3g}, the transforms' mean latent area")


def _flextok_workloads(cfg: TokenizerRunConfig, m: nn.Module) -> list[Workload]:
    """The frozen autoencoder's encode (input: latents; under no_grad: one forward, nothing kept), then
    the register encoder and the decoder, both over patch tokens + registers."""
    f, work = cfg.flextok, []
    if m.autoencoder is not None:
        res = cfg.data.resolution
        probe = conv_workload("autoencoder encode (frozen)", m.autoencoder.encoder, (3, res, res))
        work.append(dataclasses.replace(probe, passes=1.0, activations=0.0, checkpointed=0.0))
    seq = m.grid**2 + f.num_registers
    encoder_w = sum(per_token_weights(x) for x in (m.encoder, m.to_code, m.code_to_cond))
    work.append(transformer_workload("encoder", encoder_w, f.depth, f.dim, f.heads, seq))
    decoder = transformer_workload(f"decoder ({f.decoder})", per_token_weights(m.decoder), f.decoder_depth,
                                   f.decoder_dim, f.decoder_heads, seq)
    n = f.decoder_rows_per_image
    if n > 1:  # n decoder rows per image: its passes and kept activations n-fold
        decoder = dataclasses.replace(decoder, name=f"{decoder.name} x {n} prefixes per image",
                                      passes=n * decoder.passes, activations=n * decoder.activations,
                                      checkpointed=n * decoder.checkpointed)
    work.append(decoder)
    return work


def _flextok_term_workloads(cfg: TokenizerRunConfig, parts: TokenizerParts) -> list[Workload]:
    """The optional terms of `FlexTokObjective`, per image: pixel_loss decodes every decoder row's x̂0 through
    the frozen autoencoder (forward + the backward to its input: 2 passes; input 'pixels' decodes nothing)
    and runs LPIPS on it (forward on both images, backward to the decode: 3); prior_loss runs the joint
    prior over the R codes plus its R x V logits (2·dim·V FLOPs and two fp32 copies kept per token)."""
    from base.lpips import LPIPS

    from .joint_prior import JointPrior

    m, f, res, work = parts.model, cfg.flextok, cfg.data.resolution, []
    n = f.decoder_rows_per_image
    if cfg.pixel_loss.weight > 0 and m.autoencoder is not None:
        ae, side = m.autoencoder, m.autoencoder.grid_size
        probe = conv_workload("autoencoder decode (frozen, pixel_loss)", ae.decoder,
                              (ae.config.latent_channels, side, side), passes=2.0)
        work.append(dataclasses.replace(probe, passes=2.0 * n, activations=n * probe.activations,
                                        checkpointed=n * probe.activations))
    for extra in parts.extras:
        if isinstance(extra, LPIPS):
            probe = conv_workload("LPIPS (frozen, pixel_loss)", extra.features, (3, res, res))
            work.append(dataclasses.replace(probe, passes=3.0 * n, activations=n * probe.activations,
                                            checkpointed=n * probe.checkpointed))
        elif isinstance(extra, JointPrior):
            p, r, v = cfg.prior_loss, f.num_registers, m.vocab_size
            prior = transformer_workload("joint prior (prior_loss)", per_token_weights(extra), p.depth, p.dim,
                                         p.heads, r, extra_activations=2 * FP32 * r * v)
            work.append(dataclasses.replace(prior, forward_flops=prior.forward_flops + 2 * p.dim * v * r,
                                            formula=f"{prior.formula}, + 2·dim·V·s logits, V={v}"))
    return work


def tokenizer_eval_bytes(cfg: TokenizerRunConfig, parts: TokenizerParts, images: int, encode: bool = True,
                         prefixes: int | None = None) -> float:
    """Peak bytes that running `images` images through the tokenizer under no_grad adds on one GPU:
    encoding them (`encode`), then decoding each from `prefixes` token prefixes (default: every prefix
    length evaluation decodes; a 1D decoder also runs the guidance pair where the scale is not 0 or 1).
    The phases run one after another: the largest counts, plus the fp32 reconstructions held."""
    from .nested_dropout import powers_of_two_upto

    res, m = cfg.data.resolution, parts.model
    pixels = FP32 * 3 * res * res  # one image
    conv = lambda name, net, shape: conv_workload(name, net, shape).activations  # noqa: E731
    if cfg.tokenizer == "grid":
        side = res // cfg.grid.downsample
        phases = [conv("encoder", m.encoder, (3, res, res))] if encode else []
        phases.append(conv("decoder", m.decoder, (cfg.grid.latent_channels, side, side)))
        return images * (max(phases) + pixels)
    f = cfg.flextok
    if prefixes is None:
        prefixes = 1 if f.token_set else len(powers_of_two_upto(f.num_registers))
    pair = 1 if f.sampling.guidance_scale in (0.0, 1.0) else 2
    seq = m.grid**2 + f.num_registers
    phases = [34 * seq * f.decoder_dim * images * prefixes * pair]  # one decoder layer over every row
    if encode:
        phases.append(34 * seq * f.dim * images)  # one encoder layer
    if m.autoencoder is not None:
        ae, side = m.autoencoder, m.autoencoder.grid_size
        phases.append(images * prefixes * conv("ae decoder", ae.decoder, (ae.config.latent_channels, side, side)))
        if encode:
            phases.append(images * conv("ae encoder", ae.encoder, (3, res, res)))
    return max(phases) + images * prefixes * pixels


def _tokenizer_memory(cfg: TokenizerRunConfig, parts: TokenizerParts, workloads: list[Workload], micro: int,
                      hw: Hardware) -> list[str]:
    """`TokenizerTrainer` replicates everything on every GPU (DDP): fp32 weights of the model and its
    extras, an fp32 EMA copy of the model, fp32 gradients and AdamW's two fp32 moments of the trainable
    ones, and (N > 1) DDP's gradient buckets, one more fp32 copy of the gradients."""
    modules = [parts.model, *parts.extras]
    trainable, ema = count(modules, trainable=True), FP32 * count(parts.model)
    buckets = FP32 * trainable if hw.gpus > 1 else 0.0
    states = ModelStates(FP32 * count(modules), FP32 * trainable, 2 * FP32 * trainable, ema + buckets)
    enabled = bool(getattr(cfg.train, "activation_checkpointing", False))
    acts = micro * sum(w.activations for w in workloads)
    ckpt = micro * sum(w.checkpointed for w in workloads)
    rows = [("weights (fp32, every parameter)", format_bytes(states.weights)),
            ("EMA copy of the model (fp32)", format_bytes(ema)),
            ("gradients (fp32, trainable)", format_bytes(states.gradients)),
            ("AdamW moments (2 x fp32, trainable)", format_bytes(states.optimizer)),
            ("DDP gradient buckets (fp32, N > 1)", format_bytes(buckets)),
            (f"activations of {micro} image(s), no checkpointing", format_bytes(acts)),
            (f"activations of {micro} image(s), checkpointing", format_bytes(ckpt)),
            (f"total (train.activation_checkpointing: {str(enabled).lower()})",
             format_bytes(states.total + (ckpt if enabled else acts)))]
    chunk = min(cfg.train.eval_batch_size, cfg.data.eval_images)
    evaluation = tokenizer_eval_bytes(cfg, parts, chunk)
    rows += [(f"evaluation on rank 0, {chunk} of {cfg.data.eval_images:,} held-out images at a time",
              format_bytes(evaluation)),
             ("total at evaluation (the gradients are freed by then)",
              format_bytes(states.total - states.gradients + evaluation))]
    return ["memory per GPU: the tokenizer trainer is plain PyTorch / DDP (fp32 weights, bf16 autocast on "
            "CUDA): every GPU holds everything, no ZeRO",
            *table(["", "bytes"], rows),
            "  activations: transformers 34·s·b·h bytes per layer (flash attention; 2·s·b·h per layer + one "
            "layer's 34·s·b·h when checkpointed: Korthikanti et al. 2022); conv nets: what autograd saves, "
            "measured on the meta device (fp32)",
            "  evaluation (train.eval_batch_size images at a time, under no_grad): the largest phase, one transformer "
            "layer's 34·s·b·h over every decoded row (prefixes x guidance pair) or a conv net's training-forward "
            "activations (an upper bound), plus the reconstructions"]
