"""Hub format for every model: `config.json` + `model.safetensors`, loadable from a folder or a hub id.

`config.json` holds {"model_type": <registered name>, "config": <the model's dataclass config>}, so
`load_model(path)` can rebuild the right class without the caller knowing it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from .config import from_dict
from .errors import UserError
from .files import atomic_write, atomic_write_text

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "HubMixin", "load_model", "read_model_meta", "register_model",
           "resolve_model_dir"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPES: dict[str, type] = {}  # filled by `register_model` where each model class is defined


def register_model(name: str):
    """Class decorator: make a model class loadable by `load_model` under `name`."""

    def wrap(cls):
        cls.model_type = name
        MODEL_TYPES[name] = cls
        return cls

    return wrap


class HubMixin:
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for an nn.Module built from one dataclass config."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config) -> None:
        self.config = config

    def extra_config(self) -> dict[str, Any]:
        """Constructor arguments besides the dataclass config (override in subclasses that have them)."""
        return {}

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        meta = {"model_type": self.model_type, "config": dataclasses.asdict(self.config), **self.extra_config()}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu"):
        return load_model(path, map_location, expect=(cls,), what=f"a {cls.__name__}")

    def push_to_hub(self, repo_id: str, private: bool = True, token: str | None = None) -> str:
        """Upload the Hub format to `repo_id` (needs network access and a token)."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            api.upload_folder(repo_id=repo_id, folder_path=tmp)
        return repo_id


def resolve_model_dir(path: str | Path) -> Path:
    """A local folder as is; anything else is treated as a hub id (served from the local cache when offline)."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise UserError(f"model not found: {path} (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as err:  # offline, missing repo, auth: one clear line
        raise UserError(f"model not found: {path} ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def read_model_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    directory = resolve_model_dir(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{directory}: missing {CONFIG_NAME}")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: not valid JSON ({err})") from None
    if meta.get("model_type") not in MODEL_TYPES:
        raise UserError(f"{config_file}: unknown model_type {meta.get('model_type')!r} (registered: "
                        f"{sorted(MODEL_TYPES)}; import the package that defines it first)")
    return directory, meta


def load_model(path: str | Path, map_location: str = "cpu", expect: tuple[type, ...] = (torch.nn.Module,),
               what: str = "a model") -> torch.nn.Module:
    """Rebuild whichever registered model is saved at `path`, with its exact weights; a model that is not
    one of the `expect` classes is refused as not being `what`."""
    directory, meta = read_model_meta(path)
    cls = MODEL_TYPES[meta.pop("model_type")]
    if not issubclass(cls, expect):
        raise UserError(f"{path}: holds a '{cls.model_type}' model, not {what}")
    # upgrade: checkpoints saved before a config key was renamed still load
    config = from_dict(cls.config_class, meta.pop("config"), str(directory / CONFIG_NAME), upgrade=True)
    model = cls(config, **meta)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{directory}: missing {WEIGHTS_NAME}")
    state = load_file(str(weights), device=map_location)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise UserError(f"{weights}: weights do not match {cls.__name__} ({detail})") from None
    if missing or unexpected:
        raise UserError(
            f"{weights}: weights do not match {cls.__name__} (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    return model.to(map_location).eval()
