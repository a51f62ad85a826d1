"""`--plan`: size a training run before renting the cluster for it.

Prints a config's parameters, per-GPU memory, FLOPs per optimizer step and the wall-clock time of its
configured run at a stated MFU. Models are built on the meta device (shapes only: 1d_256's 840M-parameter
tokenizer costs no memory); nothing is trained or written, and no data, saved model or GPU is needed.
This module holds the model-agnostic arithmetic (every formula is here); `flextok.plan` builds the
tokenizer plan on it and `priors.plan` the prior's.

Symbols: Ψ parameters, N GPUs, b sequences (images) per micro-batch, s tokens per sequence, h width,
a attention heads, L layers, V output classes.

* Model states per GPU, mixed-precision AdamW (Rajbhandari et al. 2020, "ZeRO", §3, Fig. 1, K = 12):
  bf16 weights 2Ψ + bf16 gradients 2Ψ + fp32 master weights, momentum and variance 12Ψ. ZeRO stage 1
  divides the 12Ψ by N, stage 2 the gradients too, stage 3 the weights too (fp32 training: 4Ψ + 4Ψ + 8Ψ,
  the moments only; an offloaded optimizer keeps its state in host memory). DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs`, `..._zero3_...`) budget 18Ψ/N where this counts 14Ψ/N
  (stage 2) or 16Ψ/N (stage 3), for fp32 gradient partitions and buffers, and stage 3 also gathers the
  largest layer whole; those are left out here.
* Activations kept for backward (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", §4.1, 16-bit): s·b·h·(34 + 5·a·s/h) bytes per layer. Flash attention (every
  model here) never stores the a·s² attention scores, leaving 34·s·b·h. With activation checkpointing
  (full recomputation, ibid. §4.2) a layer keeps its 2·s·b·h input and one layer at a time is rebuilt.
  Convolutional nets are measured instead: the tensors autograd saves in one meta-device forward pass.
* Evaluation (rank 0, under no_grad, `train.eval_batch_size` images at a time) keeps nothing for
  backward: its peak is bounded by one phase's working set, a transformer layer's 34·s·b·h at a time and
  a conv net's whole training-forward activations (an upper bound), plus the reconstructions it holds.
* FLOPs (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1; Chowdhery et al. 2022,
  "PaLM", App. B): a forward pass costs 2·W·s for the W weights applied to every token, plus 4·L·h·s²
  for the attention scores and their weighted sum; backward costs twice the forward, so training is
  6·W·s + 12·L·h·s² per sequence (lookup tables and once-per-sample conditioning are not in W).
  Convolutions: 2·(multiply-adds), counted from the layer shapes of a meta-device forward pass.
* Time = FLOPs / (N · peak · MFU), model FLOPs utilization as PaLM defines it (App. B).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from .data import micro_batch_size
from .errors import UserError

__all__ = [
    "BF16", "DEFAULT_MFU", "DEFAULT_PEAK_TFLOPS", "FP32", "PRECISION_BYTES", "ZERO_STAGES", "Hardware", "ModelStates",
    "Workload",
    "add_plan_arguments", "batch_line", "compute_lines", "conv_workload", "count", "format_bytes", "format_count",
    "format_flops", "format_time", "hardware_from_args", "parameter_rows", "parameter_table", "per_token_weights",
    "plan_report", "run_flops", "run_seconds", "step_flops", "table",
    "transformer_workload", "zero_model_states",
]

DEFAULT_PEAK_TFLOPS = 989.0  # NVIDIA H100 SXM5, dense bf16 tensor cores (1,979 is the 2:4-sparse figure)
DEFAULT_MFU = 0.4
ZERO_STAGES = (0, 1, 2, 3)
BF16, FP32 = 2, 4  # bytes per value
# bytes per parameter of (weights, gradients, AdamW state) by training precision: 16-bit training keeps
# fp32 master weights, momentum and variance (K = 12 in the ZeRO paper); fp32 training only the moments
PRECISION_BYTES = {"bf16": (BF16, BF16, 12), "fp16": (BF16, BF16, 12), "fp32": (FP32, FP32, 8)}


# ---------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """The cluster a plan is for."""

    gpus: int = 1
    mfu: float = DEFAULT_MFU
    peak_tflops: float = DEFAULT_PEAK_TFLOPS

    def describe(self) -> str:
        gpu = " (H100 SXM, bf16 dense: the default)" if self.peak_tflops == DEFAULT_PEAK_TFLOPS else ""
        return f"{self.gpus} GPU(s) x {self.peak_tflops:g} TFLOP/s peak{gpu} at {self.mfu:.0%} MFU"


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """`--plan` and the cluster it sizes (`--gpus`, `--mfu`, `--peak-tflops`)."""
    group = parser.add_argument_group("sizing (--plan: print parameters, memory, FLOPs and time; train nothing)")
    group.add_argument("--plan", action="store_true", help="print the plan of this config's run and exit")
    group.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default 1)")
    group.add_argument("--mfu", type=float, default=None, help=f"model FLOPs utilization (default {DEFAULT_MFU})")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help=f"peak bf16 TFLOP/s per GPU (default {DEFAULT_PEAK_TFLOPS:g}: H100 SXM, dense)")


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    """The `--plan` options as a `Hardware`; a bad value is a one-line user error naming the option."""
    given = {"--gpus": args.gpus, "--mfu": args.mfu, "--peak-tflops": args.peak_tflops}
    if not args.plan:
        for flag, value in given.items():
            if value is not None:
                raise UserError(f"{flag}: only used with --plan")
    default = Hardware()
    hw = Hardware(gpus=default.gpus if args.gpus is None else args.gpus,
                  mfu=default.mfu if args.mfu is None else args.mfu,
                  peak_tflops=default.peak_tflops if args.peak_tflops is None else args.peak_tflops)
    if hw.gpus < 1:
        raise UserError(f"--gpus: must be at least 1, got {hw.gpus}")
    if not 0 < hw.mfu <= 1:
        raise UserError(f"--mfu: must be in (0, 1], got {hw.mfu}")
    if not hw.peak_tflops > 0:
        raise UserError(f"--peak-tflops: must be positive, got {hw.peak_tflops}")
    return hw


# ---------------------------------------------------------------------------------------------- parameters


def count(modules: nn.Module | Iterable[nn.Module | None], trainable: bool = False) -> int:
    """Parameters of `modules` (shared ones once); only those with `requires_grad` when `trainable`."""
    modules = [modules] if isinstance(modules, nn.Module) else [m for m in modules if m is not None]
    seen = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad or not trainable)


def per_token_weights(module: nn.Module, per_sample: Sequence[str] = ("time_mlp",)) -> int:
    """W of the FLOPs formula: weights of the linear layers that every token goes through.

    Embedding tables and free parameters (positions, registers, mask tokens) are lookups, not matmuls.
    The modules named in `per_sample`, and the condition projections of x-transformers' adaptive norms
    and layer scales (the linear children of an `Adaptive*` module; a layer scale also wraps its branch,
    which does count), see one condition vector per sample: their cost does not grow with the sequence."""
    skipped = {id(p) for name, m in module.named_modules() if name.split(".")[-1] in per_sample for p in m.parameters()}
    skipped |= {id(p) for m in module.modules() if type(m).__name__.startswith("Adaptive")
                for child in m.children() if isinstance(child, nn.Linear) for p in child.parameters()}
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear)
               for p in m.parameters(recurse=False) if id(p) not in skipped)


def parameter_rows(groups: dict[str, nn.Module | list[nn.Module | None]]) -> list[tuple[str, int, int]]:
    """(name, total, trainable) per named group of modules, then the total over all of them."""
    rows = [(name, count(mods), count(mods, trainable=True)) for name, mods in groups.items()]
    everything = [m for mods in groups.values() for m in ([mods] if isinstance(mods, nn.Module) else mods)]
    return rows + [("total", count(everything), count(everything, trainable=True))]


# ---------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of what training keeps besides activations."""

    weights: float
    gradients: float
    optimizer: float
    extra: float = 0.0  # e.g. an EMA copy or DDP's gradient buckets

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.extra


