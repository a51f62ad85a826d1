"""The prior training loop behind `train_prior.py`: cached tokens -> DeepSpeed engine -> checkpoints -> Hub.

Run layout: runs/<name>/{config.yaml, metrics.jsonl, checkpoints/{latest.json, step_XXXXXXXX/},
samples/, final/}. The global batch of a step is a function of (seed, step) only and is split across
ranks and accumulation micro-steps; every micro-step reseeds torch from (seed, step, rank, micro-step).
Restoring the step (plus DeepSpeed's model, optimizer and LR-scheduler state) therefore restores the
data order and the random stream exactly, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from flextok import load_tokenizer
from flextok.config import save_config
from flextok.data import EpochOrder
from flextok.errors import TokenizerMismatch, UserError
from flextok.files import MetricsLog
from flextok.runtime import check_finite

from .deepspeed_utils import (
    broadcast_object,
    consolidated_weights,
    create_engine,
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
from .flow import FlowPrior
from .generate import generate_images
from .schema import PriorRunConfig
from .token_dataset import TokenDataset, TokenSpec, build_token_dataset, token_cache_dir

__all__ = ["PriorTrainer", "build_prior"]


NORMALIZATION_ROWS = 2**20  # latent vectors the flow prior's per-channel statistics are estimated from


def build_prior(cfg: PriorRunConfig, spec: TokenSpec, max_length: int) -> DiscretePrior | FlowPrior:
    """A freshly initialized prior of the configured kind for tokens described by `spec`."""
    if cfg.prior.kind == "flow":
        return FlowPrior(cfg.prior, num_tokens=max_length, token_dim=spec.token_dim,
                         tokenizer_hash=spec.tokenizer_hash)
    return DiscretePrior(cfg.prior, vocab_size=spec.vocab_size, max_length=max_length,
                         variable_length=spec.variable_length, token_set=spec.token_set,
                         tokenizer_hash=spec.tokenizer_hash)


class PriorTrainer:
    def __init__(self, cfg: PriorRunConfig, resume: bool = False):
        self.cfg, self.run_dir = cfg, cfg.prior_run_dir
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.checkpoint_dir = self.run_dir / "checkpoints"
        if cfg.prior.tokenizer is None:
            raise UserError("prior.tokenizer: set it to the folder of a saved tokenizer")
        if (self.checkpoint_dir / "latest.pt").exists() or Path(cfg.prior.tokenizer).resolve().is_relative_to(
            self.run_dir.resolve()
        ):
            raise UserError(f"{self.run_dir} holds a tokenizer run: set prior_train.run_name to another folder")
        self.rank, self.world_size = init_distributed()
        t = cfg.prior_train
        self.bf16 = on_cuda()
        if not self.bf16:
            local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // local_ranks))
        pointer = read_pointer(self.checkpoint_dir)
        if pointer is not None and not resume:
            raise UserError(f"{self.run_dir} already holds a run: pass --resume to continue it, or set name=<new>")
        if resume and pointer is None:  # a requeued job killed before its first checkpoint
            if self.rank == 0:
                print(f"--resume: no checkpoint in {self.checkpoint_dir} yet; starting from step 0")
            resume = False

        self.tokenizer, self.train_tokens, self.eval_tokens = self._token_datasets()
        spec = self.train_tokens.spec
        if pointer is not None and pointer.get("tokenizer_hash") != spec.tokenizer_hash:
            raise TokenizerMismatch(
                f"{self.run_dir} was trained on tokens of tokenizer {str(pointer.get('tokenizer_hash'))[:12]}, "
                f"but prior.tokenizer={cfg.prior.tokenizer} is tokenizer {spec.tokenizer_hash[:12]}"
            )
        self._check_labels()
        self.max_length = int(max(self.train_tokens.lengths.max(), self.eval_tokens.lengths.max()))
        global_batch = t.micro_batch_size * t.grad_accumulation * self.world_size
        self.order = EpochOrder(len(self.train_tokens), global_batch, cfg.seed)

        torch.manual_seed(cfg.seed)
        model = build_prior(cfg, spec, self.max_length)
        if isinstance(model, FlowPrior):
            model.set_normalization(torch.from_numpy(np.array(self.train_tokens.tokens[:NORMALIZATION_ROWS])))
        self.engine = create_engine(model, t, self.bf16)
        self.device = self.engine.device
        # rank 0 evaluates and samples with a plain copy of the weights (ZeRO-3 shards live elsewhere)
        self.shadow = build_prior(cfg, spec, self.max_length).to(self.device).eval() if self.rank == 0 else None
        self.step = int(load_checkpoint(self.engine, self.checkpoint_dir)["step"]) if resume else 0
        if self.rank == 0:
            self._discard_stale_progress()
            save_config(cfg, self.run_dir / "config.yaml")

    def _token_datasets(self) -> tuple[torch.nn.Module | None, TokenDataset, TokenDataset]:
        """Rank 0 loads the tokenizer and builds (or reuses) both caches; the others then open them."""
        cfg = self.cfg
        cache_root = token_cache_dir(cfg)
        tokenizer = None
        found: tuple[str, str, str] | None = None
        if self.rank == 0:
            try:
                tokenizer = load_tokenizer(cfg.prior.tokenizer)
                common = dict(seed=cfg.seed, device=local_device_name())
                train = build_token_dataset(tokenizer, cfg.prior, cfg.data, cfg.data.train_split, cache_root,
                                            flips=cfg.data.hflip, **common)
                held_out = build_token_dataset(tokenizer, cfg.prior, cfg.data, cfg.data.eval_split, cache_root,
                                               limit=cfg.data.eval_images, **common)
                found = (str(train.directory), str(held_out.directory), train.spec.tokenizer_hash)
            finally:  # the other ranks wait for this broadcast; send even when rank 0 failed
                found = broadcast_object(found) if self.world_size > 1 else found
            return tokenizer, train, held_out
        found = broadcast_object(found)
        if found is None:
            raise UserError("rank 0 could not build the token datasets (see its error)")
        train_dir, eval_dir, tokenizer_hash = found
        return None, TokenDataset.load(train_dir, tokenizer_hash), TokenDataset.load(eval_dir, tokenizer_hash)

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
            evaluate, sample = self.step % t.eval_every == 0 or last, self.step % t.sample_every == 0 or last
            if evaluate or sample:
                self._refresh_shadow()
            if evaluate and self.rank == 0:
                self.log({"step": self.step, **self.evaluate()})
            if sample and self.rank == 0 and t.num_samples:
                self.sample()
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
            stats = torch.tensor([loss.item(), count], dtype=torch.float64, device=self.device)
            if self.world_size > 1:  # every rank sees the same numbers, so all stop together on NaN
                torch.distributed.all_reduce(stats)
            check_finite("loss", stats[0].item(), self.step, self.checkpoint_dir)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += stats[0].item() / self.world_size
            tokens += stats[1].item()
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

    def _refresh_shadow(self) -> None:
        state = gathered_state_dict(self.engine)  # collective under ZeRO-3
        if self.shadow is not None:
            self.shadow.load_state_dict(state)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out bits per image (discrete) or fixed-noise velocity loss (flow).

        Always unconditional (the null class, which class dropout trains), so the figure is defined for
        any held-out split and comparable across tokenizers; conditional too when every held-out label is
        a trained class.
        """
        data, size = self.eval_tokens, self.cfg.prior_train.micro_batch_size
        classes = self.cfg.prior.num_classes
        conditional = classes > 0 and data.labels.min() >= 0 and data.labels.max() < classes
        metric = self.shadow.validation_loss if isinstance(self.shadow, FlowPrior) else self.shadow.nll_bits
        totals: dict[str, list[torch.Tensor]] = {"": [], "_cond": []}
        for start in range(0, len(data), size):
            rows = np.arange(start, min(start + size, len(data)))
            batch = {k: v.to(self.device) for k, v in data.batch(rows).items()}
            labels = batch.pop("labels")
            totals[""].append(metric(**batch, labels=None))
            if conditional:
                totals["_cond"].append(metric(**batch, labels=labels))
        name = "val_loss" if isinstance(self.shadow, FlowPrior) else "val_bits_per_image"
        return {f"{name}{suffix}": torch.cat(values).mean().item() for suffix, values in totals.items() if values}

    def sample(self) -> Path:
        t, classes = self.cfg.prior_train, self.cfg.prior.num_classes
        labels = torch.arange(t.num_samples) % classes if classes else None
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        generate_images(self.shadow, self.tokenizer, labels, num_samples=t.num_samples, path=path, seed=self.cfg.seed)
        return path

    def client_state(self) -> dict[str, Any]:
        return {"tokenizer_hash": self.train_tokens.spec.tokenizer_hash, "name": self.cfg.name}

    def save_checkpoint(self) -> str:
        return save_checkpoint(self.engine, self.checkpoint_dir, self.step, self.client_state())

    def export(self) -> Path:
        """Consolidate the last checkpoint (merging ZeRO shards, fp32) into Hub format at runs/<name>/final."""
        model = build_prior(self.cfg, self.train_tokens.spec, self.max_length)
        model.load_state_dict(consolidated_weights(self.checkpoint_dir, self.cfg.prior_train.zero_stage, self.bf16,
                                                   model))
        return model.save_pretrained(self.run_dir / "final")

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
