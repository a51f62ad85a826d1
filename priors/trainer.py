"""The prior training loop behind `train_prior.py`: cached tokens -> DeepSpeed engine -> checkpoints -> Hub,
on the training skeleton of `base.training` (run layout, batches, seeding, resume: see there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from base.data import StepBatchSampler
from base.errors import TokenizerMismatch, UserError
from base.fingerprint import fingerprint_model
from base.hub import ModelCardInfo
from base.training import Trainer, grouped
from base.visualize import class_columns, save_image_grid
from flextok import load_tokenizer

from .deepspeed_utils import (
    DeepSpeedBackend,
    build_model,
    consolidated_weights,
    create_engine,
    deepspeed_config,
    init_distributed,
    local_device_name,
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


class PriorTrainer(Trainer):
    """`deepspeed_config_path`: the launcher's `--deepspeed_config` JSON, which wins over
    `prior_train.deepspeed_config`."""

    kind, unit = "prior", "tokens"

    def __init__(self, cfg: PriorRunConfig, resume: bool = False, deepspeed_config_path: str | None = None):
        if cfg.prior.tokenizer is None:
            raise UserError("prior.tokenizer: set it to the folder of a saved tokenizer")
        if Path(cfg.prior.tokenizer).resolve().is_relative_to(cfg.prior_run_dir.resolve()):
            raise UserError(f"{cfg.prior_run_dir} holds a tokenizer run: set prior_train.run_name to another folder")
        t = cfg.prior_train
        super().__init__(cfg, t, cfg.prior_run_dir, torch.device(local_device_name()), resume=resume,
                         section="prior_train")
        ds_config = deepspeed_config(t, self.device.type == "cuda", self.world_size,
                                     deepspeed_config_path or t.deepspeed_config)
        tokenizer = load_tokenizer(cfg.prior.tokenizer)
        tokenizer_hash = fingerprint_model(tokenizer)
        if self.pointer is not None and self.pointer.get("tokenizer_hash") != tokenizer_hash:  # before tokenizing
            raise TokenizerMismatch(
                f"{self.run_dir} was trained on tokens of tokenizer {str(self.pointer.get('tokenizer_hash'))[:12]}, "
                f"but prior.tokenizer={cfg.prior.tokenizer} is tokenizer {tokenizer_hash[:12]}"
            )
        self.tokenizer, self.train_tokens, self.eval_tokens = self._token_datasets(tokenizer)
        spec = self.train_tokens.spec
        self._check_labels()
        self.max_length = int(max(self.train_tokens.lengths.max(), self.eval_tokens.lengths.max()))

        def build() -> DiscretePrior | FlowPrior:
            return build_prior(cfg, spec, self.max_length)

        torch.manual_seed(cfg.seed)
        model = build_model(build, ds_config)
        if isinstance(model, FlowPrior):
            train = self.train_tokens
            model.set_normalization(normalization_sample(train.tokens, train.offsets, seed=cfg.seed))
        self.engine = create_engine(model, t, ds_config)
        if self.engine.fp16_enabled() and self.engine.zero_optimization_stage() == 0:
            raise UserError("prior_train.precision: fp16 needs zero_stage >= 1 (or use bf16)")
        self.backend = DeepSpeedBackend(self.engine, build)
        self.start()

    def join(self, timeout_minutes: float) -> tuple[int, int]:
        return init_distributed(timeout_minutes)

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
        """Training labels must be classes of the prior (held-out ones may be unseen classes: see held_out)."""
        classes, labels = self.cfg.prior.num_classes, self.train_tokens.labels
        if classes and (labels.min() < 0 or labels.max() >= classes):
            raise UserError(
                f"prior.num_classes={classes}, but the training labels span [{labels.min()}, {labels.max()}] "
                "(-1 = unlabeled); set num_classes to cover them, or 0 for an unconditional prior"
            )

    def batches(self, start: int):
        t = self.loop
        sampler = StepBatchSampler(len(self.train_tokens), t.batch_size, self.cfg.seed, start, t.steps, self.rank,
                                   self.world_size, t.grad_accumulation)
        for step in grouped(sampler, t.grad_accumulation):
            yield [self.train_tokens.batch(np.array([index for index, _ in pairs])) for pairs in step]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model predicts in this batch (EOS included), for tokens/s."""
        if "lengths" in batch:
            return int(batch["lengths"].sum()) + len(batch["lengths"])
        return batch["tokens"].shape[0] * batch["tokens"].shape[1]

    def loss(self, model, batch):
        return model(**{k: v.to(self.device) for k, v in batch.items()}), {}

    def evaluation_due(self) -> bool:
        return self.due(self.loop.eval_every) or self._sample_due()

    def _sample_due(self) -> bool:
        return self.due(self.loop.sample_every) and self.loop.num_samples > 0

    def evaluate(self, model: DiscretePrior | FlowPrior) -> dict[str, float]:
        if self._sample_due():
            self.sample(model)
        return self.held_out(model) if self.due(self.loop.eval_every) else {}

    @torch.no_grad()
    def held_out(self, model: DiscretePrior | FlowPrior) -> dict[str, float]:
        """Held-out bits per image (discrete) or fixed-noise velocity loss (flow).

        Always unconditional (the null class, which class dropout trains), so the figure is defined for
        any held-out split and comparable across tokenizers; conditional too when every held-out label is
        a trained class.
        """
        data, size = self.eval_tokens, self.loop.eval_batch_size
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
        path = self.samples_path
        columns, titles = class_columns(torch.cat(chunks), labels)
        save_image_grid(columns, path, titles)
        return path

    def client_state(self) -> dict[str, Any]:
        return {"tokenizer_hash": self.train_tokens.spec.tokenizer_hash}

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