def zero_model_states(params: int, stage: int, gpus: int, precision: str = "bf16",
                      offload_optimizer: bool = False) -> ModelStates:
    """DeepSpeed + AdamW under ZeRO `stage` on `gpus` GPUs (Rajbhandari et al. 2020, Fig. 1): in bf16,
    2Ψ + 2Ψ + 12Ψ, with stage >= 1 dividing the optimizer state by N, >= 2 the gradients, 3 the weights.
    An offloaded optimizer keeps its state in host memory: none of it on the GPU."""
    weights, gradients, optimizer = PRECISION_BYTES[precision]
    share = lambda partitioned_from: 1 / gpus if stage >= partitioned_from else 1.0  # noqa: E731
    return ModelStates(weights=weights * params * share(3), gradients=gradients * params * share(2),
                       optimizer=0.0 if offload_optimizer else optimizer * params * share(1))


# ---------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """One network's share of a training step, per sample (image or sequence)."""

    name: str
    tokens: int  # positions per sample of a transformer; 0 for a conv net
    forward_flops: float
    passes: float  # forward-pass equivalents per step: 3 = forward + backward, 1 = frozen under no_grad
    activations: float  # bytes kept for backward per sample
    checkpointed: float  # the same with activation checkpointing
    formula: str
    start_step: int = 0  # runs from this optimizer step on (a GAN's discriminator)

    @property
    def train_flops(self) -> float:
        return self.passes * self.forward_flops


