"""A "dataset FID" backbone: a small CNN trained on the dataset's own labels.

Its features give an FID named `dataset_classifier:<hash>`, which must never be compared with
Inception FID. Trained weights are cached per data and config, so every evaluation of a
dataset uses the same backbone. The network (`base.classifier.DatasetClassifier`) lives in the base layer:
saved with `save_pretrained`, it is also a REPA teacher for the tokenizer stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from base.classifier import ClassifierConfig, DatasetClassifier
from base.files import atomic_write

from .frechet import FeatureExtractor, batched_features

__all__ = [
    "DatasetClassifierFeatures",
    "dataset_classifier_key",
    "fit_dataset_classifier",
    "train_dataset_classifier",
]


class DatasetClassifierFeatures(FeatureExtractor):
    """'Dataset FID' features from a `DatasetClassifier` trained on this dataset's labels.

    The name `dataset_classifier:<key>` ties results to the exact data and training
    config, so they are never compared with Inception FID or with another classifier.
    """

    def __init__(
        self,
        network: DatasetClassifier,
        key: str,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.key = key
        self.name = f"dataset_classifier:{key}"
        self.feature_dim = network.feature_dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return batched_features(self.network.features, images, self.device, self.batch_size)


def _classifier_config(
    num_classes: int, steps: int, seed: int, batch_size: int, lr: float, width: int, feature_dim: int
) -> dict[str, int | float | str]:
    """Everything that determines the trained weights besides the data."""
    return {
        "format": "flextok-dataset-classifier-v1",
        "num_classes": num_classes,
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "width": width,
        "feature_dim": feature_dim,
    }


def dataset_classifier_key(images: torch.Tensor, labels: torch.Tensor, config: Mapping[str, object]) -> str:
    """Short sha256 over the images, labels and training config: the cache key and backbone id."""
    digest = hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_labelled_images(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 16:
        raise ValueError(f"expected images shaped [N, 3, H>=16, W>=16], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels shaped [{images.shape[0]}], got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


def _fit_classifier(
    network: DatasetClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: Mapping[str, int | float | str],
    device: torch.device,
    progress: bool,
) -> None:
    """Cross-entropy training on random minibatches drawn with a seeded generator."""
    generator = torch.Generator().manual_seed(int(config["seed"]))
    optimizer = torch.optim.AdamW(network.parameters(), lr=float(config["lr"]))
    network.to(device).train()
    bar = tqdm(range(int(config["steps"])), desc="dataset classifier", disable=not progress)
    for _ in bar:
        index = torch.randint(0, images.shape[0], (int(config["batch_size"]),), generator=generator)
        logits = network(images[index].to(device, torch.float32))
        loss = F.cross_entropy(logits, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    network.eval()


def _new_classifier(config: Mapping[str, int | float | str]) -> DatasetClassifier:
    """Build the classifier with seeded init without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))
        return DatasetClassifier(ClassifierConfig(num_classes=int(config["num_classes"]), width=int(config["width"]),
                                                  feature_dim=int(config["feature_dim"])))


def _save_classifier(network: DatasetClassifier, path: Path, config: Mapping[str, object], key: str) -> None:
    """Write the weights atomically, so a concurrent run never reads a half-written cache file."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    metadata = {"config": json.dumps(dict(config), sort_keys=True), "key": key}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def fit_dataset_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 32,
    feature_dim: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[DatasetClassifier, str]:
    """A dataset classifier trained on `images` `[N, 3, H, W]` in [-1, 1] (H, W >= 16) and int `labels` `[N]`,
    and the key that hashes its training inputs and config."""
    _check_labelled_images(images, labels, num_classes)
    config = _classifier_config(num_classes, steps, seed, batch_size, lr, width, feature_dim)
    network = _new_classifier(config)
    _fit_classifier(network, images, labels.long(), config, torch.device(device), progress)
    return network, dataset_classifier_key(images, labels, config)


def train_dataset_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int,
    seed: int,
    cache_dir: str | os.PathLike[str],
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 32,
    feature_dim: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> DatasetClassifierFeatures:
    """Train (once) a dataset classifier and return it as an FID feature extractor.

    Weights are cached as `<cache_dir>/dataset_classifier-<key>.safetensors` where `key`
    hashes the images, labels and config; a later call with the same inputs reloads them
    instead of training, so every evaluation of a dataset uses the same backbone.
    `images` are `[N, 3, H, W]` in [-1, 1] with H, W >= 16; `labels` are `[N]` ints.
    """
    _check_labelled_images(images, labels, num_classes)
    config = _classifier_config(num_classes, steps, seed, batch_size, lr, width, feature_dim)
    key = dataset_classifier_key(images, labels, config)
    path = Path(cache_dir) / f"dataset_classifier-{key}.safetensors"
    if path.is_file():
        network = _new_classifier(config)
        network.load_state_dict(load_file(path), strict=True)
    else:
        network, _ = fit_dataset_classifier(images, labels, num_classes, steps, seed, batch_size, lr, width,
                                            feature_dim, device, progress)
        _save_classifier(network, path, config, key)
    return DatasetClassifierFeatures(network, key, device=device)
