"""Hub format: hub ids (`hf:owner/name`) served offline from a pre-populated Hugging Face cache, plain paths
never downloaded, and the model card."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml

from base.errors import UserError
from base.fingerprint import fingerprint_files
from base.hub import ModelCardInfo, load_model, push_folder_to_hub, resolve_model_dir
from base.schema import SamplingConfig
from bpe_image import BPECodec
from bpe_image.codec import codec_dir
from flextok import FlexTok, load_tokenizer
from flextok.schema import FlexTokConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig

TINY_AE = GridConfig(downsample=4, latent_channels=4, channels=16, num_res_blocks=1)
TINY_1D = dict(input="latents", patch_size=1, num_registers=4, dim=32, depth=1, heads=2, decoder_dim=32,
               decoder_depth=1, decoder_heads=2, sampling=SamplingConfig(steps=2))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(folder, cache, repo_id: str) -> None:
    """Lay out a saved folder as `huggingface_hub` stores a downloaded model repo: content-addressed blobs,
    a snapshot of symlinks to them, and `refs/main` naming the snapshot's commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (repo / "snapshots" / COMMIT / file.name).symlink_to(os.path.relpath(blob, repo / "snapshots" / COMMIT))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, used offline (the constants are read at call time, the environment
    only at import)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def tokenizers(tmp_path):
    """A tiny grid KL autoencoder and a 1D tokenizer on its latents, both saved."""
    ae = GridAutoencoder(TINY_AE, resolution=16).eval()
    ae.save_pretrained(tmp_path / "ae")
    one_d = FlexTok.from_config(FlexTokConfig(**TINY_1D, autoencoder=str(tmp_path / "ae")), 16).eval()
    one_d.save_pretrained(tmp_path / "tok")
    return ae, one_d


def test_hub_ids_load_offline_from_the_cache(tmp_path, hub_cache, tokenizers):
    ae, one_d = tokenizers
    put_in_hub_cache(tmp_path / "ae", hub_cache, "someone/tiny-kl")
    put_in_hub_cache(tmp_path / "tok", hub_cache, "someone/tiny-1d")
    (tmp_path / "ae").rename(tmp_path / "moved")  # the 1D tokenizer must not need its autoencoder's folder
    assert resolve_model_dir("hf:someone/tiny-kl") == hub_cache / "models--someone--tiny-kl" / "snapshots" / COMMIT
    assert same_weights(load_model("hf:someone/tiny-kl"), ae)
    assert same_weights(GridAutoencoder.from_pretrained("hf:someone/tiny-kl"), ae)
    # a 1D tokenizer built on a hub autoencoder (flextok.autoencoder) embeds it
    built = FlexTok.from_config(FlexTokConfig(**TINY_1D, autoencoder="hf:someone/tiny-kl"), 16)
    assert same_weights(built.autoencoder, ae)
    loaded = load_tokenizer("hf:someone/tiny-1d")
    assert isinstance(loaded, FlexTok) and same_weights(loaded, one_d)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert [t.tolist() for t in loaded.tokenize(images)] == [t.tolist() for t in one_d.tokenize(images)]


def test_a_missing_hub_id_is_one_line(hub_cache):
    for load in (load_model, load_tokenizer, BPECodec.from_pretrained):
        with pytest.raises(UserError) as err:
            load("hf:someone/not-there")
        assert len(str(err.value).splitlines()) == 1 and "model not found: hf:someone/not-there" in str(err.value)
    with pytest.raises(UserError, match="a hub id is written hf:owner/name"):
        load_model("hf:not-an-id")


