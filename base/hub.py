"""Hub format for every model: `config.json` + `model.safetensors` + a model card (`README.md`), loadable
from a folder or an explicit hub id `hf:owner/name`.

`config.json` holds {"model_type": <registered name>, "config": <the model's dataclass config>, **<its other
constructor arguments>}, so `load_model(path)` can rebuild the right class without the caller knowing it.
BPE codecs (`bpe_image`) use the same `config.json` and card, with their backend file in place of the weights.

A model folder is untrusted input: `load_model` reads `config.json` through the typed schema (the config
dataclass and the class's `args_class`), builds the model on the meta device to learn every tensor's
name, shape and dtype, bounds its size (`MAX_MODEL_ELEMENTS`) and checks `model.safetensors` against
that before anything is allocated; anything wrong is a one-line `UserError` naming the file and the field.
Nothing in a model folder is ever unpickled.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import from_dict
from .errors import ConfigError, UserError
from .files import atomic_write, atomic_write_text

__all__ = ["CARD_NAME", "CONFIG_NAME", "HUB_PREFIX", "LIBRARY_NAME", "MAX_MODEL_ELEMENTS", "WEIGHTS_NAME", "HubMixin",
           "ModelCardInfo", "card_load_path", "check_safetensors", "hub_repo_id", "load_model", "model_card",
           "parse_model_meta", "push_folder_to_hub", "read_model_meta", "register_model", "resolve_model_dir",
           "usage_snippet", "write_model_card"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "flextok-framework"
HUB_PREFIX = "hf:"  # a hub id is always written hf:owner/name (as in `data.source`); anything else is a path
# parameters + buffers a loaded model may hold: 8 Gi elements (32 GiB in fp32), 10x the largest recipe
# (1d_256: 840M). A config.json describing more is refused before anything is allocated.
MAX_MODEL_ELEMENTS = 2**33
MODEL_TYPES: dict[str, type] = {}  # filled by `register_model` where each model class is defined
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def register_model(name: str):
    """Class decorator: make a model class loadable by `load_model` under `name`."""

    def wrap(cls):
        cls.model_type = name
        MODEL_TYPES[name] = cls
        return cls

    return wrap


class HubMixin:
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for an nn.Module built from one dataclass config
    and the keyword arguments of `args_class` (a dataclass whose `__post_init__` checks their values)."""

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    args_class: ClassVar[type]

    def __init__(self, config, **args) -> None:
        self.config = config
        self.init_args = self.args_class(**args)  # value checks, before the subclass allocates anything

    def extra_config(self) -> dict[str, Any]:
        """Constructor arguments besides the dataclass config, as saved in `config.json`."""
        return dataclasses.asdict(self.init_args)

    def save_pretrained(self, directory: str | Path, card: ModelCardInfo | Mapping[str, Any] | None = None, *,
                        load_path: str | None = None) -> Path:
        """Write `model.safetensors`, the model card `README.md` and `config.json` (each atomically, config
        last). `card` says how the model was made (see `ModelCardInfo`); `load_path` is what the card's
        usage snippet loads (default: `directory` as an absolute path, which loads from any folder)."""
        directory = Path(directory)
        meta = {"model_type": self.model_type, "config": dataclasses.asdict(self.config), **self.extra_config()}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp))
        write_model_card(directory, meta, self.card_usage(card_load_path(directory, load_path)), card)
        atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu"):
        """Load a folder, or a hub id `hf:owner/name`, saved by `save_pretrained` (see `load_model`)."""
        return load_model(path, map_location, expect=(cls,), what=f"a {cls.__name__}")

    @classmethod
    def card_usage(cls, path: str) -> str:
        """The model card's loading snippet (override to show a package-level loader instead)."""
        return usage_snippet(cls, path, "model")

    def push_to_hub(self, repo_id: str, private: bool = True, token: str | None = None,
                    card: ModelCardInfo | Mapping[str, Any] | None = None) -> str:
        """Upload the Hub format, card included, to `repo_id` (`owner/name` or `hf:owner/name`; needs network
        access and a token); returns the `hf:owner/name` that loads it."""
        return push_folder_to_hub(repo_id, lambda tmp, ref: self.save_pretrained(tmp, card, load_path=ref),
                                  private, token)


