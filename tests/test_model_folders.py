"""Hostile model folders: every malformed `config.json` or `model.safetensors` (or BPE codec folder) is one
line naming the file and the field (a UserError; exit code 2 through the CLIs), found before anything is
allocated or unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import priors  # noqa: F401  (registers the prior classes with load_model)
from base.errors import UserError
from base.hub import MAX_MODEL_ELEMENTS, load_model
from base.schema import SamplingConfig
from bpe_image import BPECodec
from flextok import FlexTok
from flextok.schema import FlexTokConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig, QuantizerConfig
from priors.discrete import MAX_VOCAB_SIZE, DiscretePrior
from priors.schema import PriorConfig

ROOT = Path(__file__).resolve().parent.parent
TINY_AE = GridConfig(downsample=4, latent_channels=4, channels=16, num_res_blocks=1)
TINY_PRIOR = PriorConfig(dim=32, depth=1, heads=2)
TINY_1D = FlexTokConfig(input="pixels", patch_size=4, num_registers=4, dim=32, depth=1, heads=2, decoder_dim=32,
                        decoder_depth=1, decoder_heads=2, quantizer=QuantizerConfig(fsq_levels=[5, 3]),
                        sampling=SamplingConfig(steps=2))
FIRST_WEIGHT = "encoder.net.0.weight"  # a float tensor of the grid autoencoder
EMBEDDING = "net.token_emb.emb.weight"  # one of the prior's


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One tiny saved model of each kind the catalogue corrupts."""
    root = tmp_path_factory.mktemp("models")
    GridAutoencoder(TINY_AE, resolution=16).save_pretrained(root / "grid")
    DiscretePrior(TINY_PRIOR, vocab_size=8, max_length=4, tokenizer_hash="abc").save_pretrained(root / "prior")
    FlexTok(TINY_1D, resolution=16).save_pretrained(root / "flextok")
    return {path.name: path for path in root.iterdir()}


def edit_config(change):
    """A case that rewrites `config.json` as `change(meta)` returns it (a dict, or any JSON text)."""

    def apply(folder: Path) -> None:
        meta = json.loads((folder / "config.json").read_text())
        out = change(meta)
        (folder / "config.json").write_text(out if isinstance(out, str) else json.dumps(out))

    return apply


def edit_weights(change):
    """A case that rewrites `model.safetensors` with the state dict `change(state)` returns."""

    def apply(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        save_file(change(state), folder / "model.safetensors")

    return apply


def put(meta: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = meta
    for part in parents:
        node = node[part]
    node[leaf] = value
    return meta


def replace(state: dict, name: str, tensor: torch.Tensor) -> dict:
    return {**state, name: tensor}


def corrupt_bytes(keep: float):
    """A case that cuts `model.safetensors` to a fraction of its bytes (0: a few junk bytes)."""

    def apply(folder: Path) -> None:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: int(len(data) * keep)] if keep else b"\x00junk")

    return apply


def remove(name: str):
    return lambda folder: (folder / name).unlink()


def pickled_weights(folder: Path) -> None:
    """A pickle in place of the weights, which would leave a marker file if it were ever unpickled."""
    (folder / "model.safetensors").write_bytes(pickle.dumps(Unpickled(str(folder / "UNPICKLED"))))


class Unpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# (case id, saved model, corruption, file named in the message, text the message holds)
CASES = [
    ("config_not_json", "grid", edit_config(lambda m: "{not json"), "config.json", "not valid JSON"),
    ("config_json_array", "grid", edit_config(lambda m: [m]), "config.json", "must hold a JSON object, got list"),
    ("model_type_list", "grid", edit_config(lambda m: {**m, "model_type": ["grid_autoencoder"]}), "config.json",
     "'model_type' must be a string, got list"),
    ("model_type_missing", "grid", edit_config(lambda m: {k: v for k, v in m.items() if k != "model_type"}),
     "config.json", "missing key 'model_type'"),
    ("model_type_unknown", "grid", edit_config(lambda m: {**m, "model_type": "nope"}), "config.json",
     "unknown model_type 'nope'"),
    ("config_missing", "grid", edit_config(lambda m: {k: v for k, v in m.items() if k != "config"}), "config.json",
     "missing key 'config'"),
    ("config_not_mapping", "grid", edit_config(lambda m: {**m, "config": [1]}), "config.json",
     "'config' must be a mapping"),
    ("unknown_top_level_key", "grid", edit_config(lambda m: {**m, "colour": "red"}), "config.json",
     "unknown key 'colour'"),
    ("unknown_config_key", "grid", edit_config(lambda m: put(m, "config.colour", 1)), "config.json",
     "unknown key 'config.colour'"),
    ("string_resolution", "grid", edit_config(lambda m: {**m, "resolution": "16"}), "config.json",
     "'resolution' must be an integer"),
    ("negative_resolution", "grid", edit_config(lambda m: {**m, "resolution": -16}), "config.json",
     "'resolution' must be positive"),
    ("resolution_not_multiple", "grid", edit_config(lambda m: {**m, "resolution": 18}), "config.json",
     "'resolution' must be a multiple of downsample (4)"),
    ("negative_channels", "grid", edit_config(lambda m: put(m, "config.channels", -16)), "config.json",
     "'config.channels' must be positive"),
    ("float_channels", "grid", edit_config(lambda m: put(m, "config.channels", 16.5)), "config.json",
     "'config.channels' must be an integer"),
    ("unknown_literal", "grid", edit_config(lambda m: put(m, "config.bottleneck", "gaussian")), "config.json",
     "'config.bottleneck' must be one of"),
    ("nan_in_config", "grid", edit_config(lambda m: json.dumps(put(m, "config.kl_weight", float("nan")))),
     "config.json", "NaN is not a valid number"),
    ("huge_fsq_codebook", "grid", edit_config(lambda m: put(m, "config.quantizer.fsq_levels", [1000] * 3)),
     "config.json", "'config.quantizer.fsq_levels' must make at most"),
    ("huge_depth", "prior", edit_config(lambda m: put(m, "config.depth", 10**9)), "config.json",
     "'config.depth' must be in 1..1024"),
    ("huge_vocab_size", "prior", edit_config(lambda m: {**m, "vocab_size": 2**40}), "config.json",
     f"'vocab_size' must be in 1..{MAX_VOCAB_SIZE}"),
    ("model_over_size_limit", "prior",  # each size in range, their product not: 34G elements
     edit_config(lambda m: put({**m, "vocab_size": MAX_VOCAB_SIZE}, "config.dim", 1024)), "config.json",
     f"over the limit of {MAX_MODEL_ELEMENTS:,}"),
    ("missing_constructor_argument", "prior", edit_config(lambda m: {k: v for k, v in m.items() if k != "vocab_size"}),
     "config.json", "missing key 'vocab_size'"),
    ("string_bool", "prior", edit_config(lambda m: {**m, "variable_length": "yes"}), "config.json",
     "'variable_length' must be true/false"),
    ("token_set_with_lengths", "prior", edit_config(lambda m: {**m, "token_set": True, "variable_length": True}),
     "config.json", "'variable_length' must be false for a token-set prior"),
    ("embedded_config_not_mapping", "flextok", edit_config(lambda m: {**m, "autoencoder_config": "ae"}),
     "config.json", "'autoencoder_config' must be a mapping"),
    ("patch_does_not_divide", "flextok", edit_config(lambda m: {**m, "resolution": 18}), "config.json",
     "does not divide"),
    ("weights_missing", "grid", remove("model.safetensors"), "", "missing model.safetensors"),
    ("weights_junk", "grid", corrupt_bytes(0), "model.safetensors", "not a readable safetensors file"),
    ("weights_truncated", "grid", corrupt_bytes(0.5), "model.safetensors", "not a readable safetensors file"),
    ("weights_pickled", "grid", pickled_weights, "model.safetensors", "not a readable safetensors file"),
    ("integer_weights", "grid", edit_weights(lambda s: replace(s, FIRST_WEIGHT, s[FIRST_WEIGHT].long())),
     "model.safetensors", f"tensor '{FIRST_WEIGHT}' is I64, config.json implies float"),
    ("nan_weights", "grid", edit_weights(lambda s: replace(s, FIRST_WEIGHT, s[FIRST_WEIGHT] * float("nan"))),
     "model.safetensors", f"tensor '{FIRST_WEIGHT}' holds NaN or infinite values"),
    ("inf_weights", "prior", edit_weights(lambda s: replace(s, EMBEDDING, s[EMBEDDING].index_fill(0, torch.tensor([3]),
                                                                                               float("-inf")))),
     "model.safetensors", f"tensor '{EMBEDDING}' holds NaN or infinite values"),
    ("tensor_missing", "grid", edit_weights(lambda s: {k: v for k, v in s.items() if k != FIRST_WEIGHT}),
     "model.safetensors", f"tensor '{FIRST_WEIGHT}' is missing"),
    ("tensor_extra", "grid", edit_weights(lambda s: {**s, "backdoor": torch.zeros(1)}), "model.safetensors",
     "unexpected tensor 'backdoor'"),
    ("tensor_wrong_shape", "grid", edit_config(lambda m: put(m, "config.channels", 8)), "model.safetensors",
     f"tensor '{FIRST_WEIGHT}' has shape [16, 3, 3, 3], config.json implies [8, 3, 3, 3]"),
]


