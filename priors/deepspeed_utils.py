"""DeepSpeed plumbing for `train_prior.py`: process group, engine config, the training skeleton's
`DeepSpeedBackend`, export.

A checkpoint is DeepSpeed's files in checkpoints/<tag>/, written by every rank; the skeleton's pointer
(`base.training.POINTER`) names the latest complete one, and DeepSpeed's own `latest` file is never written.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from base.data import micro_batch_size
from base.distributed import WAIT_TIMEOUT
from base.errors import UserError
from base.runtime import warmup_cosine
from base.training import read_pointer

from .schema import PriorTrainConfig

__all__ = ["DeepSpeedBackend", "build_model", "consolidated_weights", "create_engine", "deepspeed_config",
           "gathered_state_dict", "init_distributed", "local_device_name", "param_groups"]

# the batch keys the data order is scheduled from: a user's JSON must agree with prior_train on each
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def init_distributed(timeout_minutes: float = WAIT_TIMEOUT) -> tuple[int, int]:
    """Initialize DeepSpeed's process group once per process; returns (rank, world_size). `timeout_minutes`
    (`distributed.wait_timeout`) bounds the join and every later collective.

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (about 95 s on 2 cores)
    when the group starts. Only DeepSpeed-inference's tensor-parallel all-reduce uses it; training
    collectives go through gloo. Marking the op incompatible first skips the compile entirely.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def local_device_name() -> str:
    """This rank's device ("cpu", or "cuda:<local rank>")."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))


def deepspeed_config(t: PriorTrainConfig, cuda: bool, world_size: int, user: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a `prior_train` section, with the user's JSON (`user`) merged over it.

    The JSON wins wherever it sets a key (offload, buckets, precision, optimizer, ZeRO stage, ...),
    except the batch sizes that schedule the data (`prior_train.batch_size`, the global batch, split over
    `world_size` ranks and `grad_accumulation` micro-steps): a JSON that sets them otherwise is an error,
    as is a `scheduler` (the schedule is `prior_train.warmup_steps` / `steps`).

    AdamW runs as torch's own fused kernel (`torch_adam`, `fused`: one pass over all parameters instead
    of a dozen small ops per tensor), so no DeepSpeed op is compiled on CPU or needs nvcc on GPUs;
    with optimizer offload, `zero_force_ds_cpu_optimizer: false` lets that torch AdamW step on the CPU
    copy (set it true in the JSON, with DeepSpeed's CPU Adam, for speed on GPU nodes).
    """
    precision = t.precision if t.precision != "auto" else ("bf16" if cuda else "fp32")
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(t.batch_size, world_size, t.grad_accumulation,
                                                           key="prior_train.batch_size"),
        "gradient_accumulation_steps": t.grad_accumulation,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay,
                       "torch_adam": True, "fused": True},
        },
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**31 - 1,  # our own logging only
        "wall_clock_breakdown": False,
    }
    if user is None:
        return config
    merged = _merged(config, _read_json(user))
    for key in BATCH_KEYS:
        if merged[key] != config[key]:
            raise UserError(f"{user}: {key}={merged[key]} disagrees with {config[key]} from prior_train.batch_size="
                            f"{t.batch_size}, grad_accumulation={t.grad_accumulation} on {world_size} rank(s)")
    if "scheduler" in merged:
        raise UserError(f"{user}: remove 'scheduler' (the LR schedule is prior_train.lr / warmup_steps / steps)")
    if merged["bf16"].get("enabled") and merged["fp16"].get("enabled"):
        raise UserError(f"{user}: bf16 and fp16 are both enabled")
    return merged


def _read_json(path: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"prior_train.deepspeed_config: {path} not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: a DeepSpeed config is a JSON object")
    return value


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursively for nested sections."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_model(build: Callable[[], torch.nn.Module], config: dict[str, Any]) -> torch.nn.Module:
    """`build()`, already partitioned across ranks under ZeRO-3 (`deepspeed.zero.Init`): no rank ever
    holds the full parameters.

    zero.Init partitions each module's own parameters when its `__init__` returns, so writes a parent
    module makes afterwards to a child's parameters are lost; `_redo_parent_inits` replays the ones
    x-transformers and the priors make. The partitioned model therefore starts from the same
    initial distributions as a plain build, though not the same numbers (the replayed draws come later
    in the random stream).
    """
    if config["zero_optimization"].get("stage", 0) != 3:
        return build()
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=config):
        model = build()
    _redo_parent_inits(model)
    return model