@pytest.fixture
def no_downloads(monkeypatch):
    """Fail the test if anything asks the Hub for a snapshot (as if online)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"downloaded {args} {kwargs}")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_a_mistyped_local_path_is_an_error_never_a_download(tmp_path, no_downloads, monkeypatch):
    """`prior.tokenizer=runs/my_tok` with no such folder names the path; it never requests a repo
    `runs/my_tok`, through any loader."""
    monkeypatch.chdir(tmp_path)
    loaders = (load_model, load_tokenizer, GridAutoencoder.from_pretrained, FlexTok.from_pretrained,
               BPECodec.from_pretrained, codec_dir,
               lambda ref: FlexTok.from_config(FlexTokConfig(**TINY_1D, autoencoder=ref), 16))
    for load in loaders:
        with pytest.raises(UserError) as err:
            load("runs/my_tok")
        assert str(err.value) == ("model not found: runs/my_tok (no such folder; a hub id would be written "
                                  "hf:runs/my_tok)")
    (tmp_path / "runs" / "my_tok").mkdir(parents=True)  # now a folder: read as one (and found empty)
    with pytest.raises(UserError, match="runs/my_tok: missing config.json"):
        load_model("runs/my_tok")


def test_codecs_load_from_a_hub_id(tmp_path, hub_cache):
    codes = np.random.default_rng(0).integers(0, 8, size=(64, 2, 3)).repeat(2, axis=1).repeat(2, axis=2)
    codec = BPECodec.train(codes, codebook_size=8, vocab_size=20, mode="2d")
    codec.save_pretrained(tmp_path / "codec")
    put_in_hub_cache(tmp_path / "codec", hub_cache, "someone/tiny-bpe")
    loaded = BPECodec.from_pretrained("hf:someone/tiny-bpe")
    # a codec's identity (its cache key) is the same read from the hub cache as from the folder it came from
    assert fingerprint_files(codec_dir("hf:someone/tiny-bpe")) == fingerprint_files(tmp_path / "codec")
    assert repr(loaded) == repr(codec) and all(
        np.array_equal(a, b) for a, b in zip(loaded.encode_batch(codes), codec.encode_batch(codes)))
    with pytest.raises(UserError, match="holds a 'bpe_codec' model, not a tokenizer"):
        load_tokenizer(tmp_path / "codec")


def card_parts(folder) -> tuple[dict, str, str]:
    """(front matter, body, usage code) of a saved model card."""
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    usage = re.search(r"## Usage\n\n```python\n(.*?)```", body, re.S).group(1)
    return yaml.safe_load(front), body, usage


def test_model_card_describes_the_model_and_its_snippet_loads_it(tmp_path):
    ae = GridAutoencoder(TINY_AE, resolution=16).eval()
    card = ModelCardInfo(data_source="hf:ILSVRC/imagenet-1k", data_split="train", num_images=1281167,
                         resolution=16, steps=1250, metrics={"psnr": 17.25, "rfid": 31.5})
    ae.save_pretrained(tmp_path / "ae", card=card)
    front, body, usage = card_parts(tmp_path / "ae")
    assert front["library_name"] == "flextok-framework" and "grid_autoencoder" in front["tags"]
    assert front["datasets"] == ["ILSVRC/imagenet-1k"]
    assert body.startswith("\n# grid_autoencoder")
    for needle in ("`hf:ILSVRC/imagenet-1k`, split `train`", "images: 1281167", "steps: 1250",
                   "| psnr | 17.25 |", "| rfid | 31.5 |", '"latent_channels": 4'):
        assert needle in body
    scope: dict = {}
    exec(usage, scope)  # the snippet as a reader would paste it
    assert isinstance(scope["model"], GridAutoencoder) and same_weights(scope["model"], ae)


def test_model_card_without_training_info_and_for_codecs(tmp_path, tokenizers):
    _, one_d = tokenizers
    _, body, usage = card_parts(tmp_path / "tok")
    assert "# flextok" in body and body.count("Not recorded.") == 2 and '"num_registers": 4' in body
    scope: dict = {}
    exec(usage, scope)
    assert same_weights(scope["model"], one_d)

    codec = BPECodec.train(np.tile(np.arange(8), (20, 1)), codebook_size=8, vocab_size=12, mode="1d")
    codec.save_pretrained(tmp_path / "codec", card={"data_source": "builtin:skimage", "metrics": {"ratio": 4.0}})
    front, body, usage = card_parts(tmp_path / "codec")
    assert "bpe_codec" in front["tags"] and "`builtin:skimage`" in body and "| ratio | 4 |" in body
    assert "datasets" not in front  # not a hub dataset
    exec(usage, scope)
    assert repr(scope["codec"]) == repr(codec)


def test_model_card_is_atomic_and_rejects_unknown_keys(tmp_path):
    ae = GridAutoencoder(TINY_AE, resolution=16)
    with pytest.raises(UserError, match="model card: unknown key 'dataset'"):
        ae.save_pretrained(tmp_path / "ae", card={"dataset": "x"})
    ae.save_pretrained(tmp_path / "ae", card={"steps": 3}, load_path="hf:someone/tiny-kl")
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert 'GridAutoencoder.from_pretrained("hf:someone/tiny-kl")' in card_parts(tmp_path / "ae")[2]
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["model_type"] == "grid_autoencoder"


ROOT = Path(__file__).resolve().parent.parent


def run_snippet(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a card's snippet in a fresh offline interpreter from `cwd`, with the project importable (as if
    installed); it prints what it loaded."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    code += "\nprint(type(model).__name__, sum(float(t.double().sum()) for t in model.state_dict().values()))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_card_snippet_loads_its_folder_from_any_working_directory(tmp_path, monkeypatch):
    """A model saved under a relative path: its card's snippet, run from elsewhere, loads that folder."""
    ae = GridAutoencoder(TINY_AE, resolution=16).eval()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    ae.save_pretrained("runs/ae")  # relative, as the trainers' out_dir usually is
    usage = card_parts(tmp_path / "work" / "runs" / "ae")[2]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    total = sum(float(t.double().sum()) for t in ae.state_dict().values())
    assert run_snippet(usage, elsewhere) == f"GridAutoencoder {total}"


def test_pushed_card_snippet_loads_the_hub_id(tmp_path, hub_cache, monkeypatch):
    """push_to_hub writes a card whose snippet loads `hf:owner/name`; served from the hub cache, it loads."""
    uploads = tmp_path / "uploaded"

    class FakeApi:  # stands in for the network: keeps what would be uploaded
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            assert repo_id == "someone/tiny-kl"

        def upload_folder(self, repo_id, folder_path):
            os.replace(folder_path, uploads)
            Path(folder_path).mkdir()  # the temporary folder's cleanup expects it

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    ae = GridAutoencoder(TINY_AE, resolution=16).eval()
    assert ae.push_to_hub("someone/tiny-kl") == "hf:someone/tiny-kl"
    usage = card_parts(uploads)[2]
    assert 'GridAutoencoder.from_pretrained("hf:someone/tiny-kl")' in usage
    put_in_hub_cache(uploads, hub_cache, "someone/tiny-kl")
    total = sum(float(t.double().sum()) for t in ae.state_dict().values())
    assert run_snippet(usage, tmp_path, {"HF_HUB_CACHE": str(hub_cache)}) == f"GridAutoencoder {total}"
    with pytest.raises(UserError, match="'not an id' is not a hub id owner/name"):
        push_folder_to_hub("not an id", lambda folder, ref: None)