@pytest.mark.parametrize("case, model, corrupt, file, needle", CASES, ids=[c[0] for c in CASES])
def test_malformed_folder_is_one_line_naming_file_and_field(saved, tmp_path, case, model, corrupt, file, needle):
    folder = tmp_path / model
    shutil.copytree(saved[model], folder)
    corrupt(folder)
    with pytest.raises(UserError) as err:
        load_model(folder)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(folder / file) in message and needle in message, message
    assert not (folder / "UNPICKLED").exists()


def test_the_catalogue_is_large_and_the_intact_folders_load(saved):
    assert len(CASES) >= 20
    for folder in saved.values():
        assert isinstance(load_model(folder), torch.nn.Module)


def test_weights_saved_in_another_float_precision_still_load(saved, tmp_path):
    """A prior trained in bf16 saves bf16 tensors: floats of any width are accepted where floats are expected."""
    folder = tmp_path / "prior"
    shutil.copytree(saved["prior"], folder)
    edit_weights(lambda s: {k: v.bfloat16() if v.is_floating_point() else v for k, v in s.items()})(folder)
    loaded = load_model(folder)
    assert next(loaded.parameters()).dtype == torch.float32


@pytest.mark.parametrize("corrupt", [edit_config(lambda m: {**m, "model_type": ["grid_autoencoder"]}),
                                     corrupt_bytes(0.5)], ids=["model_type_list", "weights_truncated"])
def test_cli_reports_a_malformed_folder_in_one_line_with_exit_code_2(saved, tmp_path, corrupt):
    shutil.copytree(saved["grid"], tmp_path / "tok")
    corrupt(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "train_bpe.py"), "--tokenizer", str(tmp_path / "tok"), "--config",
               str(ROOT / "configs/grid_vq.yaml"), "--mode", "flat", "--vocab-size", "64", "--out", str(tmp_path / "o")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and str(tmp_path / "tok") in done.stderr, done.stderr


def codec_edit(change):
    """A codec case: `change(config, folder)` edits the codec's config in place (and may rewrite files)."""

    def apply(folder: Path) -> None:
        meta = json.loads((folder / "config.json").read_text())
        change(meta["config"], folder)
        (folder / "config.json").write_text(json.dumps(meta))

    return apply


def garbage_backend(config: dict, folder: Path) -> None:
    """Unreadable backend bytes under a matching checksum (the checksum only catches a swapped file)."""
    data = b"\xff not a tokenizer"
    (folder / config["backend_file"]).write_bytes(data)
    config["backend_sha256"] = hashlib.sha256(data).hexdigest()


CODEC_CASES = [
    ("backend_file_elsewhere", codec_edit(lambda c, f: c.update(backend_file="../grid/model.safetensors")),
     "'backend_file' must be 'tokenizer.json'"),
    ("string_codebook_size", codec_edit(lambda c, f: c.update(codebook_size="8")),
     "'codebook_size' must be an integer"),
    ("vocab_below_codebook", codec_edit(lambda c, f: c.update(vocab_size=2)), "vocab_size (2) must be at least"),
    ("bad_boundaries", codec_edit(lambda c, f: c.update(boundaries=[1, "x"])), "'boundaries' must be null or a list"),
    ("unknown_backend", codec_edit(lambda c, f: c.update(backend="zip")), "backend must be one of"),
    ("garbage_backend_file", codec_edit(garbage_backend), "not a readable tokenizers backend file"),
]


@pytest.mark.parametrize("corrupt, needle", [c[1:] for c in CODEC_CASES], ids=[c[0] for c in CODEC_CASES])
def test_malformed_codec_folder_is_one_line(tmp_path, corrupt, needle):
    codes = np.tile(np.arange(8), (20, 1))
    BPECodec.train(codes, codebook_size=8, vocab_size=12, mode="1d").save_pretrained(tmp_path / "codec")
    corrupt(tmp_path / "codec")
    with pytest.raises(UserError) as err:
        BPECodec.from_pretrained(tmp_path / "codec")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(tmp_path / "codec") in message and needle in message, message
