"""LPIPS module behaviour with honest random weights (real weights cannot be downloaded here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from base.lpips import LPIPS, LPIPS_WEIGHTS_ENV, lpips_state_dict_shapes
from base.weights import resolve_local_weights


def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """He-initialised convs and non-negative lin weights, as trained LPIPS lins are."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in lpips_state_dict_shapes().items():
        if key.startswith("lins."):
            state[key] = torch.rand(shape, generator=generator) / shape[1]
        elif key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.zeros(shape)
    return state


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS(_random_state_dict(seed=0))


@pytest.fixture()
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1


def test_distance_to_itself_is_zero(lpips: LPIPS, images: torch.Tensor) -> None:
    distance = lpips(images, images)
    assert distance.shape == (2,)
    torch.testing.assert_close(distance, torch.zeros(2))


def test_distance_grows_with_noise(lpips: LPIPS, images: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(images.shape, generator=generator)
    noisy = [(images + level * noise).clamp(-1, 1) for level in (0.05, 0.2, 0.6)]
    distances = torch.stack([lpips(images, other) for other in noisy])
    assert torch.all(distances[0] > 0)
    assert torch.all(distances[1:] > distances[:-1])


def test_gradients_reach_the_input_but_not_the_weights(lpips: LPIPS, images: torch.Tensor) -> None:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    target = (images + 0.1 * noise).clamp(-1, 1)
    prediction = images.clone().requires_grad_(True)
    lpips(prediction, target).sum().backward()
    assert prediction.grad is not None and torch.isfinite(prediction.grad).all()
    assert prediction.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in lpips.parameters())


def test_gradient_is_finite_at_zero_distance(lpips: LPIPS, images: torch.Tensor) -> None:
    prediction = images.clone().requires_grad_(True)
    lpips(prediction, images).sum().backward()
    assert torch.isfinite(prediction.grad).all()


def test_train_mode_does_not_change_the_distance(lpips: LPIPS, images: torch.Tensor) -> None:
    other = images.flip(-1)
    expected = lpips(images, other)
    lpips.train()
    try:
        torch.testing.assert_close(lpips(images, other), expected)
    finally:
        lpips.eval()


def test_saved_weights_reload_from_env(
    lpips: LPIPS, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lpips_vgg.safetensors"
    lpips.save_weights(path)
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(path))
    reloaded = LPIPS.from_pretrained()
    torch.testing.assert_close(reloaded(images, images.flip(-1)), lpips(images, images.flip(-1)))


def test_combines_torchvision_and_lpips_files(lpips: LPIPS, images: torch.Tensor, tmp_path: Path) -> None:
    state = _random_state_dict(seed=0)
    vgg_state = {key: value for key, value in state.items() if key.startswith("features.")}
    vgg_state["classifier.0.weight"] = torch.zeros(4, 4)
    lin_state = {f"lin{k}.model.1.weight": state[f"lins.{k}.weight"] for k in range(5)}
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    torch.save(lin_state, tmp_path / "vgg.pth")
    combined = LPIPS.from_torchvision_and_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    torch.testing.assert_close(combined(images, images.flip(-1)), lpips(images, images.flip(-1)))


def test_incomplete_weights_are_rejected() -> None:
    state = _random_state_dict(seed=0)
    del state["lins.4.weight"]
    with pytest.raises(RuntimeError, match="lins.4.weight"):
        LPIPS(state)


def test_missing_weights_explain_how_to_provide_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=LPIPS_WEIGHTS_ENV) as error:
        LPIPS.from_pretrained()
    assert "vgg16-397923af.pth" in str(error.value) and "vgg.pth" in str(error.value)
    with pytest.raises(FileNotFoundError, match="no LPIPS weights file at"):
        LPIPS.from_pretrained(tmp_path / "absent.safetensors")


def test_resolve_local_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_var = "FLEXTOK_TEST_WEIGHTS"
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    other = tmp_path / "other.bin"
    other.write_bytes(b"")

    def message(detail: str) -> str:
        return f"weights missing ({detail})"

    monkeypatch.setenv(env_var, str(other))
    assert resolve_local_weights(weights, env_var, message) == weights, "an explicit path wins over the env var"
    assert resolve_local_weights(None, env_var, message) == other
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_local_weights("~/weights.bin", env_var, message) == weights

    monkeypatch.delenv(env_var)
    with pytest.raises(FileNotFoundError, match=rf"^weights missing \({env_var} is not set\)$"):
        resolve_local_weights(None, env_var, message)
    monkeypatch.setenv(env_var, "")
    with pytest.raises(FileNotFoundError, match=f"{env_var} is not set"):
        resolve_local_weights(None, env_var, message)
    absent = tmp_path / "absent.bin"
    with pytest.raises(FileNotFoundError, match=rf"^weights missing \(no file at {re.escape(str(absent))}\)$"):
        resolve_local_weights(absent, env_var, message)
    monkeypatch.setenv(env_var, str(absent))
    with pytest.raises(FileNotFoundError, match="no demo file at"):
        resolve_local_weights(None, env_var, message, what="demo")
    with pytest.raises(FileNotFoundError, match="no file at"):
        resolve_local_weights(tmp_path, env_var, message)


def test_a_loss_term_without_weights_names_its_config_key(tmp_path: Path) -> None:
    from base.errors import UserError

    with pytest.raises(UserError, match=r"^loss\.lpips_weights: LPIPS weights not found \(no LPIPS weights file at"):
        LPIPS.for_training(tmp_path / "absent.safetensors", "loss.lpips_weights")
