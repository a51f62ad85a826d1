"""The tokenizer training loop behind `train_tokenizer.py`, shared by every tokenizer family.

Run layout: runs/<name>/{config.yaml, metrics.jsonl, checkpoints/latest.pt, samples/, final/}.
Each step reseeds torch from (seed, step) and batches depend only on (seed, step), so `--resume`
reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import save_config
from .data import load_images, report_skipped, train_loader
from .errors import UserError
from .files import MetricsLog, atomic_write
from .metrics import psnr, ssim
from .runtime import check_finite, pick_device, warmup_cosine
from .schema import TokenizerRunConfig
from .visualize import save_image_grid

__all__ = ["TokenizerTrainer", "build_objective", "build_tokenizer"]

CHECKPOINT = "latest.pt"


def build_tokenizer(cfg: TokenizerRunConfig) -> torch.nn.Module:
    if cfg.tokenizer == "grid":
        from .grid_autoencoder import GridAutoencoder

        return GridAutoencoder(cfg.grid, resolution=cfg.data.resolution)
    from .flextok_model import FlexTok

    return FlexTok.from_config(cfg.flextok, resolution=cfg.data.resolution)


def build_objective(cfg: TokenizerRunConfig, model: torch.nn.Module) -> torch.nn.Module:
    if cfg.tokenizer == "grid":
        from .objectives import GridObjective

        return GridObjective(model, cfg.loss)
    from .flextok_model import FlexTokObjective

    return FlexTokObjective(model)


class TokenizerTrainer:
    def __init__(self, cfg: TokenizerRunConfig, resume: bool = False):
        self.cfg, self.run_dir = cfg, cfg.run_dir
        self.ckpt_path = self.run_dir / "checkpoints" / CHECKPOINT
        if self.ckpt_path.exists() and not resume:
            raise UserError(f"{self.run_dir} already holds a run: pass --resume to continue it, or set name=<new>")
        if resume and not self.ckpt_path.exists():  # a requeued job killed before its first checkpoint
            print(f"--resume: no checkpoint at {self.ckpt_path} yet; starting from step 0")
            resume = False
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        torch.manual_seed(cfg.seed)
        self.model = build_tokenizer(cfg).to(self.device)
        self.objective = build_objective(cfg, self.model).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(t.warmup_steps, t.steps))
        self.step = 0
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if resume:
            self._load_checkpoint()
        else:  # a run killed before its first checkpoint may have logged steps that are about to be redone
            self.metrics.truncate_after(0)
        save_config(cfg, self.run_dir / "config.yaml")
        self.eval_batch = load_images(cfg.data, cfg.data.eval_split, cfg.data.eval_images, cfg.seed)
        self.skipped: list[int] = []

    def save_checkpoint(self) -> None:
        state = {
            "objective": self.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        atomic_write(self.ckpt_path, lambda tmp: torch.save(state, tmp))

    def _load_checkpoint(self) -> None:
        try:
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        except Exception as err:  # a checkpoint is only ever replaced atomically, so this is real damage
            raise UserError(f"{self.ckpt_path}: cannot load checkpoint ({err})") from None
        self.objective.load_state_dict(state["objective"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.metrics.truncate_after(self.step)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def train(self) -> Path:
        t = self.cfg.train
        loader = train_loader(self.cfg.data, t.batch_size, self.cfg.seed, self.step, t.steps)
        bar = tqdm(total=t.steps, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True)
        seen, started = 0, time.perf_counter()
        try:
            for batch in loader:
                self._collect_skipped(batch.skipped, seen)
                if batch.images.numel() == 0:
                    self.step += 1
                    continue
                logs = self.train_step(batch.images.to(self.device, non_blocking=True))
                self.step += 1
                seen += len(batch.images)
                rate = seen / (time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{rate:.0f}")
                if self.step % t.log_every == 0 or self.step == t.steps:
                    self.log({"step": self.step, "images_per_s": rate, "lr": self.scheduler.get_last_lr()[0], **logs})
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    self.log({"step": self.step, **self.evaluate()})
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            self.save_checkpoint()
            bar.close()
            print(f"\ninterrupted: saved step {self.step} to {self.ckpt_path}; continue with --resume")
            raise
        bar.close()
        report_skipped(self.skipped, f"{self.cfg.data.source} [{self.cfg.data.train_split}]")
        final = self.ema.save_pretrained(self.run_dir / "final")
        return final

    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)
        self.objective.train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            loss, logs = self.objective(images, self.step)
        check_finite("loss", loss.item(), self.step, self.ckpt_path)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg.train.grad_clip)
        check_finite("gradient norm", grad_norm.item(), self.step, self.ckpt_path)
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        return {"loss": loss.item(), "grad_norm": float(grad_norm), **logs}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.train.ema_decay, (1 + self.step) / (10 + self.step))  # warm start
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out PSNR/SSIM with the EMA weights, and a PNG grid: originals, then each reconstruction."""
        images = self.eval_batch.images.to(self.device)
        recons = self.ema.eval_reconstructions(images, seed=self.cfg.seed)
        metrics = {}
        for name, recon in recons.items():
            metrics[f"psnr/{name}"] = psnr(recon, images).mean().item()
            metrics[f"ssim/{name}"] = ssim(recon, images).mean().item()
        columns = [images[:8].cpu()] + [r[:8].cpu() for r in recons.values()]
        save_image_grid(
            columns, self.run_dir / "samples" / f"step_{self.step:07d}.png", ["original", *recons.keys()]
        )
        return metrics

    def log(self, record: dict) -> None:
        self.metrics.append(record)

    def _collect_skipped(self, skipped: list[int], seen: int) -> None:
        self.skipped += skipped
        if skipped and seen == 0 and len(self.skipped) >= 4 * self.cfg.train.batch_size:
            raise UserError(f"data: {self.cfg.data.source} yields no usable image (first ids: {self.skipped[:5]})")