def card_load_path(directory: str | Path, load_path: str | None) -> str:
    """What a model card's snippet loads: `load_path`, else the folder's absolute path (a relative one would
    only load from the folder it was saved from)."""
    return load_path or str(Path(directory).resolve())


def push_folder_to_hub(repo_id: str, save: Callable[[Path, str], Any], private: bool = True,
                       token: str | None = None) -> str:
    """Create `repo_id` if needed and upload what `save(folder, hub_reference)` writes into a temporary
    folder (`hub_reference`, `hf:owner/name`, is what its card's snippet should load); returns it."""
    from huggingface_hub import HfApi

    repo = hub_repo_id(repo_id) or repo_id
    if not _REPO_ID.fullmatch(repo):
        raise UserError(f"push_to_hub: '{repo_id}' is not a hub id owner/name")
    api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp), HUB_PREFIX + repo)
        api.upload_folder(repo_id=repo, folder_path=tmp)
    return HUB_PREFIX + repo


def hub_repo_id(reference: str | Path) -> str | None:
    """The `owner/name` of a hub reference `hf:owner/name`; None for anything else (a path)."""
    text = str(reference)
    return text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else None


def resolve_model_dir(path: str | Path, extra_files: Sequence[str] = ()) -> Path:
    """The local folder of a saved model: `path` itself (`~` expanded), or for a hub id `hf:owner/name` its
    snapshot downloaded into (or, offline, served from) the Hugging Face cache: `config.json`,
    `model.safetensors` and `extra_files` only. A path that is not a folder is an error, never a download."""
    repo = hub_repo_id(path)
    if repo is None:
        local = Path(path).expanduser()
        if local.is_dir():
            return local
        hint = f"; a hub id would be written {HUB_PREFIX}{path}" if _REPO_ID.fullmatch(str(path)) else ""
        raise UserError(f"model not found: {path} (no such folder{hint})")
    if not _REPO_ID.fullmatch(repo):
        raise UserError(f"model not found: {path} (a hub id is written {HUB_PREFIX}owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, *extra_files]))
    except Exception as err:  # offline, missing repo, auth: one clear line
        raise UserError(f"model not found: {path} ({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), "")


def read_model_meta(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The folder of a saved model (see `resolve_model_dir`) and its `config.json`: a JSON object whose
    `model_type` is registered. The rest is checked by `parse_model_meta`."""
    directory = resolve_model_dir(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{directory}: missing {CONFIG_NAME}")
    meta = _read_json(config_file)
    if not isinstance(meta, dict):
        raise UserError(f"{config_file}: must hold a JSON object, got {type(meta).__name__}")
    if "model_type" not in meta:
        raise UserError(f"{config_file}: missing key 'model_type'")
    if not isinstance(meta["model_type"], str):
        raise UserError(f"{config_file}: 'model_type' must be a string, got {type(meta['model_type']).__name__}")
    if meta["model_type"] not in MODEL_TYPES:
        raise UserError(f"{config_file}: unknown model_type {meta['model_type']!r} (registered: "
                        f"{sorted(MODEL_TYPES)}; import the package that defines it first)")
    return directory, meta


def _read_json(path: Path) -> Any:
    """A JSON file's value; invalid JSON, and NaN or Infinity (which Python's JSON reader accepts), are
    one-line errors."""

    def reject(constant: str):
        raise UserError(f"{path}: {constant} is not a valid number")

    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({_first_line(err)})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None


def parse_model_meta(cls: type, meta: Mapping[str, Any], config_file: str | Path) -> tuple[Any, dict[str, Any]]:
    """`config.json` of a `cls` model through its typed schema: (config dataclass, constructor keyword
    arguments). Unknown, missing and wrongly typed keys and out-of-range values are one-line ConfigErrors
    naming the file and the key."""
    source = str(config_file)
    arg_fields = {f.name: f for f in dataclasses.fields(cls.args_class)}
    known = ["model_type", "config", *arg_fields]
    unknown = sorted(set(meta) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(known)})")
    required = [name for name, f in arg_fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in ("config", *required) if name not in meta]
    if missing:
        raise ConfigError(f"{source}: missing key '{missing[0]}'")
    config = from_dict(cls.config_class, meta["config"], source, prefix="config.")
    args = from_dict(cls.args_class, {k: v for k, v in meta.items() if k in arg_fields}, source)
    return config, dataclasses.asdict(args)


def _expected_tensors(cls: type, config: Any, args: Mapping[str, Any],
                      config_file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a `cls(config, **args)` state dict holds, learnt from a build
    on the meta device (no memory), after bounding the model's size by `MAX_MODEL_ELEMENTS`."""
    try:
        with torch.device("meta"):
            skeleton = cls(config, **args)
    except (ValueError, TypeError, AssertionError, RuntimeError) as err:  # ConfigError included
        raise UserError(f"{config_file}: {_first_line(err)}") from None
    tensors = dict(skeleton.named_parameters())
    tensors.update(skeleton.named_buffers())  # non-persistent buffers are allocated too
    total = sum(t.numel() for t in tensors.values())
    if total > MAX_MODEL_ELEMENTS:
        name, largest = max(tensors.items(), key=lambda item: item[1].numel())
        raise UserError(f"{config_file}: describes a model of {total:,} parameter and buffer elements, over the "
                        f"limit of {MAX_MODEL_ELEMENTS:,} (base.hub.MAX_MODEL_ELEMENTS; largest: {name} "
                        f"{list(largest.shape)})")
    return {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()}


def _dtype_kind(dtype: str | torch.dtype) -> str:
    """'float', 'int' or 'bool' for a torch dtype or a safetensors dtype name (F32, BF16, I64, U8, BOOL, ...)."""
    if isinstance(dtype, torch.dtype):
        return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"
    return "bool" if dtype == "BOOL" else "float" if dtype.startswith(("F", "BF")) else "int"


def check_safetensors(path: str | Path, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      source: str = CONFIG_NAME) -> None:
    """Check a safetensors file's header against `expected` (name -> (shape, dtype)) without reading any
    tensor: present and readable, the same tensor names, each with the expected shape and a dtype of the
    same kind (float, int or bool: weights saved in bf16 load into fp32 models). `source` names what
    implies the expectation, for the messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent}: missing {path.name} (the weights {source} describes)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {name: (tuple(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                      for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing:
        raise UserError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing; {source} implies it)")
    if unexpected:
        raise UserError(f"{path}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected; not in the "
                        f"model {source} describes)")
    for name, (shape, dtype) in expected.items():
        saved_shape, saved_dtype = header[name]
        if saved_shape != shape:
            raise UserError(f"{path}: tensor '{name}' has shape {list(saved_shape)}, {source} implies {list(shape)}")
        if _dtype_kind(saved_dtype) != _dtype_kind(dtype):
            raise UserError(f"{path}: tensor '{name}' is {saved_dtype}, {source} implies {_dtype_kind(dtype)} "
                            f"({str(dtype).removeprefix('torch.')})")


def _read_weights(path: Path, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], source: str,
                  device: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file that `check_safetensors` accepts, every one finite."""
    check_safetensors(path, expected, source)
    try:
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor '{name}' holds NaN or infinite values")
    return state


def load_model(path: str | Path, map_location: str = "cpu", expect: tuple[type, ...] = (torch.nn.Module,),
               what: str = "a model") -> torch.nn.Module:
    """Rebuild whichever registered model is saved at `path` (a folder, or a hub id `hf:owner/name`), with its
    exact weights; a model that is not one of the `expect` classes is refused as not being `what`.

    Everything is validated before the model is allocated (see the module docstring); a bad folder is a
    one-line UserError naming the file and the field."""
    directory, meta = read_model_meta(path)
    config_file = directory / CONFIG_NAME
    cls = MODEL_TYPES[meta["model_type"]]
    if not issubclass(cls, expect):
        raise UserError(f"{path}: holds a '{cls.model_type}' model, not {what}")
    config, args = parse_model_meta(cls, meta, config_file)
    expected = _expected_tensors(cls, config, args, config_file)
    state = _read_weights(directory / WEIGHTS_NAME, expected, CONFIG_NAME, map_location)
    model = cls(config, **args)
    model.load_state_dict(state)  # strict: names and shapes were checked above
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
    repo = hub_repo_id(source or "")
    # `data.source` (unlike a model reference) may name a local folder after hf:
    return repo if repo and _REPO_ID.fullmatch(repo) and not Path(repo).exists() else None


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
