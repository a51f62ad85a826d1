"""What every row of one evaluation shares: settings, device, caches, held-out images, the FID backbone,
LPIPS, and the loaded models."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from base.classifier import DatasetClassifier
from base.data import (
    Batch,
    ImageDataset,
    collate,
    data_settings,
    load_images,
    load_source,
    report_skipped,
)
from base.errors import ConfigError, UserError
from base.fingerprint import fingerprint_model
from base.hub import load_model
from base.lpips import LPIPS, LPIPS_WEIGHTS_ENV
from base.runtime import pick_device
from base.schema import DataConfig
from priors import token_cache_dir

from .cache import ResultCache, tensor_digest
from .dataset_classifier import DatasetClassifierFeatures, train_dataset_classifier
from .frechet import FeatureExtractor, FeatureStats, compute_feature_stats, fid_from_stats
from .inception import InceptionV3Features
from .schema import ExperimentConfig

__all__ = ["EvalContext", "classifier_training_set", "load_subset"]


def load_subset(data: DataConfig, split: str, count: int, seed: int) -> Batch:
    """A seeded random subset of `split` (all of it when smaller); unlike the first `count` images it
    covers every class even when a source is sorted by class."""
    dataset = ImageDataset(load_source(data, split, seed), data, train=False)
    picks = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:count])
    batch = collate([dataset[int(i)] for i in picks])
    report_skipped(batch.skipped, f"{data.source} [{split}]")
    if batch.images.numel() == 0:
        raise UserError(f"data: {data.source} [{split}] yielded no usable image")
    return batch


def classifier_training_set(cfg: ExperimentConfig, batch: Batch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled images a dataset classifier trains on: `eval.train_images` of `data.train_split` (`batch`,
    where already loaded), with a one-line error where they have fewer than two classes."""
    batch = batch or load_subset(cfg.data, cfg.data.train_split, cfg.eval.train_images, cfg.seed)
    labels = batch.labels
    if labels.min() < 0 or len(labels.unique()) < 2:
        raise UserError(f"eval.fid_backbone: a dataset classifier needs at least two label classes in "
                        f"{cfg.data.source} [{cfg.data.train_split}] (found {sorted(set(labels.tolist()))[:5]}); "
                        "use inception")
    return batch.images, labels


