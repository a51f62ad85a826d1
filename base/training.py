"""The training skeleton both trainers run on (`flextok.training`, `priors.trainer`).

Run layout: runs/<name>/{config.yaml, metrics.jsonl, checkpoints/{latest.json, step_XXXXXXXX/}, samples/,
final/}. `batch_size` is the global batch of an optimizer step, split evenly over the ranks and the
`grad_accumulation` micro-steps; every micro-step reseeds torch from (seed, step, rank, micro-step), and a
trainer's batches depend only on (seed, step), so `--resume` repeats an uninterrupted run.

Checkpoints are crash-safe: each goes into a new tag folder, and the pointer `latest.json` moves (atomic
rename) only after every rank has written it; older tags are deleted only after that. A trainer subclasses
`Trainer` with its task (model, batches, loss, evaluation, export) and hands the optimizer side to a
`Backend`: `TorchBackend` here (one process or DDP), `priors.deepspeed_utils.DeepSpeedBackend` for DeepSpeed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from . import distributed as dist
from .config import config_changes, save_config
from .data import micro_batch_size
from .errors import UserError
from .files import atomic_write, atomic_write_text, refuse_existing_run
from .runtime import check_finite, matmul_gflops
from .schema import TrainLoopConfig
from .tracking import open_trackers

__all__ = ["POINTER", "TRAINING_RECORD", "Backend", "TorchBackend", "Trainer", "autocast", "grouped", "launch",
           "read_pointer", "remove_stale_tags", "restore_rng_state", "rng_state", "step_seed"]

POINTER = "latest.json"  # checkpoints/latest.json names the latest complete checkpoint
TRAINING_RECORD = "training.json"  # beside the exported model: what training cost (`Trainer.training_record`)


def step_seed(seed: int, step: int, rank: int = 0, micro: int = 0) -> int:
    """The torch seed of one micro-step: `seed * 1_000_003 + step` for rank 0's first micro-step (all a
    one-process run without accumulation uses), a hash of all four otherwise, so no two streams share one."""
    if rank == micro == 0:
        return seed * 1_000_003 + step
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


def rng_state() -> dict:
    """The torch, numpy and Python random states as tensors and plain values (`weights_only` loads them)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def restore_rng_state(state: dict) -> None:
    """Undo of `rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def grouped(items: Iterable, size: int) -> Iterator[list]:
    """`size` items at a time: the micro-batches of one step."""
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def read_pointer(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The pointer to the latest complete checkpoint, or None when there is none yet."""
    path = checkpoint_dir / POINTER
    if not path.is_file():
        return None
    try:
        pointer = json.loads(path.read_text())
    except json.JSONDecodeError as err:  # only ever replaced atomically, so this is outside damage
        raise UserError(f"{path}: unreadable checkpoint pointer ({err})") from None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("tag"), str):
        raise UserError(f"{path}: not a checkpoint pointer (no 'tag')")
    if not (checkpoint_dir / pointer["tag"]).is_dir():
        raise UserError(f"{path} names checkpoint {pointer['tag']}, which is missing")
    return pointer


def remove_stale_tags(checkpoint_dir: Path, keep: str | None) -> None:
    """Delete every tag folder but `keep`: older checkpoints and any left half-written by a kill."""
    for path in checkpoint_dir.glob("step_*"):
        if path.is_dir() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


class Backend(Protocol):
    """The optimizer side of a trainer (plain torch / DDP, DeepSpeed). `micro_step` runs `forward(model)` ->
    (loss, logs) on one micro-batch and its backward, returning the loss value; `step` is the optimizer step
    after a step's micro-steps, returning the gradient norm (None: not measured); `save` (on every rank) and
    `load` write and restore checkpoint `tag` with a client state of tensors and plain values;
    `state_for_eval` is the weights to evaluate on rank 0, None elsewhere (a collective where sharded)."""

    def micro_step(self, forward: Callable, *, step: int, micro: int, micros: int) -> tuple[float, dict]: ...
    def step(self, step: int) -> float | None: ...
    def lr(self) -> float: ...
    def save(self, checkpoint_dir: Path, tag: str, client_state: dict) -> None: ...
    def load(self, checkpoint_dir: Path, tag: str) -> dict: ...
    def state_for_eval(self) -> torch.nn.Module | None: ...


