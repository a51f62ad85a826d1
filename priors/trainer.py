"""The prior training loop behind `train_prior.py`: cached tokens -> DeepSpeed engine -> checkpoints -> Hub.

Run layout: runs/<name>/{config.yaml, metrics.jsonl, checkpoints/{latest.json, step_XXXXXXXX/},
samples/, final/}. The global batch of a step is a function of (seed, step) only and is split across
ranks and accumulation micro-steps; every micro-step reseeds torch from (seed, step, rank, micro-step).
Restoring the step (plus DeepSpeed's model, optimizer and LR-scheduler state) therefore restores the
data order and the random stream exactly, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from base import distributed as dist
from base.config import save_config
from base.data import EpochOrder
from base.errors import TokenizerMismatch, UserError
from base.files import MetricsLog, refuse_existing_run
from base.fingerprint import fingerprint_model
from base.hub import ModelCardInfo
from base.runtime import check_finite
from base.visualize import class_columns, save_image_grid
from flextok import load_tokenizer

from .deepspeed_utils import (
    build_model,
    consolidated_weights,
    create_engine,
    deepspeed_config,
    gathered_state_dict,
    init_distributed,
    load_checkpoint,
    local_device_name,
    on_cuda,
    read_pointer,
    remove_stale_tags,
    save_checkpoint,
)
from .discrete import DiscretePrior
from .flow import FlowPrior, normalization_sample
from .generate import generate_images
from .schema import PriorRunConfig
from .token_dataset import TokenDataset, TokenSpec, build_token_dataset, token_cache_dir

__all__ = ["PriorTrainer", "build_prior"]


def build_prior(cfg: PriorRunConfig, spec: TokenSpec, max_length: int) -> DiscretePrior | FlowPrior:
    """A freshly initialized prior of the configured kind for tokens described by `spec`."""
    if cfg.prior.kind == "flow":
        return FlowPrior(cfg.prior, num_tokens=max_length, token_dim=spec.token_dim,
                         tokenizer_hash=spec.tokenizer_hash)
    return DiscretePrior(cfg.prior, vocab_size=spec.vocab_size, max_length=max_length,
                         variable_length=spec.variable_length, token_set=spec.token_set,
                         tokenizer_hash=spec.tokenizer_hash)


class PriorTrainer:
    """`deepspeed_config`: the launcher's `--deepspeed_config` JSON, which wins over
    `prior_train.deepspeed_config`."""

    def __init__(self, cfg: PriorRunConfig, resume: bool = False, deepspeed_config_path: str | None = None):
        self.cfg, self.run_dir = cfg, cfg.prior_run_dir
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.checkpoint_dir = self.run_dir / "checkpoints"
        if cfg.prior.tokenizer is None:
            raise UserError("prior.tokenizer: set it to the folder of a saved tokenizer")
        if (self.checkpoint_dir / "latest.pt").exists() or Path(cfg.prior.tokenizer).resolve().is_relative_to(
            self.run_dir.resolve()
        ):
            raise UserError(f"{self.run_dir} holds a tokenizer run: set prior_train.run_name to another folder")
        pointer = read_pointer(self.checkpoint_dir)
        refuse_existing_run(self.run_dir, resume, has_checkpoint=pointer is not None)  # before any rank starts
        self.rank, self.world_size = init_distributed(cfg.distributed.wait_timeout)
        t = cfg.prior_train
        self.ds_config = deepspeed_config(t, on_cuda(), self.world_size, deepspeed_config_path or t.deepspeed_config)
        if not on_cuda():
            torch.set_num_threads(dist.threads_per_rank(t.threads))
        if resume and pointer is None:  # a requeued job killed before its first checkpoint
            if self.rank == 0:
                print(f"--resume: no checkpoint in {self.checkpoint_dir} yet; starting from step 0")
            resume = False

        tokenizer = load_tokenizer(cfg.prior.tokenizer)
        tokenizer_hash = fingerprint_model(tokenizer)
        if pointer is not None and pointer.get("tokenizer_hash") != tokenizer_hash:  # before tokenizing a dataset
            raise TokenizerMismatch(
                f"{self.run_dir} was trained on tokens of tokenizer {str(pointer.get('tokenizer_hash'))[:12]}, "
                f"but prior.tokenizer={cfg.prior.tokenizer} is tokenizer {tokenizer_hash[:12]}"
            )
        self.tokenizer, self.train_tokens, self.eval_tokens = self._token_datasets(tokenizer)
        spec = self.train_tokens.spec
        self._check_labels()
        self.max_length = int(max(self.train_tokens.lengths.max(), self.eval_tokens.lengths.max()))
        global_batch = t.micro_batch_size * t.grad_accumulation * self.world_size
        self.order = EpochOrder(len(self.train_tokens), global_batch, cfg.seed)

        torch.manual_seed(cfg.seed)
        model = build_model(lambda: build_prior(cfg, spec, self.max_length), self.ds_config)
        if isinstance(model, FlowPrior):
            train = self.train_tokens
            model.set_normalization(normalization_sample(train.tokens, train.offsets, seed=cfg.seed))
        self.engine = create_engine(model, t, self.ds_config)
        if self.engine.fp16_enabled() and self.engine.zero_optimization_stage() == 0:
            raise UserError("prior_train.precision: fp16 needs zero_stage >= 1 (or use bf16)")
        self.device = self.engine.device
        self.last_eval: dict[str, float] = {}
        self.step = int(load_checkpoint(self.engine, self.checkpoint_dir)["step"]) if resume else 0
        if self.rank == 0:
            self._discard_stale_progress()
            save_config(cfg, self.run_dir / "config.yaml")

    def _token_datasets(self, tokenizer: torch.nn.Module) -> tuple[torch.nn.Module | None, TokenDataset, TokenDataset]:
        """Every rank tokenizes its shards of both splits (see `build_token_dataset`) and opens the merged
        caches; rank 0 keeps the tokenizer, to decode sample grids."""
        cfg = self.cfg
        common = dict(seed=cfg.seed, device=local_device_name(), rank=self.rank, world_size=self.world_size,
                      wait_timeout=cfg.distributed.wait_timeout)
        cache_root = token_cache_dir(cfg)
        train = build_token_dataset(tokenizer, cfg.prior, cfg.data, cfg.data.train_split, cache_root,
                                    flips=cfg.data.hflip, **common)
        held_out = build_token_dataset(tokenizer, cfg.prior, cfg.data, cfg.data.eval_split, cache_root,
                                       limit=cfg.data.eval_images, **common)
        return (tokenizer if self.rank == 0 else None), train, held_out

    def _check_labels(self) -> None:
        """Training labels must be classes of the prior (held-out ones may be unseen classes: see evaluate)."""
        classes, labels = self.cfg.prior.num_classes, self.train_tokens.labels
        if classes and (labels.min() < 0 or labels.max() >= classes):
            raise UserError(
                f"prior.num_classes={classes}, but the training labels span [{labels.min()}, {labels.max()}] "
                "(-1 = unlabeled); set num_classes to cover them, or 0 for an unconditional prior"
            )

    def batch_indices(self, step: int) -> np.ndarray:
        """The global batch of `step` (all ranks, all micro-steps), epoch-wise shuffled by (seed, epoch)."""
        return self.order.batch(step)[0]

    def train(self) -> Path | None:
        """Train to `prior_train.steps`; rank 0 returns the exported Hub folder (other ranks: None)."""
        t = self.cfg.prior_train
        bar = tqdm(total=t.steps, initial=self.step, desc=self.cfg.name, unit="step", dynamic_ncols=True,
                   disable=self.rank != 0)
        tokens_seen, train_seconds = 0.0, 0.0  # throughput of training steps alone (no eval, samples, saves)
        while self.step < t.steps:
            started = time.perf_counter()
            logs = self.train_step()
            train_seconds += time.perf_counter() - started
            self.step += 1
            tokens_seen += logs.pop("tokens")
            rate = tokens_seen / train_seconds
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{rate:.0f}")
            last = self.step == t.steps
            if self.step % t.log_every == 0 or last:
                self.log({"step": self.step, "tokens_per_s": rate, **logs})
            evaluate = self.step % t.eval_every == 0 or last
            sample = (self.step % t.sample_every == 0 or last) and t.num_samples > 0
            if evaluate or sample:
                model = self._full_model()  # collective under ZeRO-3; None on ranks > 0
                if evaluate and model is not None:
                    self.last_eval = self.evaluate(model)
                    self.log({"step": self.step, **self.last_eval})
                if sample and model is not None:
                    self.sample(model)
                del model
            if self.step % t.checkpoint_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        return self.export() if self.rank == 0 else None

    def train_step(self) -> dict[str, float]:
        t = self.cfg.prior_train
        self.engine.train()
        indices = self.batch_indices(self.step)
        loss_sum, tokens = 0.0, 0.0
        for micro in range(t.grad_accumulation):
            seed = np.random.SeedSequence([self.cfg.seed, self.step, self.rank, micro]).generate_state(1)[0]
            torch.manual_seed(int(seed))
            start = (micro * self.world_size + self.rank) * t.micro_batch_size
            batch = self.train_tokens.batch(indices[start : start + t.micro_batch_size])
            count = self._target_count(batch)
            loss = self.engine(**{k: v.to(self.device) for k, v in batch.items()})
            loss_total, count_total = dist.all_reduce_sum([loss.item(), count], self.device)
            check_finite("loss", loss_total, self.step, self.checkpoint_dir)  # every rank stops together
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss_total / self.world_size
            tokens += count_total
        logs = {"loss": loss_sum / t.grad_accumulation, "lr": self.engine.get_lr()[0], "tokens": tokens}
        grad_norm = self.engine.get_global_grad_norm()  # DeepSpeed reports none at ZeRO-0 in fp32
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        return logs

    def _target_count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model predicts in this batch (EOS included), for tokens/s."""
        if "lengths" in batch:
            return int(batch["lengths"].sum()) + len(batch["lengths"])
        return batch["tokens"].shape[0] * batch["tokens"].shape[1]

    def _full_model(self) -> DiscretePrior | FlowPrior | None:
        """On rank 0, a plain fp32 copy of the current weights for evaluation and sample grids, built only
        for the occasion (under ZeRO-3 the weights are gathered for it); None on the other ranks."""
        state = gathered_state_dict(self.engine)
        if state is None:
            return None
        model = build_prior(self.cfg, self.train_tokens.spec, self.max_length)
        model.load_state_dict(state)
        return model.to(self.device).eval()

    @torch.no_grad()
    def evaluate(self, model: DiscretePrior | FlowPrior) -> dict[str, float]:
        """Held-out bits per image (discrete) or fixed-noise velocity loss (flow).

        Always unconditional (the null class, which class dropout trains), so the figure is defined for
        any held-out split and comparable across tokenizers; conditional too when every held-out label is
        a trained class.
        """
        data, size = self.eval_tokens, self.cfg.prior_train.micro_batch_size
        classes = self.cfg.prior.num_classes
        conditional = classes > 0 and data.labels.min() >= 0 and data.labels.max() < classes
        metric = model.validation_loss if isinstance(model, FlowPrior) else model.nll_bits
        totals: dict[str, list[torch.Tensor]] = {"": [], "_cond": []}
        for start in range(0, len(data), size):
            rows = np.arange(start, min(start + size, len(data)))
            batch = {k: v.to(self.device) for k, v in data.batch(rows).items()}
            labels = batch.pop("labels")
            totals[""].append(metric(**batch, labels=None))
            if conditional:
                totals["_cond"].append(metric(**batch, labels=labels))
        name = "val_loss" if isinstance(model, FlowPrior) else "val_bits_per_image"
        return {f"{name}{suffix}": torch.cat(values).mean().item() for suffix, values in totals.items() if values}

    def sample(self, model: DiscretePrior | FlowPrior) -> Path:
        """A grid of `prior_train.num_samples` images, one column per class, sampled and decoded
        `prior_train.eval_batch_size` at a time (bounded memory). Samples first, first + 1, ... are drawn
        with seed + first: a grid of more than one chunk depends on the chunk size (a picture, not a metric)."""
        t, classes = self.cfg.prior_train, self.cfg.prior.num_classes
        labels = torch.arange(t.num_samples) % classes if classes else None
        chunks = []
        for first in range(0, t.num_samples, t.eval_batch_size):
            count = min(t.eval_batch_size, t.num_samples - first)
            chunk = None if labels is None else labels[first : first + count]
            chunks.append(generate_images(model, self.tokenizer, chunk, num_samples=count, seed=self.cfg.seed + first))
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        columns, titles = class_columns(torch.cat(chunks), labels)
        save_image_grid(columns, path, titles)
        return path

    def client_state(self) -> dict[str, Any]:
        return {"tokenizer_hash": self.train_tokens.spec.tokenizer_hash, "name": self.cfg.name}

    def save_checkpoint(self) -> str:
        return save_checkpoint(self.engine, self.checkpoint_dir, self.step, self.client_state())

    def export(self) -> Path:
        """Consolidate the last checkpoint (merging ZeRO shards, fp32) into Hub format at runs/<name>/final."""
        model = build_prior(self.cfg, self.train_tokens.spec, self.max_length)
        model.load_state_dict(consolidated_weights(self.checkpoint_dir, self.engine.zero_optimization_stage(),
                                                   self.engine.bfloat16_enabled(), model))
        data = self.cfg.data
        images = len(self.train_tokens) // (2 if data.hflip else 1)  # the cache holds each image's mirror too
        card = ModelCardInfo(data_source=data.source, data_split=data.train_split, num_images=images,
                             resolution=data.resolution, steps=self.step, metrics=self.last_eval)
        return model.save_pretrained(self.run_dir / "final", card=card)

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.metrics.append(record)

    def _discard_stale_progress(self) -> None:
        """Drop metrics logged after the step this run starts from (a killed run's last steps are redone;
        a fresh start keeps none), and checkpoint folders a kill left half-written."""
        self.metrics.truncate_after(self.step)
        if self.checkpoint_dir.is_dir():
            pointer = read_pointer(self.checkpoint_dir)
            remove_stale_tags(self.checkpoint_dir, keep=pointer["tag"] if pointer else None)
