"""DeepSpeed plumbing for `train_prior.py`: process group, engine config, crash-safe checkpoints, export.

Checkpoint layout: checkpoints/<tag>/ (DeepSpeed's files, written by every rank) and checkpoints/latest.json
(our pointer). DeepSpeed's own `latest` file is never written. The pointer moves (atomic rename) only
after every rank has finished writing the new tag, and older tags are deleted only after that, so a
SIGKILL at any moment leaves the pointer naming a complete checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from flextok.errors import UserError
from flextok.files import atomic_write_text
from flextok.runtime import warmup_cosine

from .schema import PriorTrainConfig

__all__ = ["POINTER", "barrier", "broadcast_object", "consolidated_weights", "create_engine", "deepspeed_config",
    "ensure_launch_env", "free_port", "gathered_state_dict", "init_distributed", "load_checkpoint",
    "local_device_name", "on_cuda", "param_groups", "read_pointer", "remove_stale_tags", "save_checkpoint",
    "shutdown_distributed"]

POINTER = "latest.json"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env(local_rank: int | None = None) -> None:
    """Make a plain `python train_prior.py` a one-process job (else DeepSpeed falls back to mpi4py
    discovery); the `deepspeed` launcher sets these itself and passes `--local_rank`."""
    if local_rank is not None and local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_minutes: int = 120) -> tuple[int, int]:
    """Initialize DeepSpeed's process group once per process; returns (rank, world_size).

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (about 95 s on 2 cores)
    when the group starts. Only DeepSpeed-inference's tensor-parallel all-reduce uses it; training
    collectives go through gloo. Marking the op incompatible first skips the compile entirely.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    # a long timeout: rank 0 alone builds the token caches while the other ranks wait at a barrier
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shutdown_distributed() -> None:
    """All ranks finish together, then the process group is torn down. A rank that exits while another
    still holds gloo connections (rank 0 exporting) can abort at interpreter exit with
    "terminate called without an active exception"."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def local_device_name() -> str:
    """This rank's device ("cpu", or "cuda:<local rank>")."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))


def on_cuda() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def deepspeed_config(t: PriorTrainConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config equivalent of a `prior_train` section.

    AdamW runs as torch's own (`torch_adam`), so no fused op is compiled on CPU or needs nvcc on GPUs;
    the LR schedule is a client scheduler (see `train_prior`), saved and restored with checkpoints.
    """
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accumulation,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay,
                       "torch_adam": True},
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,  # our own logging only
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings (ndim >= 2), never on norms, biases or scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def create_engine(model: torch.nn.Module, t: PriorTrainConfig, bf16: bool):
    """`deepspeed.initialize` with the config above, weight-decay groups, and the tokenizer trainer's
    schedule (linear warmup, cosine to 10%) as a client LR scheduler."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=deepspeed_config(t, bf16),
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


def read_pointer(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The pointer to the latest complete checkpoint, or None when there is none yet."""
    path = checkpoint_dir / POINTER
    if not path.is_file():
        return None
    try:
        pointer = json.loads(path.read_text())
    except json.JSONDecodeError as err:  # only ever replaced atomically, so this is outside damage
        raise UserError(f"{path}: unreadable checkpoint pointer ({err})") from None
    if not (checkpoint_dir / pointer["tag"]).is_dir():
        raise UserError(f"{path} names checkpoint {pointer['tag']}, which is missing")
    return pointer


def save_checkpoint(engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any]) -> str:
    """Save on every rank into a new tag, then (rank 0) move the pointer and delete older tags."""
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={**client_state, "step": step},
                           save_latest=False)
    barrier()  # every rank's shard is on disk before the pointer names it
    if torch.distributed.get_rank() == 0:
        pointer = {"tag": tag, "step": step, **{k: v for k, v in client_state.items() if isinstance(v, str)}}
        atomic_write_text(checkpoint_dir / POINTER, json.dumps(pointer, indent=2))
        remove_stale_tags(checkpoint_dir, keep=tag)
    return tag


def remove_stale_tags(checkpoint_dir: Path, keep: str | None) -> None:
    """Delete every tag folder but `keep`: older checkpoints and any left half-written by a kill."""
    for path in checkpoint_dir.iterdir():
        if path.is_dir() and path.name != keep and path.name.startswith("step_"):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, checkpoint_dir: Path) -> dict[str, Any]:
    """Restore model, optimizer and LR scheduler from the pointed tag; returns the client state."""
    pointer = read_pointer(checkpoint_dir)
    if pointer is None:
        raise UserError(f"--resume: no checkpoint in {checkpoint_dir}")
    path, client_state = engine.load_checkpoint(
        str(checkpoint_dir), tag=pointer["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise UserError(f"{checkpoint_dir / pointer['tag']}: DeepSpeed could not load this checkpoint")
    return client_state


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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=pointer["tag"])
    state = torch.load(checkpoint_dir / pointer["tag"] / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    weights = {k: v.float() for k, v in state["module"].items()}
    if bf16:  # the module holds bf16 copies; the optimizer holds fp32 masters, grouped as `param_groups`
        names = {id(p): name for name, p in model.named_parameters()}
        for group, masters in zip(param_groups(model, 0.0), state["optimizer"]["fp32_groups"]):
            for param, master in zip(group["params"], masters):
                weights[names[id(param)]] = master.detach().float()
    return weights
