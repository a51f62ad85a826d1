"""`train_prior.py --plan`: the prior's parameters, per-GPU memory under ZeRO stages 0-3, FLOPs and the
run's time, from the experiment config alone (the arithmetic and its sources: `flextok.plan`).

`prior.tokenizer` need not exist yet: the token stream is derived from this config's own tokenizer
section (the 1D tokenizer's registers and codebook, or the grid autoencoder's latent grid), and the model
is the one `build_prior` builds, on the meta device. The ZeRO stage, precision and offload are those of
the DeepSpeed config the trainer would run: `prior_train` with the user's JSON merged over it
(`priors.deepspeed_utils.deepspeed_config`, on GPUs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from base.data import micro_batch_size
from base.errors import UserError
from base.plan import (
    BF16,
    FP32,
    PRECISION_BYTES,
    ZERO_STAGES,
    Hardware,
    Workload,
    batch_line,
    compute_lines,
    count,
    format_bytes,
    format_count,
    parameter_rows,
    parameter_table,
    per_token_weights,
    plan_report,
    table,
    transformer_workload,
    zero_model_states,
)
from grid.schema import QuantizerConfig

from .deepspeed_utils import deepspeed_config
from .discrete import DiscretePrior
from .flow import FlowPrior
from .schema import PriorRunConfig
from .token_dataset import TokenSpec
from .trainer import build_prior

__all__ = ["EngineSettings", "PlannedPrior", "codebook_size", "engine_settings", "planned_prior", "planned_tokens",
           "print_prior_plan", "prior_plan", "prior_workload", "sequence_length"]


@dataclass
class PlannedPrior:
    """The prior `build_prior` would build for this config (on the meta device), and its tokens."""

    model: DiscretePrior | FlowPrior
    spec: TokenSpec
    notes: list[str]  # where the token figures come from, and which are bounds


@dataclass(frozen=True)
class EngineSettings:
    """What of the DeepSpeed config the memory plan depends on."""

    zero_stage: int
    precision: str  # bf16 | fp16 | fp32
    offload_optimizer: bool
    offload_params: bool  # ZeRO-3 keeps the weights in host memory
    stage_source: str  # where the stage came from, for the table
    json: str | None  # the user's DeepSpeed JSON, when one is merged


def engine_settings(cfg: PriorRunConfig, hw: Hardware, json_path: str | None = None) -> EngineSettings:
    """The trainer's DeepSpeed config on `hw` (GPUs): `prior_train`, with the JSON (`json_path`, which wins
    over `prior_train.deepspeed_config`) merged and checked by the trainer's own `deepspeed_config`."""
    t = cfg.prior_train
    json_path = json_path or t.deepspeed_config
    ds = deepspeed_config(t, cuda=True, world_size=hw.gpus, user=json_path)
    zero = ds["zero_optimization"]
    precision = "bf16" if ds["bf16"].get("enabled") else "fp16" if ds["fp16"].get("enabled") else "fp32"
    offloaded = lambda key: zero.get(key, {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    stage = int(zero.get("stage", 0))
    source = "prior_train.zero_stage" if stage == t.zero_stage else f"{json_path}: zero_optimization.stage"
    return EngineSettings(stage, precision, offloaded("offload_optimizer") and stage > 0,
                          offloaded("offload_param") and stage == 3, source, json_path)


def codebook_size(q: QuantizerConfig) -> int:
    """Codes of a quantizer config: the product of FSQ levels, else `codebook_size` (VQ, LFQ)."""
    return math.prod(q.fsq_levels) if q.kind == "fsq" else q.codebook_size


def planned_tokens(cfg: PriorRunConfig) -> tuple[TokenSpec, list[str]]:
    """The `TokenSpec` the token cache would report, from this config's tokenizer section and `prior`,
    with notes on its sources and bounds; mismatches the trainer would reject are user errors here too."""
    continuous, vocab, dim, length, token_set, source = _tokenizer_stream(cfg)
    p = cfg.prior
    notes = [f"tokens: {source}; prior.tokenizer={p.tokenizer} is not read"]
    if continuous != (p.kind == "flow"):
        needed = "a quantized tokenizer (integer codes)" if p.kind == "discrete" else "a KL tokenizer (latents)"
        raise UserError(f"prior.kind: {p.kind} needs {needed}, but this config's tokenizer section gives "
                        f"{'continuous latents' if continuous else 'integer codes'} ({source})")
    if p.tokens in ("prefix", "adaptive"):
        length = _prefix_length(cfg, length, token_set, notes)
    elif p.tokens == "bpe":
        vocab = _bpe_vocab(cfg, vocab, notes)
        notes.append(f"BPE only merges: at most {length} tokens per image (an upper bound; the mean is shorter)")
    spec = TokenSpec(continuous=continuous, vocab_size=vocab, token_dim=dim, max_length=length,
                     variable_length=p.tokens in ("adaptive", "bpe"),
                     token_set=token_set and p.tokens in ("full", "prefix"), tokenizer_hash="")
    return spec, notes


def planned_prior(cfg: PriorRunConfig) -> PlannedPrior:
    """`build_prior(cfg, spec, max_length)` on the meta device, for the tokens `planned_tokens` derives."""
    spec, notes = planned_tokens(cfg)
    with torch.device("meta"):
        model = build_prior(cfg, spec, spec.max_length)
    return PlannedPrior(model, spec, notes)


def sequence_length(spec: TokenSpec) -> int:
    """Positions the prior runs per sequence: the tokens (flow); [condition] + L-1 tokens in, L out (fixed
    length); [condition] + L tokens in, L + EOS out (variable length)."""
    return spec.max_length + int(spec.variable_length and not spec.continuous)


def prior_plan(cfg: PriorRunConfig, hw: Hardware, deepspeed_json: str | None = None) -> str:
    """The plan of `train_prior.py` for `cfg` on `hw`, as printable text; `deepspeed_json` is the script's
    `--deepspeed_config`, which wins over `prior_train.deepspeed_config`."""
    engine = engine_settings(cfg, hw, deepspeed_json)
    planned = planned_prior(cfg)
    t, seq = cfg.prior_train, sequence_length(planned.spec)
    sequences = t.batch_size
    title = (f"plan: train_prior.py, run '{cfg.prior_train.run_name or cfg.name}' ({cfg.prior.kind} prior, "
             f"tokens: {cfg.prior.tokens}) on {hw.gpus} GPU(s); nothing is trained or written")
    batch = [batch_line("prior_train.batch_size", sequences, "sequences", t.grad_accumulation, hw)
             + f"; x {seq} positions = {sequences * seq:,} tokens per optimizer step"]
    workload = prior_workload(cfg, planned)
    compute = compute_lines([workload], sequences, "sequence", t.steps, hw)
    return plan_report("\n".join([title, *(f"  {n}" for n in [*planned.notes, _sequence_note(planned)])]),
                       [parameter_table(parameter_rows(_groups(planned.model))), batch,
                        _memory(cfg, planned.model, workload, hw, engine), compute])


def print_prior_plan(cfg: PriorRunConfig, hw: Hardware, deepspeed_json: str | None = None) -> int:
    print(prior_plan(cfg, hw, deepspeed_json))
    return 0


def _tokenizer_stream(cfg: PriorRunConfig) -> tuple[bool, int, int, int, bool, str]:
    """(continuous, vocab, token dim, tokens per image, token set, description) of the tokenizer that
    this config's own sections describe."""
    if cfg.tokenizer == "flextok":
        f = cfg.flextok
        vocab = codebook_size(f.quantizer)
        levels = f" {f.quantizer.fsq_levels}" if f.quantizer.kind == "fsq" else ""
        return (False, vocab, 0, f.num_registers, f.token_set, f"this config's flextok section: "
                f"{f.num_registers} registers, {f.quantizer.kind}{levels} = {vocab:,} codes")
    g, res = cfg.grid, cfg.data.resolution
    side = res // g.downsample
    grid = f"this config's grid section: {res}px / f{g.downsample} = {side}x{side} grid"
    if g.bottleneck == "kl":
        return True, 0, g.latent_channels, side * side, False, f"{grid} of {g.latent_channels}-channel KL latents"
    vocab = codebook_size(g.quantizer)
    return False, vocab, 0, side * side, False, f"{grid} of {g.quantizer.kind} codes ({vocab:,})"


def _prefix_length(cfg: PriorRunConfig, registers: int, token_set: bool, notes: list[str]) -> int:
    """Tokens per image of `prefix` (prefix_length) and `adaptive` (at most every register) streams."""
    p = cfg.prior
    if cfg.tokenizer != "flextok":
        raise UserError(f"prior.tokens: {p.tokens} needs a tokenizer with prefixes (tokenizer: flextok); "
                        f"this config's is {cfg.tokenizer}")
    if token_set and (p.tokens == "adaptive" or p.prefix_length != registers):
        raise UserError(f"prior.tokens: {p.tokens}: token sets (flextok.token_set) have a fixed size of {registers}")
    if p.tokens == "adaptive":
        notes.append(f"adaptive lengths: at most {registers} tokens + EOS (the plan's upper bound; the cache's "
                     f"longest sequence sets the real one)")
        return registers
    if not 1 <= p.prefix_length <= registers:
        raise UserError(f"prior.prefix_length: must be in 1..{registers} (flextok.num_registers), "
                        f"got {p.prefix_length}")
    return p.prefix_length


def _bpe_vocab(cfg: PriorRunConfig, base: int, notes: list[str]) -> int:
    """The codec's vocabulary when `prior.bpe` already holds one, else the base codebook as a lower bound."""
    path = cfg.prior.bpe
    if path and Path(path).is_dir():
        from bpe_image import BPECodec

        try:
            vocab = BPECodec.from_pretrained(path).vocab_size
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"prior.bpe: {path}: {err}") from None
        notes.append(f"BPE vocabulary: {vocab:,} (the codec at prior.bpe={path})")
        return vocab
    notes.append(f"BPE vocabulary: unknown until prior.bpe={path} is trained; the base codebook ({base:,}) is "
                 "used, a LOWER BOUND on the embedding and output head (each merge adds one row to both)")
    return base


def _sequence_note(planned: PlannedPrior) -> str:
    spec, m = planned.spec, planned.model
    seq = sequence_length(spec)
    if isinstance(m, FlowPrior):
        return f"sequence: {seq} latent vectors of {spec.token_dim} channels (flow prior: no EOS, class as condition)"
    out = spec.vocab_size + int(spec.variable_length)
    if spec.variable_length:
        shape = f"[condition] + up to {spec.max_length} tokens in, tokens + EOS out"
    else:
        shape = f"[condition] + {spec.max_length - 1} tokens in, {spec.max_length} tokens out (fixed length, no EOS)"
    return (f"sequence: {shape} = {seq} positions; embedding rows {m.net.token_emb.emb.num_embeddings:,} "
            f"(codes, EOS, null, {m.config.num_classes:,} classes), output head {out:,}")


def _groups(model: nn.Module) -> dict[str, nn.Module | list[nn.Module | None]]:
    """Embeddings vs transformer vs output, for the parameter table."""
    if isinstance(model, FlowPrior):
        inputs = nn.ParameterList([model.pos_emb])
        return {"embeddings and conditioning (in_proj, pos_emb, time_mlp, class_emb)":
                [model.in_proj, inputs, model.time_mlp, model.class_emb],
                f"transformer ({model.config.depth} x {model.config.dim})": model.encoder,
                "output (out_proj)": model.out_proj}
    net = model.net
    rest = [m for name, m in net.named_children() if name not in ("token_emb", "attn_layers", "to_logits")]
    return {f"token + condition embeddings ({net.token_emb.emb.num_embeddings:,} x {model.config.dim})":
            [net.token_emb, *rest],
            f"transformer ({model.config.depth} x {model.config.dim})": net.attn_layers,
            f"output head ({model.config.dim} -> {net.to_logits.out_features:,})": net.to_logits}


def _head_bytes(model: nn.Module, seq: int) -> float:
    """Per sequence, what a discrete prior's cross-entropy keeps for backward: fp32 log-probabilities of
    every position over the output head, 4·s·V bytes (the flow prior's output is `token_dim` wide)."""
    return FP32 * seq * model.net.to_logits.out_features if isinstance(model, DiscretePrior) else 0.0


def prior_workload(cfg: PriorRunConfig, planned: PlannedPrior) -> Workload:
    """The prior's transformer over one sequence (`flextok.plan.transformer_workload`)."""
    p, m, seq = cfg.prior, planned.model, sequence_length(planned.spec)
    return transformer_workload(f"{p.kind} prior", per_token_weights(m), p.depth, p.dim, p.heads, seq,
                                extra_activations=_head_bytes(m, seq))


def _memory(cfg: PriorRunConfig, model: nn.Module, workload: Workload, hw: Hardware,
            engine: EngineSettings) -> list[str]:
    """Model states per ZeRO stage (`flextok.plan.zero_model_states`) plus one micro-batch's activations,
    then what the table leaves out."""
    t, params = cfg.prior_train, count(model, trainable=True)
    precision, offload = engine.precision, engine.offload_optimizer
    scale = FP32 / BF16 if precision == "fp32" else 1.0  # the activation formulas count 16-bit values
    micro = micro_batch_size(t.batch_size, hw.gpus, t.grad_accumulation, "prior_train.batch_size")
    acts, ckpt = scale * micro * workload.activations, scale * micro * workload.checkpointed
    enabled = getattr(t, "activation_checkpointing", None)  # the prior trainer has no such option (yet)
    used, rows = ckpt if enabled else acts, []
    for stage in ZERO_STAGES:
        s = zero_model_states(params, stage, hw.gpus, precision, offload and stage > 0)
        if engine.offload_params and stage == 3:
            s = dataclasses.replace(s, weights=0.0)
        mark = f" ({engine.stage_source})" if stage == engine.zero_stage else ""
        rows.append((f"{stage}{mark}", format_bytes(s.weights), format_bytes(s.gradients),
                     format_bytes(s.optimizer), format_bytes(s.total), format_bytes(s.total + used)))
    head = scale * micro * _head_bytes(model, workload.tokens)
    head = f", of which the output head's 4·s·b·V log-probs {format_bytes(head)}" if head else ""
    checkpointing = ("prior_train has no activation checkpointing: for reference" if enabled is None
                     else f"prior_train.activation_checkpointing: {str(enabled).lower()}")
    weights, gradients, optimizer = PRECISION_BYTES[precision]
    return [
        f"memory per GPU: DeepSpeed AdamW, {precision} (per parameter: weights {weights} B, gradients {gradients} B, "
        f"optimizer state {optimizer} B{' in host memory' if offload else ''}); {format_count(params)} parameters "
        f"on {hw.gpus} GPU(s)",
        *table(["ZeRO stage", "weights", "gradients", "optimizer", "model states", "+ activations"], rows),
        "  stage 1 partitions the optimizer state over the GPUs, 2 also the gradients, 3 also the weights "
        "(Rajbhandari et al. 2020)",
        f"  activations of {micro} sequences x {workload.tokens} positions: {format_bytes(acts)} "
        f"(34·s·b·h per layer, flash attention{head}); with checkpointing {format_bytes(ckpt)} ({checkpointing})",
        *_memory_notes(cfg, params, hw, engine),
    ]


def _memory_notes(cfg: PriorRunConfig, params: int, hw: Hardware, engine: EngineSettings) -> list[str]:
    """What the table leaves out: rank 0's extra copies, DeepSpeed's own buffers, offloaded state."""
    precision, offload = engine.precision, engine.offload_optimizer
    partition = format_bytes(FP32 * params / hw.gpus)
    notes = [f"  rank 0, at evaluation and sample steps: an fp32 copy of the model, +{format_bytes(FP32 * params)}"
             + _tokenizer_note(cfg),
             f"  not counted: DeepSpeed's fp32 gradient partitions and buffers (its estimator adds 4Ψ/N = {partition} "
             "at stage 2), ZeRO-3's gathered largest layer, the CUDA context (~0.5-1 GiB), fragmentation"]
    if offload:
        host = PRECISION_BYTES[precision][2] * params / hw.gpus
        notes.append(f"  optimizer offload: {format_bytes(host)} of optimizer state per rank in host memory")
    if engine.offload_params:
        notes.append(f"  parameter offload (ZeRO-3): {format_bytes(PRECISION_BYTES[precision][0] * params / hw.gpus)} "
                     "of weights per rank in host memory, none on the GPU")
    if engine.json:
        notes.append(f"  DeepSpeed JSON {engine.json} merged over prior_train, as the trainer does: ZeRO stage "
                     f"{engine.zero_stage}, {precision}, optimizer offload {'on' if offload else 'off'}, "
                     f"parameter offload {'on' if engine.offload_params else 'off'}")
    return notes


def _tokenizer_note(cfg: PriorRunConfig) -> str:
    """Rank 0 keeps the tokenizer to decode its sample grids: its size, from this config's section."""
    from flextok.plan import planned_tokenizer, tokenizer_eval_bytes

    try:
        parts = planned_tokenizer(cfg)
    except UserError:  # a tokenizer section the tokenizer plan cannot build: say nothing
        return ""
    tokenizer, chunk = parts.model, min(cfg.prior_train.eval_batch_size, max(cfg.prior_train.num_samples, 1))
    decode = tokenizer_eval_bytes(cfg, parts, chunk, encode=False, prefixes=1)
    return (f"; it also keeps the tokenizer for sample grids ({format_count(count(tokenizer))} parameters, "
            f"{format_bytes(FP32 * count(tokenizer))} in fp32 wherever it sits), which decodes {chunk} samples at a "
            f"time (prior_train.eval_batch_size): up to {format_bytes(decode)} more")