class TorchBackend:
    """One process, or DDP over the launcher's ranks, with an EMA copy of `model` (the objective's model).
    Every rank holds the same weights, so rank 0 alone writes the checkpoint (one file of tensors and plain
    values: `torch.load(weights_only=True)` reads it) and evaluates the EMA weights."""

    STATE = "state.pt"

    def __init__(self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
                 model: torch.nn.Module, ema: torch.nn.Module, ema_decay: float, grad_clip: float,
                 device: torch.device, rank: int, world_size: int):
        self.objective, self.optimizer, self.scheduler = objective, optimizer, scheduler
        self.model, self.ema, self.ema_decay, self.grad_clip = model, ema, ema_decay, grad_clip
        self.device, self.rank, self.world_size = device, rank, world_size
        self.wrapper, self.idle, self.replicas = None, None, objective

    def replicate(self, step: int) -> torch.nn.Module:
        """The objective itself for one rank, else DDP over it, without the parameters the objective
        leaves idle at this step (a PatchGAN's before `loss.adversarial_start`): DDP would wait for their
        gradients, and `find_unused_parameters` would instead search the autograd graph at every step of
        the run. The wrapper is rebuilt, on every rank at the same step, when that set changes."""
        if self.world_size == 1:
            return self.objective
        idle = self.objective.idle_parameters(step) if hasattr(self.objective, "idle_parameters") else []
        if self.wrapper is None or idle != self.idle:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapper = None  # the old wrapper's gradient hooks go with it
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.objective, idle)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapper, self.idle = DistributedDataParallel(self.objective, device_ids=ids), idle
        return self.wrapper

    def micro_step(self, forward, *, step, micro, micros):
        if micro == 0:
            self.replicas = self.replicate(step)
            self.objective.train()
        # gradients are all-reduced once per step, at the last micro-batch
        last = micro == micros - 1
        sync = contextlib.nullcontext() if last or self.replicas is self.objective else self.replicas.no_sync()
        with sync:
            with autocast(self.device):
                loss, logs = forward(self.replicas)
            (loss / micros).backward()
        return loss.item(), logs

    def step(self, step):
        grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._update_ema(step)
        return grad_norm.item()

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        decay = min(self.ema_decay, (1 + step) / (10 + step))  # warm start
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    def lr(self):
        return self.scheduler.get_last_lr()[0]

    def save(self, checkpoint_dir, tag, client_state):
        if self.rank != 0:
            return
        state = {"objective": self.objective.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 **client_state}
        (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
        atomic_write(checkpoint_dir / tag / self.STATE, lambda tmp: torch.save(state, tmp))

    def load(self, checkpoint_dir, tag):
        path = checkpoint_dir / tag / self.STATE
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:  # a checkpoint is only ever replaced atomically, so this is real damage
            raise UserError(f"{path}: cannot load checkpoint ({err})") from None
        for name in ("objective", "ema", "optimizer", "scheduler"):
            getattr(self, name).load_state_dict(state.pop(name))
        return state

    def state_for_eval(self):
        return self.ema if self.rank == 0 else None


class Trainer:
    """The loop: resume, batches, micro-steps, NaN stop, logging, evaluation, checkpoints, export.

    A subclass calls `super().__init__` first (the run-folder guard, the process group), builds its model and
    `self.backend`, then calls `self.start()`. It supplies its task: `batches(start)` (this rank's micro-batches
    of each step from `start` on, one list per step), `count(batch)` (the `unit`s of a micro-batch, for the
    throughput; 0 on any rank skips the step), `loss(model, batch)` -> (loss, logs), `evaluate(model)` (rank 0's
    held-out metrics; a PNG grid goes to `samples_path`) and `export()` (rank 0: the final model's folder,
    `run_dir / "final"`); where needed `before_step`, `client_state`, `evaluation_due` and `join`."""

    kind = ""  # recorded in the checkpoint pointer: a run folder holds one kind of run
    unit = "images"  # what `count` counts; the throughput is logged as `<unit>_per_s`
    backend: Backend

    def __init__(self, cfg, loop: TrainLoopConfig, run_dir: Path, device: torch.device, *, resume: bool,
                 section: str):
        self.cfg, self.loop, self.run_dir, self.device = cfg, loop, Path(run_dir), device
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.pointer = read_pointer(self.checkpoint_dir)
        if self.pointer is not None and self.pointer.get("kind") != self.kind:
            raise UserError(f"{self.run_dir} holds a {self.pointer.get('kind')} run: choose another run folder")
        # before the process group forms: no rank can have written to the folder yet
        refuse_existing_run(self.run_dir, resume, has_checkpoint=self.pointer is not None)
        self.rank, self.world_size = self.join(cfg.distributed.wait_timeout)
        # the global batch must split over the ranks and micro-steps: one line naming the key, before any work
        micro_batch_size(loop.batch_size, self.world_size, loop.grad_accumulation, key=f"{section}.batch_size")
        if resume and self.pointer is None and self.rank == 0:  # a requeued job killed before its first checkpoint
            print(f"--resume: no checkpoint in {self.checkpoint_dir} yet; starting from step 0")
        if device.type == "cpu":
            torch.set_num_threads(dist.threads_per_rank(loop.threads))
        self.step, self.last_eval, self.trackers = 0, {}, None
        self.step_seconds, self.counted = 0.0, 0.0  # the training steps' own time and units, over resumes
        self.interrupted, self.stop_agreed, self.saved_step = False, False, None

    def join(self, timeout_minutes: float) -> tuple[int, int]:
        """Join the launcher's process group; returns (rank, world_size)."""
        return dist.init_process_group(self.device, timeout_minutes)

    def start(self) -> dict:
        """Restore the checkpoint being resumed (returns its client state; {} for a fresh run); on rank 0,
        drop checkpoint folders and log records a killed run left past it, and write config.yaml."""
        client = {}
        if self.pointer is not None:
            client = self.backend.load(self.checkpoint_dir, self.pointer["tag"])
            self.step = self.saved_step = int(client["step"])
            restore_rng_state(client["rng"])
            self.step_seconds, self.counted = float(client.get("step_seconds", 0)), float(client.get("counted", 0))
        if self.rank == 0:
            remove_stale_tags(self.checkpoint_dir, keep=self.pointer["tag"] if self.pointer else None)
            self._keep_changed_config()
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.trackers = open_trackers(self.loop.trackers, self.run_dir, run_name=self.run_dir.name,
                                          config=dataclasses.asdict(self.cfg), start_step=self.step)
        return client

    def _keep_changed_config(self) -> None:
        """A resume with other settings than the run's config.yaml: say which, and keep the earlier file under
        the step it ran to (config.step_00001200.yaml for step 1,200), so the run's history stays in its folder."""
        path = self.run_dir / "config.yaml"
        changes = config_changes(path, self.cfg) if self.pointer is not None else []
        if changes:
            kept = path.with_name(f"config.step_{self.step:08d}.yaml")
            os.replace(path, kept)
            print(f"--resume at step {self.step} with changed settings ({'; '.join(changes)}); the earlier config "
                  f"is kept as {kept.name}")

    def before_step(self, micro_batches: list) -> None:
        """Called on every rank before each step's first micro-step."""

    def client_state(self) -> dict[str, Any]:
        """Kept with each checkpoint (string values in the pointer too); called on every rank."""
        return {}

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.loop.steps

    def evaluation_due(self) -> bool:
        return self.due(self.loop.eval_every)

    @property
    def samples_path(self) -> Path:
        return self.run_dir / "samples" / f"step_{self.step:07d}.png"

    # the loop
    def train(self) -> Path | None:
        """Train to `steps`; rank 0 returns the exported model's folder (other ranks: None).

        Ctrl-C (SIGINT) stops at the end of the step under way, on every rank at the same step: the step is
        finished and saved, then KeyboardInterrupt is raised. A second Ctrl-C aborts at once without saving
        (the last checkpoint stays the latest): a save in the middle of a step would record half of it."""
        bar = tqdm(total=self.loop.steps, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True,
                   disable=self.rank != 0)
        previous = self._catch_interrupts()
        try:
            self._loop(bar)
            if self.rank != 0:
                return None
            # before the weights: a stage is finished once they exist, so its record must be there by then
            atomic_write_text(self.run_dir / "final" / TRAINING_RECORD, json.dumps(self.training_record(), indent=2))
            return self.export()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            bar.close()
            if self.trackers is not None:
                self.trackers.close()

    def _catch_interrupts(self):
        """Install the SIGINT handler (main thread only); returns the handler it replaces, or None."""
        def stop_after_this_step(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            if self.rank == 0:
                print("\ninterrupt: finishing this step, then saving (Ctrl-C again aborts without saving)")

        try:
            return signal.signal(signal.SIGINT, stop_after_this_step)
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            return None

    def training_record(self) -> dict[str, Any]:
        """What training cost: steps, the units (images) they used over all ranks, and the seconds of the
        training steps alone (no evaluation, samples or saves; summed over resumes), with the machine's
        fp32 CPU matmul speed at the end (the figure every benchmark prints, also on GPU runs), so that runs
        compare at equal compute and the time can be read."""
        return {"steps": self.step, "batch_size": self.loop.batch_size, self.unit: self.counted,
                "step_seconds": round(self.step_seconds, 3), f"{self.unit}_per_s": round(self.counted / max(
                    self.step_seconds, 1e-9), 1), "matmul_gflops": round(matmul_gflops(), 1),
                "device": str(self.device), "world_size": self.world_size}

    def _loop(self, bar: tqdm) -> None:
        for micro_batches in self.batches(self.step):
            started = time.perf_counter()
            logs = self.train_step(micro_batches)
            self.step += 1
            if logs is None:
                continue
            self.step_seconds += time.perf_counter() - started
            self.counted += logs.pop("count")
            rate = self.counted / self.step_seconds
            bar.update(1)
            bar.set_postfix({"loss": f"{logs['loss']:.4f}", f"{self.unit}/s": f"{rate:.0f}"})
            if self.due(self.loop.log_every):
                self.log({f"{self.unit}_per_s": rate, "lr": self.backend.lr(), **logs})
            if self.evaluation_due():
                self._evaluate()
            if self.due(self.loop.checkpoint_every):
                self.save_checkpoint()
            if self.stop_agreed:
                self.save_checkpoint()
                if self.rank == 0:
                    print(f"interrupted: saved step {self.step} to {self.checkpoint_dir}; continue with --resume")
                raise KeyboardInterrupt

    def train_step(self, micro_batches: list) -> dict[str, float] | None:
        """One optimizer step over this rank's micro-batches (gradients averaged over all of them and over
        ranks); None, with no update anywhere, when any rank got an empty micro-batch."""
        counts = [self.count(batch) for batch in micro_batches]
        if dist.all_reduce_sum([float(min(counts) == 0)], self.device)[0] > 0:
            return None
        self.before_step(micro_batches)
        micros, loss_sum, logs_sum = len(micro_batches), 0.0, {}
        for micro, batch in enumerate(micro_batches):
            torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank, micro))
            loss, logs = self.backend.micro_step(lambda model, b=batch: self.loss(model, b), step=self.step,
                                                 micro=micro, micros=micros)
            loss_sum += loss / micros
            for key, value in logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + value / micros
        # the interrupt flag rides on the step's one all-reduce, so every rank stops after the same step
        loss_total, count, stops = dist.all_reduce_sum([loss_sum, float(sum(counts)), float(self.interrupted)],
                                                       self.device)
        self.stop_agreed = stops > 0
        loss = loss_total / self.world_size
        check_finite("loss", loss, self.step, self.checkpoint_dir)  # the same value on every rank
        grad_norm = self.backend.step(self.step)
        logs = {"loss": loss, **logs_sum, "count": count}
        if grad_norm is not None:  # DeepSpeed measures none at ZeRO-0 in fp32
            check_finite("gradient norm", grad_norm, self.step, self.checkpoint_dir)
            logs["grad_norm"] = grad_norm
        return logs

    def _evaluate(self) -> None:
        model = self.backend.state_for_eval()  # a collective where the weights are sharded
        if model is None:
            return
        metrics = self.evaluate(model)
        if metrics:
            self.last_eval = metrics
            self.log(metrics)
        if self.samples_path.is_file():
            self.trackers.log_image(self.step, "samples", self.samples_path)

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        """Rank 0 logs `values` at `step` (default: the steps done) to the configured trackers."""
        if self.rank == 0:
            self.trackers.log_scalars(self.step if step is None else step, values)

    def save_checkpoint(self) -> None:
        """Every rank writes its part of tag step_XXXXXXXX; then rank 0 moves the pointer to it and deletes
        older tags."""
        if self.saved_step == self.step:  # never rewrite the checkpoint the pointer names
            return
        tag = f"step_{self.step:08d}"
        client = {"step": self.step, "rng": rng_state(), "step_seconds": self.step_seconds, "counted": self.counted,
                  **self.client_state()}
        self.backend.save(self.checkpoint_dir, tag, client)
        dist.barrier()  # every rank's part is on disk before the pointer names it
        if self.rank == 0:
            strings = {k: v for k, v in client.items() if isinstance(v, str)}
            pointer = {"tag": tag, "step": self.step, "kind": self.kind, **strings}
            atomic_write_text(self.checkpoint_dir / POINTER, json.dumps(pointer, indent=2))
            remove_stale_tags(self.checkpoint_dir, keep=tag)
        self.saved_step = self.step


def launch(make: Callable[[], Trainer], local_rank: int = -1) -> int:
    """What a training script runs: the launch environment (one rank without a launcher), the trainer
    `make()` builds, training, and the process group's teardown."""
    dist.ensure_launch_env(local_rank)
    final = make().train()
    dist.shutdown()
    if final is not None:
        print(f"saved {final}")
    return 0
