"""Hub format for every model: `config.json` + `model.safetensors` + a model card (`README.md`), loadable
from a folder or a hub id.

`config.json` holds {"model_type": <registered name>, "config": <the model's dataclass config>}, so
`load_model(path)` can rebuild the right class without the caller knowing it. BPE codecs (`bpe_image`) use
the same `config.json` and card, with their backend file in place of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import from_dict
from .errors import UserError
from .files import atomic_write, atomic_write_text

__all__ = ["CARD_NAME", "CONFIG_NAME", "LIBRARY_NAME", "WEIGHTS_NAME", "HubMixin", "ModelCardInfo", "load_model",
           "model_card", "push_folder_to_hub", "read_model_meta", "register_model", "resolve_model_dir",
           "usage_snippet", "write_model_card"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "flextok-framework"
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

    def save_pretrained(self, directory: str | Path, card: ModelCardInfo | Mapping[str, Any] | None = None, *,
                        load_path: str | None = None) -> Path:
        """Write `model.safetensors`, the model card `README.md` and `config.json` (each atomically, config
        last). `card` says how the model was made (see `ModelCardInfo`); `load_path` is what the card's
        usage snippet loads (default: `directory`)."""
        directory = Path(directory)
        meta = {"model_type": self.model_type, "config": dataclasses.asdict(self.config), **self.extra_config()}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
        write_model_card(directory, meta, self.card_usage(load_path or str(directory)), card)
        atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu"):
        return load_model(path, map_location, expect=(cls,), what=f"a {cls.__name__}")

    @classmethod
    def card_usage(cls, path: str) -> str:
        """The model card's loading snippet (override to show a package-level loader instead)."""
        return usage_snippet(cls, path, "model")

    def push_to_hub(self, repo_id: str, private: bool = True, token: str | None = None,
                    card: ModelCardInfo | Mapping[str, Any] | None = None) -> str:
        """Upload the Hub format, card included, to `repo_id` (needs network access and a token)."""
        return push_folder_to_hub(repo_id, lambda tmp: self.save_pretrained(tmp, card, load_path=repo_id),
                                  private, token)


def push_folder_to_hub(repo_id: str, save: Callable[[Path], Any], private: bool = True,
                       token: str | None = None) -> str:
    """Create `repo_id` if needed and upload what `save(folder)` writes into a temporary folder."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        api.upload_folder(repo_id=repo_id, folder_path=tmp)
    return repo_id


def resolve_model_dir(path: str | Path, extra_files: Sequence[str] = ()) -> Path:
    """A local folder as is; anything else is treated as a hub id `owner/name`, downloaded into (or, offline,
    served from) the Hugging Face cache: `config.json`, `model.safetensors` and `extra_files` only."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise UserError(f"model not found: {path} (expected a folder with {CONFIG_NAME}, or a hub id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, *extra_files]))
    except Exception as err:  # offline, missing repo, auth: one clear line
        raise UserError(f"model not found: {path} ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), "")


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


@dataclass
class ModelCardInfo:
    """How a saved model was made, for its model card; every field is optional.

    `data_source` is the `data.source` it was trained on (e.g. `hf:ILSVRC/imagenet-1k`), `data_split` the
    split, `num_images` how many images that split held (None: unknown, e.g. streamed), `resolution` the
    image side in pixels, `steps` the training steps, `metrics` the final metrics by name (e.g. held-out
    `psnr`).
    """

    data_source: str | None = None
    data_split: str | None = None
    num_images: int | None = None
    resolution: int | None = None
    steps: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, card: ModelCardInfo | Mapping[str, Any] | None) -> ModelCardInfo:
        """`card` as a `ModelCardInfo`; a dict may hold only the field names."""
        if card is None:
            return cls()
        if isinstance(card, cls):
            return card
        if not isinstance(card, Mapping):
            raise UserError(f"model card: expected a ModelCardInfo or a dict, got {type(card).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(card) - set(known))
        if unknown:
            raise UserError(f"model card: unknown key '{unknown[0]}' (known: {', '.join(known)})")
        return cls(**card)


def usage_snippet(cls: type, path: str, var: str) -> str:
    """Python that loads `path` with `cls.from_pretrained`, imported from the package that exports it."""
    package = cls.__module__.split(".")[0]
    module = package if getattr(sys.modules.get(package), cls.__name__, None) is cls else cls.__module__
    return f"from {module} import {cls.__name__}\n\n{var} = {cls.__name__}.from_pretrained({json.dumps(str(path))})\n"


def model_card(meta: Mapping[str, Any], usage: str, card: ModelCardInfo | Mapping[str, Any] | None = None) -> str:
    """The text of a model card: YAML front matter (library, tags, hub dataset), then the model type, usage,
    training data, metrics and the saved config."""
    info = ModelCardInfo.coerce(card)
    model_type = str(meta["model_type"])
    front: dict[str, Any] = {"library_name": LIBRARY_NAME, "tags": [LIBRARY_NAME, "image-tokenization", model_type]}
    dataset = _hub_dataset(info.data_source)
    if dataset:
        front["datasets"] = [dataset]
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n",
        f"# {model_type}\n\nA `{model_type}` saved by {LIBRARY_NAME} in its Hub format (`{CONFIG_NAME}` names "
        "the model type and holds the config).\n",
        f"## Usage\n\n```python\n{usage}```\n",
        "## Training\n\n" + _training_lines(info),
        "## Metrics\n\n" + _metrics_table(info.metrics),
        f"## Config\n\n```json\n{json.dumps(dict(meta), indent=2, default=str)}\n```\n",
    ]
    return "\n".join(sections)


def write_model_card(directory: str | Path, meta: Mapping[str, Any], usage: str,
                     card: ModelCardInfo | Mapping[str, Any] | None = None) -> Path:
    """Write `model_card(...)` to `directory/README.md` atomically."""
    return atomic_write_text(Path(directory) / CARD_NAME, model_card(meta, usage, card))


def _hub_dataset(source: str | None) -> str | None:
    """The hub dataset id of an `hf:owner/name` source (local folders have none)."""
    kind, _, arg = (source or "").partition(":")
    return arg if kind == "hf" and re.fullmatch(r"[\w.-]+/[\w.-]+", arg) and not Path(arg).exists() else None


def _training_lines(info: ModelCardInfo) -> str:
    lines = []
    if info.data_source:
        split = f", split `{info.data_split}`" if info.data_split else ""
        lines.append(f"- data: `{info.data_source}`{split}")
    if info.num_images is not None:
        lines.append(f"- images: {info.num_images}")
    if info.resolution is not None:
        lines.append(f"- resolution: {info.resolution}x{info.resolution}")
    if info.steps is not None:
        lines.append(f"- steps: {info.steps}")
    return "\n".join(lines) + "\n" if lines else "Not recorded.\n"


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    if not metrics:
        return "Not recorded.\n"
    rows = [f"| {name} | {_format_value(value)} |" for name, value in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) + "\n"


def _format_value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
