"""The tokenizer training loop behind `train_tokenizer.py`, shared by every tokenizer family.

Run layout: runs/<name>/{config.yaml, metrics.jsonl, checkpoints/latest.pt, samples/, final/}.
Each step reseeds torch from (seed, step, rank, micro-step) and batches depend only on (seed, step), so
`--resume` reproduces an uninterrupted run exactly.

Multi-rank runs (`torchrun` or the `deepspeed` launcher) use PyTorch DDP, not DeepSpeed's engine: the
tokenizers are trained with an EMA copy, an optional PatchGAN sharing one backward pass, and frozen
LPIPS / autoencoder modules, and they fit one GPU's memory in bf16 with activation checkpointing, so
replicated weights with all-reduced gradients are all they need. Every rank holds the same weights,
so rank 0 alone evaluates, logs and writes the (single) checkpoint that every rank resumes from. The
checkpoint holds tensors and plain values only, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from base import distributed as dist
from base.config import save_config
from base.data import (
    Batch,
    load_images,
    loader_state,
    micro_batch_size,
    report_skipped,
    train_loader,
)
from base.errors import UserError
from base.files import MetricsLog, atomic_write, refuse_existing_run
from base.hub import ModelCardInfo
from base.metrics import psnr, ssim
from base.runtime import check_finite, pick_device, warmup_cosine
from base.visualize import save_image_grid

from .schema import TokenizerRunConfig

__all__ = ["TokenizerTrainer", "build_objective", "build_tokenizer", "recompute_in_backward", "restore_rng_state",
           "rng_state", "step_seed"]

CHECKPOINT = "latest.pt"


def build_tokenizer(cfg: TokenizerRunConfig) -> torch.nn.Module:
    if cfg.tokenizer == "grid":
        from grid.autoencoder import GridAutoencoder

        return GridAutoencoder(cfg.grid, resolution=cfg.data.resolution)
    from .model import FlexTok

    return FlexTok.from_config(cfg.flextok, resolution=cfg.data.resolution)


def build_objective(cfg: TokenizerRunConfig, model: torch.nn.Module) -> torch.nn.Module:
    if cfg.tokenizer == "grid":
        from grid.objectives import GridObjective

        return GridObjective(model, cfg.loss)
    from .model import FlexTokObjective

    return FlexTokObjective(model)


def recompute_in_backward(model: torch.nn.Module) -> int:
    """Activation checkpointing: every attention, feed-forward and residual conv block of `model`
    keeps only its inputs in the forward pass and recomputes the rest in backward. Returns the count.

    The blocks' `forward` is wrapped in place, so parameter names (checkpoints, Hub export) do not
    change; wrap after any `copy.deepcopy` of the model (a copy would call the original's blocks).
    """
    from x_transformers.x_transformers import Attention, FeedForward

    from grid.autoencoder import ResBlock

    count = 0
    for module in model.modules():
        if isinstance(module, (Attention, FeedForward, ResBlock)):
            inner = module.forward

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            count += 1
    return count


def step_seed(seed: int, step: int, stream: int) -> int:
    """The torch seed of one micro-step; `stream` = rank * accumulation + micro-step. Stream 0 keeps
    the one-process seed, so single-rank runs repeat the results of earlier versions."""
    base = seed * 1_000_003 + step
    return base if stream == 0 else int(np.random.SeedSequence([base, stream]).generate_state(1)[0])


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


def grouped(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """The micro-batches of one step at a time."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


class TokenizerTrainer:
    def __init__(self, cfg: TokenizerRunConfig, resume: bool = False):
        self.cfg, self.run_dir = cfg, cfg.run_dir
        t = cfg.train
        self.device = dist.local_device(pick_device(t.device))
        self.ckpt_path = self.run_dir / "checkpoints" / CHECKPOINT
        # before the process group forms: no rank can have written to the folder yet
        refuse_existing_run(self.run_dir, resume, has_checkpoint=self.ckpt_path.exists())
        self.rank, self.world_size = dist.init_process_group(self.device, cfg.distributed.wait_timeout)
        self.micro_batch = micro_batch_size(t.batch_size, self.world_size, t.grad_accumulation)
        if resume and not self.ckpt_path.exists():  # a requeued job killed before its first checkpoint
            if self.rank == 0:
                print(f"--resume: no checkpoint at {self.ckpt_path} yet; starting from step 0")
            resume = False
        if self.device.type == "cpu":
            torch.set_num_threads(dist.threads_per_rank(t.threads))
        torch.manual_seed(cfg.seed)
        self.model = build_tokenizer(cfg).to(self.device)
        self.objective = build_objective(cfg, self.model).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if t.activation_checkpointing:
            recompute_in_backward(self.objective)
        if t.compile:  # in place: parameter names, checkpoints and the EMA copy are unchanged
            self.objective.compile()
        self.replicas, self.idle = None, None  # the DDP wrapper, built by `_replicate` for the idle parameters
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(t.warmup_steps, t.steps))
        self.step = 0
        self.loader, self.data_state = None, None  # a streamed source's position: see `loader_state`
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if resume:
            self._load_checkpoint()
        elif self.rank == 0:  # a run killed before its first checkpoint may have logged steps about to be redone
            self.metrics.truncate_after(0)
        self.eval_batch, self.last_eval = None, {}
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            self.eval_batch = load_images(cfg.data, cfg.data.eval_split, cfg.data.eval_images, cfg.seed)
        self.skipped: list[int] = []

    def _replicate(self) -> torch.nn.Module:
        """The objective itself for one rank, else DDP over it, without the parameters the objective
        leaves idle at this step (a PatchGAN's before `loss.adversarial_start`): DDP would wait for their
        gradients, and `find_unused_parameters` would instead search the autograd graph at every step of
        the run. The wrapper is rebuilt, on every rank at the same step, when that set changes."""
        if self.world_size == 1:
            return self.objective
        idle = self.objective.idle_parameters(self.step) if hasattr(self.objective, "idle_parameters") else []
        if self.replicas is None or idle != self.idle:
            from torch.nn.parallel import DistributedDataParallel

            self.replicas = None  # the old wrapper's gradient hooks go with it
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.objective, idle)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.replicas, self.idle = DistributedDataParallel(self.objective, device_ids=ids), idle
        return self.replicas

    def save_checkpoint(self) -> None:
        """Rank 0 writes the one checkpoint (every rank holds the same weights), atomically."""
        data = loader_state(self.loader, self.step)  # on every rank: each streams its own part of the source
        if self.rank != 0:
            return
        state = {
            "objective": self.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "world_size": self.world_size,
            "rng": rng_state(),
            "data": data,
        }
        atomic_write(self.ckpt_path, lambda tmp: torch.save(state, tmp))

    def _load_checkpoint(self) -> None:
        try:
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        except Exception as err:  # a checkpoint is only ever replaced atomically, so this is real damage
            raise UserError(f"{self.ckpt_path}: cannot load checkpoint ({err})") from None
        self.objective.load_state_dict(state["objective"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.data_state = state.get("data")
        if self.rank == 0:
            self.metrics.truncate_after(self.step)
        restore_rng_state(state["rng"])

    def train(self) -> Path | None:
        """Train to `train.steps`; rank 0 returns the exported EMA model's folder (other ranks: None)."""
        t = self.cfg.train
        self.loader = loader = train_loader(self.cfg.data, t.batch_size, self.cfg.seed, self.step, t.steps,
                                            self.rank, self.world_size, t.grad_accumulation, self.data_state)
        bar = tqdm(total=t.steps, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True,
                   disable=self.rank != 0)
        seen, started = 0, time.perf_counter()
        try:
            for micro_batches in grouped(loader, t.grad_accumulation):
                for batch in micro_batches:
                    self._collect_skipped(batch.skipped, seen)
                logs = self.train_step([b.images.to(self.device, non_blocking=True) for b in micro_batches])
                self.step += 1
                if logs is None:  # a micro-batch without a usable image somewhere: the step is skipped
                    continue
                seen += logs.pop("images")
                rate = seen / (time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{rate:.0f}")
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.log({"step": self.step, "images_per_s": rate, "lr": self.scheduler.get_last_lr()[0], **logs})
                if self.rank == 0 and (self.step % t.eval_every == 0 or self.step == t.steps):
                    self.last_eval = self.evaluate()
                    self.log({"step": self.step, **self.last_eval})
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            self.save_checkpoint()
            bar.close()
            if self.rank == 0:
                print(f"\ninterrupted: saved step {self.step} to {self.ckpt_path}; continue with --resume")
            raise
        bar.close()
        report_skipped(self.skipped, f"{self.cfg.data.source} [{self.cfg.data.train_split}]")
        if self.rank != 0:
            return None
        data = self.cfg.data
        card = ModelCardInfo(data_source=data.source, data_split=data.train_split, resolution=data.resolution,
                             steps=self.step, metrics=self.last_eval)
        return self.ema.save_pretrained(self.run_dir / "final", card=card)

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, float] | None:
        """One optimizer step over this rank's micro-batches (gradients averaged over all of them and
        over ranks); None, with no update anywhere, when any rank got an empty micro-batch."""
        t = self.cfg.train
        sizes = [len(images) for images in micro_batches]
        if dist.all_reduce_sum([float(min(sizes) == 0)], self.device)[0] > 0:
            return None
        self._fit_target_scale(micro_batches)
        replicas = self._replicate()
        self.objective.train()
        loss_sum, logs_sum = 0.0, {}
        for micro, images in enumerate(micro_batches):
            torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank * len(micro_batches) + micro))
            last = micro == len(micro_batches) - 1
            # gradients are all-reduced once per step, at the last micro-batch
            sync = contextlib.nullcontext() if last or replicas is self.objective else replicas.no_sync()
            with sync:
                with self._autocast():
                    loss, logs = replicas(images, self.step)
                (loss / len(micro_batches)).backward()
            loss_sum += loss.item()
            for key, value in logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + value / len(micro_batches)
        loss_total, images_total = dist.all_reduce_sum([loss_sum / len(micro_batches), float(sum(sizes))],
                                                       self.device)
        loss_mean = loss_total / self.world_size
        check_finite("loss", loss_mean, self.step, self.ckpt_path)  # the same value on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), t.grad_clip)
        check_finite("gradient norm", grad_norm.item(), self.step, self.ckpt_path)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._update_ema()
        return {"loss": loss_mean, "grad_norm": float(grad_norm), **logs_sum, "images": images_total}

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def _fit_target_scale(self, micro_batches: list[torch.Tensor]) -> None:
        """A model that scales its targets by their spread (FlexTok) measures it once, before its first
        update, on the whole global batch (every micro-batch of every rank): the same for any rank count."""
        model = self.model
        if not hasattr(model, "fit_target_scale") or model.target_scale != 0:
            return
        moments = sum(model.target_moments(images) for images in micro_batches)
        model.fit_target_scale(dist.all_reduce_sum(moments.tolist(), self.device))

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.train.ema_decay, (1 + self.step) / (10 + self.step))  # warm start
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out PSNR/SSIM with the EMA weights, and a PNG grid: the first 8 originals, then each
        reconstruction. `train.eval_batch_size` images go through the model at a time (bf16 autocast on
        CUDA), so its memory is bounded whatever `data.eval_images`; image i is decoded with noise of its own
        (`first`), so the metrics do not depend on the chunking either."""
        images, size = self.eval_batch.images, self.cfg.train.eval_batch_size
        scores: dict[str, list[torch.Tensor]] = {}
        columns: list[torch.Tensor] = []
        for first in range(0, len(images), size):
            chunk = images[first : first + size].to(self.device)
            with self._autocast():
                recons = self.ema.eval_reconstructions(chunk, seed=self.cfg.seed, first=first)
            for name, recon in recons.items():
                recon = recon.float()
                scores.setdefault(f"psnr/{name}", []).append(psnr(recon, chunk).cpu())
                scores.setdefault(f"ssim/{name}", []).append(ssim(recon, chunk).cpu())
            if not columns:
                columns, titles = [chunk[:8].cpu()] + [r[:8].float().cpu() for r in recons.values()], list(recons)
        save_image_grid(columns, self.run_dir / "samples" / f"step_{self.step:07d}.png", ["original", *titles])
        return {name: torch.cat(values).mean().item() for name, values in scores.items()}

    def log(self, record: dict) -> None:
        if self.rank == 0:
            self.metrics.append(record)

    def _collect_skipped(self, skipped: list[int], seen: int) -> None:
        self.skipped += skipped
        if skipped and seen == 0 and len(self.skipped) >= 4 * self.cfg.train.batch_size:
            raise UserError(f"data: {self.cfg.data.source} yields no usable image (first ids: {self.skipped[:5]})")