def transformer_workload(name: str, weights: int, layers: int, width: int, heads: int, seq: int,
                         passes: float = 3.0, extra_activations: float = 0.0) -> Workload:
    """A transformer stack: 2·W·s + 4·L·h·s² forward FLOPs (PaLM App. B), 34·s·h bytes per layer kept
    with flash attention, 2·s·h per layer plus one layer's 34·s·h when checkpointed (Korthikanti §4)."""
    flops = 2 * weights * seq + 4 * layers * width * seq**2
    kept = passes > 1  # a frozen pass under no_grad keeps nothing
    full = (34 * seq * width * layers + extra_activations) if kept else 0.0
    recomputed = (2 * seq * width * layers + 34 * seq * width + extra_activations) if kept else 0.0
    formula = f"2·W·s + 4·L·h·s², W={format_count(weights)}, L={layers}, h={width}, s={seq}"
    return Workload(name, seq, flops, passes, full, recomputed, formula)


def conv_workload(name: str, module: nn.Module, input_shape: tuple[int, ...], passes: float = 3.0,
                  blocks: tuple[type, ...] = ()) -> Workload:
    """A convolutional net, measured by one forward pass of a single sample on the meta device: FLOPs =
    2 x the multiply-adds of every Conv2d/Linear; activations = the bytes autograd saves (fp32 there;
    under bf16 autocast convolution inputs are saved in bf16, so this errs high). Checkpointing `blocks`
    keeps each block's input and rebuilds one block at a time."""
    probe = _ConvProbe(module, blocks)
    with probe, torch.device("meta"):
        out = module(torch.zeros((1, *input_shape)))
    kept = passes > 1
    checkpointed = probe.outside + sum(probe.block_inputs) + max(probe.block_inside, default=0.0)
    shapes = "x".join(map(str, input_shape)) + " -> " + "x".join(map(str, out.shape[1:]))
    formula = f"2·multiply-adds of its layers, {shapes} (meta-device shapes)"
    return Workload(name, 0, 2.0 * probe.macs, passes, probe.saved if kept else 0.0,
                    checkpointed if kept else 0.0, formula)


class _ConvProbe:
    """Forward hooks counting multiply-adds, and saved-tensor hooks counting what backward would keep
    (split into inside / outside the checkpointable `blocks`)."""

    def __init__(self, module: nn.Module, blocks: tuple[type, ...]):
        self.module, self.blocks = module, blocks
        self.macs, self.saved, self.outside = 0, 0.0, 0.0
        self.block_inputs: list[float] = []
        self.block_inside: list[float] = []
        self._depth, self._seen = 0, set()
        self._params = {id(p) for p in module.parameters()}
        self._handles: list = []

    def __enter__(self):
        for m in self.module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self._handles.append(m.register_forward_hook(self._count_macs))
            if self.blocks and isinstance(m, self.blocks):
                self._handles.append(m.register_forward_pre_hook(self._enter_block))
                self._handles.append(m.register_forward_hook(self._leave_block))
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._saving.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._saving.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def _count_macs(self, m: nn.Module, _inputs, out: torch.Tensor) -> None:
        fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
        self.macs += out.numel() * fan_in

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        if id(x) not in self._params and id(x) not in self._seen:  # weights are not activations
            self._seen.add(id(x))
            size = x.numel() * x.element_size()
            self.saved += size
            if self._depth:
                self.block_inside[-1] += size
            else:
                self.outside += size
        return x

    def _enter_block(self, _m, inputs) -> None:
        if self._depth == 0:
            self.block_inputs.append(float(sum(t.numel() * t.element_size() for t in inputs)))
            self.block_inside.append(0.0)
        self._depth += 1

    def _leave_block(self, *_args) -> None:
        self._depth -= 1


