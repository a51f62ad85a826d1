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
    """The modules `TokenizerTrainer` builds for `cfg`, on the meta device and without reading any file
    (FlexTok's frozen autoencoder is built from this config's grid section)."""
    with torch.device("meta"):
        return _grid_parts(cfg) if cfg.tokenizer == "grid" else _flextok_parts(cfg)


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
    batch = [f"batch: train.batch_size = {t.batch_size} images per optimizer step = {micro} per GPU x "
             f"{accumulation} accumulation step(s) x {hw.gpus} GPU(s)"]
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
    return TokenizerParts(model, extras, groups, [])


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
    ae = dataclasses.asdict(cfg.grid) if f.input == "latents" else None
    model = FlexTok(f, cfg.data.resolution, autoencoder_config=ae)
    groups: dict = {"autoencoder (frozen)": model.autoencoder} if model.autoencoder is not None else {}
    groups.update({"encoder": model.encoder, "decoder": model.decoder,
                   "other (to_code, code_to_cond, register_pos, mask_token)":
                   [model.to_code, model.quantizer, model.code_to_cond, _own_parameters(model)]})
    return TokenizerParts(model, [], groups, notes)


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
        return _flextok_workloads(cfg, parts.model)
    m, res, g = parts.model, cfg.data.resolution, cfg.grid
    side = res // g.downsample
    work = [conv_workload("encoder", m.encoder, (3, res, res), blocks=(ResBlock,)),
            conv_workload("decoder", m.decoder, (g.latent_channels, side, side), blocks=(ResBlock,))]
    for extra in parts.extras:
        if isinstance(extra, PatchDiscriminator):
            # generator term: forward + input gradient (2); the discriminator's own term on real and on
            # reconstructed images: forward + weight gradients (2 each); only from loss.adversarial_start
            probe = conv_workload("discriminator", extra, (3, res, res))
            work.append(dataclasses.replace(probe, passes=6.0, activations=3 * probe.activations,
                                            checkpointed=3 * probe.activations,
                                            start_step=cfg.loss.adversarial_start))
        else:  # LPIPS, frozen: forward on both images, backward to the reconstruction
            work.append(conv_workload("LPIPS (frozen)", extra.features, (3, res, res), passes=3.0))
    return work


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
    work.append(transformer_workload(f"decoder ({f.decoder})", per_token_weights(m.decoder), f.decoder_depth,
                                     f.decoder_dim, f.decoder_heads, seq))
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
    chunk = min(getattr(cfg.train, "eval_batch_size", cfg.data.eval_images), cfg.data.eval_images)
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
