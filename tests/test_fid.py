"""FID: the distance itself, streaming statistics, both backbones, and FID's response to corruption."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import evaluation.dataset_classifier as dataset_classifier_module
import evaluation.inception as inception_module
from evaluation.dataset_classifier import (
    DatasetClassifierFeatures,
    train_dataset_classifier,
)
from evaluation.frechet import (
    FeatureStats,
    compute_feature_stats,
    fid,
    fid_from_stats,
    frechet_distance,
)
from evaluation.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    FIDInceptionV3,
    InceptionV3Features,
)

NUM_CLASSES = 4
IMAGE_SIZE = 16
# Small enough to train in well under a second on 2 cores, and still 100% accurate here.
CLASSIFIER_CONFIG = {"steps": 40, "seed": 0, "batch_size": 32, "width": 16, "feature_dim": 64}


def synthetic_labelled_images(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes: horizontal, vertical and diagonal stripes, and a blob; random colour and phase."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.tensor([0.0, math.pi / 2, math.pi / 4, 0.0])[labels].view(n, 1, 1)
    frequency = 2 + 3 * torch.rand(n, 1, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=generator)
    stripes = torch.sin(math.pi * frequency * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
    centre = torch.rand(n, 2, 1, 1, generator=generator) * 1.2 - 0.6
    blob = torch.exp(-((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) / 0.1) * 2 - 1
    pattern = torch.where((labels == 3).view(n, 1, 1), blob, stripes)
    colour = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=generator)
    images = pattern[:, None] * colour + 0.05 * torch.randn(n, 3, size, size, generator=generator)
    return images.clamp(-1, 1), labels


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    channels = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def random_covariance(dim: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    factors = rng.standard_normal((dim, rank))
    return factors @ factors.T / rank



def test_frechet_distance_matches_direct_scipy_computation() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    sigma1, sigma2 = random_covariance(16, 64, rng), random_covariance(16, 64, rng)
    expected = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(sigma1)
        + np.trace(sigma2)
        - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    )
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_handles_singular_covariances() -> None:
    rng = np.random.default_rng(1)
    sigma1, sigma2 = random_covariance(32, 4, rng), random_covariance(32, 4, rng)
    value = frechet_distance(np.zeros(32), sigma1, np.zeros(32), sigma2)
    assert np.isfinite(value) and value > 0
    assert abs(frechet_distance(np.zeros(32), sigma1, np.zeros(32), sigma1)) < 1e-4


def test_feature_stats_stream_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    features = rng.standard_normal((103, 8)) * 3 + 5
    stats = FeatureStats(8, backbone="test")
    for chunk in np.array_split(features, [1, 40, 41, 90]):
        stats.update(torch.from_numpy(chunk).float())
    float32_features = features.astype(np.float32).astype(np.float64)
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, float32_features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(float32_features, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_refuses_to_mix_backbones() -> None:
    a, b = FeatureStats(2, backbone="inception_v3:x"), FeatureStats(2, backbone="dataset_classifier:y")
    a.update(np.eye(2)), b.update(np.eye(2))
    with pytest.raises(ValueError, match="different backbones"):
        fid_from_stats(a, b)



@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dataset_classifier")


@pytest.fixture(scope="module")
def classifier(classifier_dir: Path) -> DatasetClassifierFeatures:
    images, labels = synthetic_labelled_images(512, seed=0)
    return train_dataset_classifier(
        images, labels, NUM_CLASSES, cache_dir=classifier_dir, **CLASSIFIER_CONFIG
    )


def test_classifier_learns_the_labels(classifier: DatasetClassifierFeatures) -> None:
    images, labels = synthetic_labelled_images(256, seed=5)
    with torch.no_grad():
        accuracy = (classifier.network(images).argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.9


def test_classifier_is_named_and_cached(
    classifier: DatasetClassifierFeatures, classifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert classifier.name == f"dataset_classifier:{classifier.key}"
    assert (classifier_dir / f"dataset_classifier-{classifier.key}.safetensors").is_file()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached classifier must not be retrained")

    monkeypatch.setattr(dataset_classifier_module, "_fit_classifier", fail)
    images, labels = synthetic_labelled_images(512, seed=0)
    reloaded = train_dataset_classifier(
        images, labels, NUM_CLASSES, cache_dir=classifier_dir, **CLASSIFIER_CONFIG
    )
    assert reloaded.name == classifier.name
    torch.testing.assert_close(reloaded(images[:8]), classifier(images[:8]))


def test_classifier_name_depends_on_data_and_config(tmp_path: Path) -> None:
    images, labels = synthetic_labelled_images(64, seed=4)

    def name(images: torch.Tensor, labels: torch.Tensor, steps: int = 0) -> str:
        return train_dataset_classifier(images, labels, NUM_CLASSES, steps, seed=0, cache_dir=tmp_path).name

    reference = name(images, labels)
    assert name(images, labels) == reference
    assert name(images.flip(-1), labels) != reference
    assert name(images, labels.roll(1)) != reference
    assert name(images, labels, steps=1) != reference


@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_classifier_features_at_any_resolution(
    classifier: DatasetClassifierFeatures, size: tuple[int, int]
) -> None:
    assert classifier(torch.zeros(3, 3, *size)).shape == (3, classifier.feature_dim)


def test_fid_of_a_set_with_itself_is_zero(classifier: DatasetClassifierFeatures) -> None:
    images, _ = synthetic_labelled_images(300, seed=1)
    result = fid(classifier, images.split(64), images.split(100))
    assert abs(result.value) < 1e-6
    assert (result.backbone, result.num_real, result.num_fake) == (classifier.name, 300, 300)


def test_fid_grows_with_blur_and_noise(classifier: DatasetClassifierFeatures) -> None:
    real, _ = synthetic_labelled_images(400, seed=1)
    fake, _ = synthetic_labelled_images(400, seed=2)
    real_stats = compute_feature_stats(classifier, real.split(128))

    def score(images: torch.Tensor) -> float:
        return fid_from_stats(real_stats, compute_feature_stats(classifier, [images])).value

    noise = torch.randn(fake.shape, generator=torch.Generator().manual_seed(3))
    clean = score(fake)
    blurred = [score(gaussian_blur(fake, sigma)) for sigma in (1.25, 1.75, 2.5)]
    noisy = [score((fake + level * noise).clamp(-1, 1)) for level in (0.5, 0.75, 1.0)]
    assert clean < blurred[0] < blurred[1] < blurred[2]
    assert clean < noisy[0] < noisy[1] < noisy[2]



def test_inception_architecture_matches_the_fid_checkpoint_layout() -> None:
    model = FIDInceptionV3()
    # torchvision Inception-v3 (27,161,264 params) minus its 1000-way fc (2,049,000) and
    # AuxLogits (3,326,696): the trunk the pt_inception checkpoint stores besides its fc.
    assert sum(parameter.numel() for parameter in model.parameters()) == 21_785_568
    state = model.state_dict()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")


def test_inception_pooling_excludes_padding() -> None:
    pooled = inception_module._avg_pool_3x3_excluding_pad(torch.ones(1, 1, 4, 4))
    torch.testing.assert_close(pooled, torch.ones(1, 1, 4, 4))


def test_inception_forward_and_weights_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    weights = tmp_path / "inception.pth"
    torch.save(state, weights)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights))

    extractor = InceptionV3Features()
    loaded = extractor.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())
    assert not extractor.model.training
    assert extractor.name.startswith("inception_v3:custom-"), "non-standard weights must not pass as standard"

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = extractor(images)
    assert features.shape == (2, 2048) and extractor.feature_dim == 2048
    assert torch.isfinite(features).all()


def test_missing_inception_weights_explain_how_to_provide_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV) as error:
        InceptionV3Features()
    assert INCEPTION_WEIGHTS_FILENAME in str(error.value)
    with pytest.raises(FileNotFoundError, match="no file at"):
        InceptionV3Features(weights_path=tmp_path / "absent.pth")