class EvalContext:
    """What every row shares: settings, device, caches, held-out images, the FID backbone, loaded models."""

    def __init__(self, cfg: ExperimentConfig, progress: bool) -> None:
        if cfg.data.streaming:
            raise UserError("data.streaming: evaluation needs fixed, indexable splits; set data.streaming=false")
        self.cfg, self.settings, self.progress = cfg, cfg.eval, progress
        self.device = pick_device(cfg.eval.device, "eval.device")
        self.cache_root = Path(cfg.eval.cache_dir) if cfg.eval.cache_dir else Path(cfg.out_dir) / "eval_cache"
        self.cache = ResultCache(self.cache_root / "results")
        self.token_cache = token_cache_dir(cfg)  # the folder prior training fills: its caches are reused
        self.held_out = load_images(cfg.data, cfg.data.eval_split, cfg.eval.num_images, cfg.seed)
        self.held_out_key = tensor_digest(self.held_out.images)
        # rows of reconstructions.png: spread over the held-out set, which may be ordered by source photo or class
        count = len(self.held_out.images)
        self.preview_index = torch.linspace(0, count - 1, min(cfg.eval.grid_rows, count)).round().long().unique()
        self.token_memo: dict[str, list[list[torch.Tensor]]] = {}  # BPE entries reuse their tokenizer's tokens
        self.prefix_memo: dict[str, dict[int, torch.Tensor]] = {}  # a 1D tokenizer's prefix rows, decoded at once
        self.backbone = self._build_backbone()
        # the same classifier at other seeds, for the spread of each FID over backbones (eval.fid_seeds)
        self.spread_backbones = [self._trained_classifier(self.cfg.seed + i) for i in range(1, cfg.eval.fid_seeds)]
        self.lpips_weights = self.settings.lpips_weights or os.environ.get(LPIPS_WEIGHTS_ENV)
        self.lpips = self._load_lpips()
        self._models: dict[str, tuple[nn.Module, str]] = {}

    @cached_property
    def train_batch(self) -> Batch:
        return load_subset(self.cfg.data, self.cfg.data.train_split, self.settings.train_images, self.cfg.seed)

    @cached_property
    def held_out_stats(self) -> FeatureStats:
        """Backbone statistics of the held-out images: the real side of every rFID."""
        return compute_feature_stats(self.backbone, self.held_out.images.split(self.settings.batch_size))

    @cached_property
    def reference_stats(self) -> FeatureStats:
        """Backbone statistics of the training subset: the real side of every gFID (priors model that data)."""
        return compute_feature_stats(self.backbone, self.train_batch.images.split(self.settings.batch_size))

    @cached_property
    def spread_stats(self) -> list[tuple[FeatureExtractor, FeatureStats, FeatureStats]]:
        """Per spread backbone: it, its held-out statistics (rFID's real side) and its reference statistics
        (gFID's)."""
        split = lambda images: images.split(self.settings.batch_size)  # noqa: E731
        return [(b, compute_feature_stats(b, split(self.held_out.images)),
                 compute_feature_stats(b, split(self.train_batch.images))) for b in self.spread_backbones]

    def spread_fids(self, images: torch.Tensor, side: str) -> list[float]:
        """The FID of `images` under each spread backbone, against its held-out ("held_out": rFID) or reference
        ("reference": gFID) statistics."""
        column = {"held_out": 1, "reference": 2}[side]
        return [fid_from_stats(stats[column], compute_feature_stats(stats[0], images.split(self.settings.batch_size)))
                .value for stats in self.spread_stats]

    @property
    def spread_key(self) -> dict[str, list[str]]:
        """Part of every FID record's key where spread backbones exist (none: the keys stay as they were)."""
        return {"spread": [b.name for b in self.spread_backbones]} if self.spread_backbones else {}

    @property
    def reference_key(self) -> dict[str, Any]:
        return {"data": data_settings(self.cfg.data), "split": self.cfg.data.train_split,
                "count": self.settings.train_images, "seed": self.cfg.seed}

    def _build_backbone(self) -> FeatureExtractor:
        if self.settings.fid_backbone == "inception":
            return InceptionV3Features(self.settings.inception_weights, device=self.device)
        if self.settings.fid_classifier:
            return self._saved_classifier(self.settings.fid_classifier)
        return self._trained_classifier(self.cfg.seed)

    def _trained_classifier(self, seed: int) -> FeatureExtractor:
        images, labels = classifier_training_set(self.cfg, self.train_batch)
        extractor = train_dataset_classifier(
            images, labels, int(labels.max()) + 1, self.settings.classifier_steps, seed,
            self.cache_root / "fid", device=self.device, progress=self.progress,
        )
        # the classifier is named after its training inputs, but CPU training also depends on the thread
        # count: name it after its weights too, so that FIDs of differently trained copies never share a name
        extractor.name = f"{extractor.name}:weights-{fingerprint_model(extractor.network)[:12]}"
        return extractor

    def _load_lpips(self) -> tuple[LPIPS, str] | None:
        """LPIPS and its weights' fingerprint, when local weights are configured (they are never downloaded)."""
        if not self.lpips_weights:
            return None
        model = LPIPS.from_pretrained(self.lpips_weights)
        return model.to(self.device), fingerprint_model(model)

    def _saved_classifier(self, reference: str) -> DatasetClassifierFeatures:
        """A dataset classifier saved earlier, named after its weights alone: FIDs from the same weights share
        a name (and cache records) whoever trained them."""
        try:
            network = load_model(reference)
        except UserError as err:
            raise UserError(f"eval.fid_classifier: {err}") from None
        if not isinstance(network, DatasetClassifier):
            raise ConfigError(f"eval.fid_classifier: {reference} holds a '{network.model_type}' model, not a "
                              "dataset classifier (save one with train_classifier.py)")
        return DatasetClassifierFeatures(network, f"weights-{fingerprint_model(network)[:12]}", device=self.device)

    def backbone_info(self) -> dict[str, Any]:
        """Which backbone made every FID here, and how to read it (reports state it next to the numbers)."""
        info: dict[str, Any] = {"backbone": self.backbone.name, "kind": self.settings.fid_backbone,
                                "spread_backbones": [b.name for b in self.spread_backbones]}
        if self.settings.fid_backbone == "inception":
            info["note"] = "standard FID features (TF-ported Inception-v3 pool3 at 299x299)"
            return info
        info["note"] = ("dataset FID: features of a small classifier trained on this dataset's labels; comparable "
                        "only with FIDs from this same backbone, never with Inception FID")
        if self.settings.fid_classifier:
            network = self.backbone.network
            info["classifier"] = {"saved": self.settings.fid_classifier, "classes": network.num_classes,
                                  **self._classifier_accuracy(network.num_classes)}
            return info
        labels = self.train_batch.labels
        info["classifier"] = {"train_images": len(labels), "classes": int(labels.max()) + 1,
                              "steps": self.settings.classifier_steps,
                              **self._classifier_accuracy(int(labels.max()) + 1)}
        return info

    @torch.no_grad()
    def _classifier_accuracy(self, classes: int) -> dict[str, Any]:
        """The dataset classifier's accuracy on the held-out images whose labels are among its classes (a
        held-out split of unseen classes, like the embedded photographs', has none)."""
        images, labels = self.held_out.images, self.held_out.labels
        known = (labels >= 0) & (labels < classes)
        if not bool(known.any()):
            return {"test_accuracy": None, "test_images": 0}
        network = self.backbone.network
        logits = torch.cat([network(x.to(self.device)).cpu() for x in images[known].split(self.settings.batch_size)])
        accuracy = (logits.argmax(1) == labels[known]).float().mean().item()
        return {"test_accuracy": accuracy, "test_images": int(known.sum())}

    def model(self, path: str) -> tuple[nn.Module, str]:
        """A saved model on the device, loaded once per path, with its fingerprint taken as loaded."""
        if path not in self._models:
            model = load_model(path)
            self._models[path] = (model, fingerprint_model(model))
            model.to(self.device)
        return self._models[path]
