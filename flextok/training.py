"""The tokenizer training loop behind `train_tokenizer.py`, shared by every tokenizer family, on the training
skeleton of `base.training` (run layout, batches, seeding, resume: see there).

Multi-rank runs (`torchrun` or the `deepspeed` launcher) use PyTorch DDP (`base.training.TorchBackend`), not
DeepSpeed's engine: the tokenizers are trained with an EMA copy, an optional PatchGAN sharing one backward
pass, and frozen LPIPS / autoencoder modules, and they fit one GPU's memory in bf16 with activation
checkpointing, so replicated weights with all-reduced gradients are all they need.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from base import distributed as dist
from base.data import load_images, loader_state, report_skipped, train_loader
from base.errors import UserError
from base.hub import ModelCardInfo
from base.metrics import psnr, ssim
from base.runtime import pick_device, warmup_cosine
from base.training import TorchBackend, Trainer, autocast, grouped
from base.visualize import save_image_grid

from .schema import TokenizerRunConfig

__all__ = ["TokenizerTrainer", "build_objective", "build_tokenizer", "recompute_in_backward"]


def build_tokenizer(cfg: TokenizerRunConfig) -> torch.nn.Module:
    if cfg.tokenizer == "grid":
        from grid.autoencoder import GridAutoencoder

        return GridAutoencoder(cfg.grid, resolution=cfg.data.resolution)
    from .model import FlexTok

    return FlexTok.from_config(cfg.flextok, resolution=cfg.data.resolution)


def build_objective(cfg: TokenizerRunConfig, model: torch.nn.Module) -> torch.nn.Module:
    if cfg.tokenizer == "grid":
        from grid.objectives import GridObjective

        return GridObjective(model, cfg.loss, equivariance=cfg.equivariance, repa=cfg.repa)
    from .model import FlexTokObjective

    return FlexTokObjective(model, pixel_loss=cfg.pixel_loss, prior_loss=cfg.prior_loss, repa=cfg.repa)


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


class TokenizerTrainer(Trainer):
    kind = "tokenizer"

    def __init__(self, cfg: TokenizerRunConfig, resume: bool = False):
        t = cfg.train
        super().__init__(cfg, t, cfg.run_dir, dist.local_device(pick_device(t.device)), resume=resume, section="train")
        torch.manual_seed(cfg.seed)
        self.model = build_tokenizer(cfg).to(self.device)
        self.objective = build_objective(cfg, self.model).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if t.activation_checkpointing:
            recompute_in_backward(self.objective)
        if t.compile:  # in place: parameter names, checkpoints and the EMA copy are unchanged
            self.objective.compile()
        params = [p for p in self.objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.steps))
        self.backend = TorchBackend(self.objective, optimizer, scheduler, model=self.model, ema=self.ema,
                                    ema_decay=t.ema_decay, grad_clip=t.grad_clip, device=self.device, rank=self.rank,
                                    world_size=self.world_size)
        self.eval_batch = None
        if self.rank == 0:
            self.eval_batch = load_images(cfg.data, cfg.data.eval_split, cfg.data.eval_images, cfg.seed)
        self.loader = None
        self.data_state = self.start().get("data")  # a streamed source's position: see `loader_state`

    def batches(self, start: int) -> Iterator[list[torch.Tensor]]:
        t, data = self.loop, self.cfg.data
        self.loader = train_loader(data, t.batch_size, self.cfg.seed, start, t.steps, self.rank, self.world_size,
                                   t.grad_accumulation, self.data_state)
        skipped, seen = [], 0
        for micro_batches in grouped(self.loader, t.grad_accumulation):
            skipped += [index for batch in micro_batches for index in batch.skipped]
            seen += sum(len(batch.images) for batch in micro_batches)
            if skipped and seen == 0 and len(skipped) >= 4 * t.batch_size:
                raise UserError(f"data: {data.source} yields no usable image (first ids: {skipped[:5]})")
            yield [batch.images.to(self.device, non_blocking=True) for batch in micro_batches]
        report_skipped(skipped, f"{data.source} [{data.train_split}]")

    def count(self, images: torch.Tensor) -> int:
        return len(images)

    def loss(self, model, images):
        return model(images, self.step)

    def client_state(self) -> dict:
        return {"data": loader_state(self.loader, self.step)}  # on every rank: each streams its own part

    @torch.no_grad()
    def before_step(self, micro_batches: list[torch.Tensor]) -> None:
        """A model that scales its targets by their spread (FlexTok) measures it once, before its first
        update, on the whole global batch (every micro-batch of every rank): the same for any rank count."""
        model = self.model
        if not hasattr(model, "fit_target_scale") or model.target_scale != 0:
            return
        moments = sum(model.target_moments(images) for images in micro_batches)
        model.fit_target_scale(dist.all_reduce_sum(moments.tolist(), self.device))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out PSNR/SSIM of `model` (the EMA weights), and a PNG grid: the first 8 originals, then each
        reconstruction. `train.eval_batch_size` images go through the model at a time (bf16 autocast on
        CUDA), so its memory is bounded whatever `data.eval_images`; image i is decoded with noise of its own
        (`first`), so the metrics do not depend on the chunking either."""
        images, size = self.eval_batch.images, self.loop.eval_batch_size
        scores: dict[str, list[torch.Tensor]] = {}
        columns: list[torch.Tensor] = []
        for first in range(0, len(images), size):
            chunk = images[first : first + size].to(self.device)
            with autocast(self.device):
                recons = model.eval_reconstructions(chunk, seed=self.cfg.seed, first=first)
            for name, recon in recons.items():
                recon = recon.float()
                scores.setdefault(f"psnr/{name}", []).append(psnr(recon, chunk).cpu())
                scores.setdefault(f"ssim/{name}", []).append(ssim(recon, chunk).cpu())
            if not columns:
                columns, titles = [chunk[:8].cpu()] + [r[:8].float().cpu() for r in recons.values()], list(recons)
        save_image_grid(columns, self.samples_path, ["original", *titles])
        return {name: torch.cat(values).mean().item() for name, values in scores.items()}

    def export(self) -> Path:
        data = self.cfg.data
        card = ModelCardInfo(data_source=data.source, data_split=data.train_split, resolution=data.resolution,
                             steps=self.step, metrics=self.last_eval)
        return self.ema.save_pretrained(self.run_dir / "final", card=card)