def _redo_parent_inits(model: torch.nn.Module) -> None:
    import deepspeed
    from x_transformers.x_transformers import (
        AdaptiveLayerNorm,
        AdaptiveLayerScale,
        TokenEmbedding,
    )

    def redo(module: torch.nn.Module) -> None:
        if isinstance(module, TokenEmbedding) and not module.l2norm_embed:
            torch.nn.init.kaiming_normal_(module.emb.weight)
        elif isinstance(module, AdaptiveLayerNorm):
            torch.nn.init.zeros_(module.to_gamma.weight)
        elif isinstance(module, AdaptiveLayerScale):  # x-transformers' default init_bias_value
            torch.nn.init.zeros_(module.to_gamma.weight)
            torch.nn.init.constant_(module.to_gamma.bias, -2.0)
        elif hasattr(module, "zero_init_modules"):  # the priors' own zero-initialized outputs
            for child in module.zero_init_modules():
                for param in child.parameters():
                    torch.nn.init.zeros_(param)

    kinds = (TokenEmbedding, AdaptiveLayerNorm, AdaptiveLayerScale)
    for module in model.modules():
        if isinstance(module, kinds) or hasattr(module, "zero_init_modules"):
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    redo(module)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings (ndim >= 2), never on norms, biases or scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def create_engine(model: torch.nn.Module, t: PriorTrainConfig, config: dict[str, Any]):
    """`deepspeed.initialize` with `config` (see `deepspeed_config`), weight-decay groups, and the
    tokenizer trainer's schedule (linear warmup, cosine to 10%) as a client LR scheduler."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(t.warmup_steps, t.steps)),
    )
    return engine


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full fp32 model state on rank 0 (None elsewhere). Collective under ZeRO-3: call on every rank."""
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    params = list(module.parameters()) if zero3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if torch.distributed.get_rank() != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


class DeepSpeedBackend:
    """The training skeleton's `Backend` (`base.training`) on a DeepSpeed engine; `build` makes a plain
    model of the same architecture, for evaluation copies."""

    def __init__(self, engine, build: Callable[[], torch.nn.Module]):
        self.engine, self.build = engine, build

    def micro_step(self, forward, *, step, micro, micros):
        if micro == 0:
            self.engine.train()
        loss, logs = forward(self.engine)
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed steps the optimizer at the last micro-step of each step
        return loss.item(), logs

    def step(self, step):
        if not self.engine.was_step_applied():  # an fp16 overflow: DeepSpeed skipped the step and lowered the scale
            return None
        grad_norm = self.engine.get_global_grad_norm()
        return None if grad_norm is None else float(grad_norm)

    def lr(self):
        return self.engine.get_lr()[0]

    def save(self, checkpoint_dir, tag, client_state):
        self.engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, checkpoint_dir, tag):
        path, client_state = self.engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{checkpoint_dir / tag}: DeepSpeed could not load this checkpoint")
        return client_state

    def state_for_eval(self):
        """On rank 0, a plain fp32 copy of the current weights, built only for the occasion (under ZeRO-3
        the weights are gathered for it: a collective); None on the other ranks."""
        state = gathered_state_dict(self.engine)
        if state is None:
            return None
        model = self.build()
        model.load_state_dict(state)
        return model.to(self.engine.device).eval()


def consolidated_weights(checkpoint_dir: Path, zero_stage: int, bf16: bool,
                         model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 weights from the pointed checkpoint, merging ZeRO shards; needs no process group.

    `model` (same architecture) names the fp32 master copies a bf16 run without ZeRO keeps in its
    optimizer state; with ZeRO, DeepSpeed's `zero_to_fp32` merges the partitioned master copies.
    """
    pointer = read_pointer(checkpoint_dir)
    if pointer is None:
        raise UserError(f"no checkpoint in {checkpoint_dir} to export")
    if zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=pointer["tag"])
    path = checkpoint_dir / pointer["tag"] / "mp_rank_00_model_states.pt"
    try:  # tensors and plain containers only: unpickling a file must not run code from it
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message is a paragraph: keep the line naming the object
        found = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        raise UserError(f"{path}: refused, it holds more than tensors and plain values "
                        f"({found[0].split(' was not')[0] if found else 'weights_only load failed'})") from None
    weights = {k: v.float() for k, v in state["module"].items()}
    if bf16:  # the module holds bf16 copies; the optimizer holds fp32 masters, grouped as `param_groups`
        names = {id(p): name for name, p in model.named_parameters()}
        for group, masters in zip(param_groups(model, 0.0), state["optimizer"]["fp32_groups"]):
            for param, master in zip(group["params"], masters):
                weights[names[id(param)]] = master.detach().float()
    return weights