# ---------------------------------------------------------------------------------------------- step and time


def step_flops(workloads: Sequence[Workload], per_step: int, step: int = 0) -> float:
    """Training FLOPs of one optimizer step over `per_step` samples, at optimizer step `step`."""
    return per_step * sum(w.train_flops for w in workloads if step >= w.start_step)


def run_flops(workloads: Sequence[Workload], per_step: int, steps: int) -> float:
    """Training FLOPs of a whole run of `steps` optimizer steps (networks join at their `start_step`)."""
    return per_step * sum(max(0, steps - w.start_step) * w.train_flops for w in workloads)


def run_seconds(flops: float, hw: Hardware) -> float:
    """Wall-clock seconds of `flops` on `hw.gpus` GPUs at `hw.mfu` of `hw.peak_tflops` each."""
    return flops / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)


# ---------------------------------------------------------------------------------------------- printing


def format_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def format_bytes(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"


def format_flops(n: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} FLOP"


def format_time(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 1:
        return f"{hours:,.1f} h ({hours / 24:,.1f} days)"
    return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:,.1f} s"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "", indent: str = "  ") -> list[str]:
    """Aligned text columns: `align` has one letter per column, l or r (default: the first left, the rest
    right)."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)  # noqa: E731
                                       for c, w, a in zip(r, widths, align)).rstrip()
    return [line(r) for r in cells]


def parameter_table(rows: list[tuple[str, int, int]]) -> list[str]:
    return ["parameters"] + table(["", "total", "trainable"],
                                  [(n, format_count(t), format_count(g)) for n, t, g in rows])


def batch_line(key: str, batch_size: int, unit: str, accumulation: int, hw: Hardware) -> str:
    """How the global batch `key` splits: per GPU, per accumulation micro-step, over the GPUs."""
    micro = micro_batch_size(batch_size, hw.gpus, accumulation, key)
    return (f"batch: {key} = {batch_size:,} {unit} per optimizer step = {micro} per GPU x {accumulation} "
            f"accumulation step(s) x {hw.gpus} GPU(s)")


def compute_lines(workloads: list[Workload], per_step: int, unit: str, steps: int, hw: Hardware) -> list[str]:
    """FLOPs per sample per network, per optimizer step, over the run, and the run's time."""
    rows = [(w.name + (f" (from step {w.start_step:,})" if w.start_step else ""), f"{w.tokens:,}" if w.tokens
             else "-", format_flops(w.forward_flops), f"{w.passes:g}", format_flops(w.train_flops), w.formula)
            for w in workloads]
    per = step_flops(workloads, per_step, step=steps)  # every network running
    total = run_flops(workloads, per_step, steps)
    return [
        f"compute per {unit} (training = passes x forward, a backward pass costing two forwards: "
        "6·W·s + 12·L·h·s² for a trained transformer)",
        *table(["network", "tokens", "forward", "passes", "training", "forward FLOPs"], rows, align="lrrrrl"),
        f"FLOPs per optimizer step: {format_flops(per)} ({per_step:,} {unit}s x the training column"
        + (", once every network runs)" if any(w.start_step for w in workloads) else ")"),
        f"run: {steps:,} steps = {format_flops(total)}; at {hw.describe()}: {format_time(run_seconds(total, hw))}",
    ]


def plan_report(title: str, sections: Sequence[Sequence[str]]) -> str:
    """The title, then the sections separated by blank lines."""
    return "\n\n".join(["\n".join(title.splitlines())] + ["\n".join(s) for s in sections if s])
