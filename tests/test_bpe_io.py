"""BPECodec: save/load, bad-input errors, early stop, and the training CLI (`train_bpe.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from base.errors import UserError
from bpe_image import BPECodec
from train_bpe import main

K = 16
ROOT = Path(__file__).resolve().parents[1]


def blocky(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, K, size=(n, *[(s + 1) // 2 for s in shape]))
    for axis in range(1, len(shape) + 1):
        coarse = coarse.repeat(2, axis=axis)
    return np.ascontiguousarray(coarse[(slice(None), *[slice(0, s) for s in shape])])


@pytest.fixture(scope="module")
def seqs() -> np.ndarray:
    return blocky(200, (24,), seed=0)


@pytest.fixture(scope="module")
def grids() -> np.ndarray:
    return blocky(200, (4, 6), seed=1)


@pytest.fixture(scope="module")
def codecs(seqs, grids) -> list[tuple[BPECodec, np.ndarray]]:
    out = []
    for mode in ("1d", "flat"):
        for backend in ("tokenizers", "sentencepiece"):
            out.append((BPECodec.train(seqs, codebook_size=K, vocab_size=60, mode=mode, backend=backend), seqs))
    out.append((BPECodec.train(grids, codebook_size=K, vocab_size=60, mode="2d"), grids))
    return out


def test_save_load_gives_an_equal_codec(codecs, tmp_path):
    for i, (codec, data) in enumerate(codecs):
        codec.save_pretrained(tmp_path / str(i))
        loaded = BPECodec.from_pretrained(tmp_path / str(i))
        assert repr(loaded) == repr(codec)
        assert (loaded.boundaries, loaded.grid_shape, loaded.max_token_length) == (
            codec.boundaries,
            codec.grid_shape,
            codec.max_token_length,
        )
        assert np.array_equal(loaded.token_sizes(), codec.token_sizes())
        for a, b in zip(loaded.encode_batch(data), codec.encode_batch(data)):
            assert np.array_equal(a, b)
        leftovers = [p.name for p in (tmp_path / str(i)).iterdir() if p.name.endswith(".tmp")]
        assert not leftovers


def test_saved_in_the_models_hub_format_with_a_card(codecs, tmp_path):
    codec, _ = codecs[-1]
    codec.save_pretrained(tmp_path, card={"data_source": "hf:some/codes", "metrics": {"compression_ratio": 2.5}})
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "bpe_codec" and meta["config"]["grid_shape"] == [4, 6]
    card = (tmp_path / "README.md").read_text()
    assert "bpe_codec" in card and "hf:some/codes" in card and "| compression_ratio | 2.5 |" in card


def test_a_model_folder_is_not_a_codec(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "grid_autoencoder", "config": {}}))
    with pytest.raises(UserError, match="grid_autoencoder.*not a BPE codec"):
        BPECodec.from_pretrained(tmp_path)


def test_tokenizers_ids_are_public_ids_without_a_lookup_table(codecs, tmp_path):
    codec, data = codecs[0]
    codec.save_pretrained(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(codec.vocab_size))
    assert all(vocab[chr(0xF0000 + code)] == code for code in range(K))
    merged = {token_id: [ord(ch) - 0xF0000 for ch in token] for token, token_id in vocab.items() if len(token) > 1}
    for x in data[:20]:
        ids = codec.encode(x)
        rebuilt = [code for i in ids.tolist() for code in (merged[i] if i >= K else [i])]
        assert rebuilt == x.tolist()


def test_load_missing_files(codecs, tmp_path):
    with pytest.raises(UserError, match="model not found: .*nothing"):
        BPECodec.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        BPECodec.from_pretrained(tmp_path / "empty")
    codec, _ = codecs[0]
    codec.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        BPECodec.from_pretrained(tmp_path)


def test_load_mismatched_backend_file(codecs, tmp_path):
    one_d, flat = codecs[0][0], codecs[2][0]  # both tokenizers: same file name, different models
    one_d.save_pretrained(tmp_path / "a")
    flat.save_pretrained(tmp_path / "c")
    (tmp_path / "a" / "tokenizer.json").write_bytes((tmp_path / "c" / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="tokenizer.json.*does not match"):
        BPECodec.from_pretrained(tmp_path / "a")


def test_load_rejects_foreign_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bpe_codec", "config": {"format": "other"}}))
    with pytest.raises(ValueError, match="config.json is not a bpe_image.BPECodec config"):
        BPECodec.from_pretrained(tmp_path)
    config = {"format": "bpe_image.BPECodec", "version": 1, "mode": "1d"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bpe_codec", "config": config}))
    with pytest.raises(ValueError, match="config.json lacks"):
        BPECodec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        BPECodec.from_pretrained(tmp_path)


def test_out_of_range_code_names_its_position(codecs):
    for codec, data in codecs:
        x = data[0].copy()
        if codec.mode == "2d":
            x[2, 3] = K
            with pytest.raises(ValueError, match="row 2, col 3"):
                codec.encode(x)
            with pytest.raises(ValueError, match="grid 1, row 2, col 3"):
                codec.encode_batch([data[0], x])
        else:
            x[7] = -1
            with pytest.raises(ValueError, match="code -1 at position 7"):
                codec.encode(x)
            with pytest.raises(ValueError, match="sequence 1, position 7"):
                codec.encode_batch([data[0], x])


def test_unknown_id_names_its_position(codecs):
    for codec, data in codecs:
        ids = codec.encode(data[0]).copy()
        ids[1] = codec.vocab_size
        with pytest.raises(ValueError, match=f"token id {codec.vocab_size} at position 1"):
            codec.decode(ids)
        with pytest.raises(ValueError, match="at (sequence|grid) 1, position 1"):
            codec.decode_batch([codec.encode(data[0]), ids])


def test_wrong_grid_shape_and_bad_tilings(codecs, grids):
    codec = codecs[-1][0]
    with pytest.raises(ValueError, match=r"shape \(6, 4\), expected \(4, 6\)"):
        codec.encode(grids[0].T)
    with pytest.raises(ValueError, match="grid 1 has shape"):
        codec.encode_batch([grids[0], grids[0][:3]])
    with pytest.raises(ValueError, match="2-dimensional"):
        codec.encode(grids[0].reshape(-1))
    ids = codec.encode(grids[0])
    with pytest.raises(ValueError, match="empty"):
        codec.decode(ids[:-1])
    with pytest.raises(ValueError, match=f"position {len(ids)} does not fit"):
        codec.decode(np.concatenate([ids, ids[:1]]))
    big = int(np.argmax(codec.token_sizes()))
    with pytest.raises(ValueError, match="does not fit"):
        codec.decode(np.array([big] * 30))


def test_non_integer_input_is_rejected(codecs):
    codec, data = codecs[0]
    with pytest.raises(ValueError, match="integers"):
        codec.encode(data[0].astype(float))


def test_bad_training_arguments(seqs, grids):
    with pytest.raises(ValueError, match="mode"):
        BPECodec.train(seqs, codebook_size=K, vocab_size=40, mode="3d")
    with pytest.raises(ValueError, match="backend"):
        BPECodec.train(seqs, codebook_size=K, vocab_size=40, backend="bpe")
    with pytest.raises(ValueError, match="grid engine"):
        BPECodec.train(grids, codebook_size=K, vocab_size=40, mode="2d", backend="sentencepiece")
    with pytest.raises(ValueError, match="65534"):
        BPECodec.train(seqs, codebook_size=70000, vocab_size=70001)
    with pytest.raises(ValueError, match="at least codebook_size"):
        BPECodec.train(seqs, codebook_size=K, vocab_size=K - 1)
    with pytest.raises(ValueError, match="boundaries"):
        BPECodec.train(seqs, codebook_size=K, vocab_size=40, mode="flat", boundaries=[4])
    with pytest.raises(ValueError, match="strictly increasing"):
        BPECodec.train(seqs, codebook_size=K, vocab_size=40, boundaries=[4, 4])
    with pytest.raises(ValueError, match="batch_ratio"):
        BPECodec.train(seqs, codebook_size=K, vocab_size=40, batch_ratio=0.5)
    with pytest.raises(ValueError, match="code 5 at sequence 1, position 2"):
        BPECodec.train(np.array([[0, 1, 1], [1, 0, 5]]), codebook_size=2, vocab_size=40)
    with pytest.raises(ValueError, match="at least one"):
        BPECodec.train([], codebook_size=K, vocab_size=40)


@pytest.mark.parametrize(
    "mode,backend", [("1d", "tokenizers"), ("1d", "sentencepiece"), ("flat", "tokenizers"), ("2d", None)]
)
def test_too_little_data_stops_early_with_a_warning(mode, backend):
    data = np.array([[[0, 0], [1, 1]], [[0, 0], [1, 1]]]) if mode == "2d" else np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    with pytest.warns(UserWarning, match="learned only"):
        codec = BPECodec.train(data, codebook_size=K, vocab_size=K + 50, mode=mode, backend=backend)
    assert K <= codec.vocab_size < K + 50
    for x in data:
        assert np.array_equal(codec.decode(codec.encode(x)), x)


def test_enough_data_does_not_warn(seqs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codec = BPECodec.train(seqs, codebook_size=K, vocab_size=30, mode="flat")
    assert codec.vocab_size == 30


def test_cli_trains_saves_and_prints_stats(tmp_path, capsys, grids, seqs):
    np.save(tmp_path / "grids.npy", grids)
    args = ["--codes", str(tmp_path / "grids.npy"), "--vocab-size", "40", "--mode", "2d", "--out", str(tmp_path / "g")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "compression_ratio" in out and "mean_tokens_per_sequence" in out
    codec = BPECodec.from_pretrained(tmp_path / "g")
    assert codec.codebook_size == int(grids.max()) + 1 and codec.grid_shape == (4, 6)

    lengths = np.random.default_rng(0).integers(1, seqs.shape[1] + 1, size=len(seqs))
    np.savez(tmp_path / "var.npz", codes=seqs, lengths=lengths)
    args = ["--codes", str(tmp_path / "var.npz"), "--vocab-size", "40", "--mode", "1d", "--out", str(tmp_path / "v")]
    assert main(args + ["--backend", "sentencepiece", "--codebook-size", str(K)]) == 0
    assert BPECodec.from_pretrained(tmp_path / "v").backend == "sentencepiece"


SEQS = ["--codes", "{d}/seqs.npy", "--vocab-size", "40"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--codes", "{d}/missing.npy", "--vocab-size", "40", "--mode", "1d", "--out", "{d}/o"], "missing.npy"),
        ([*SEQS, "--mode", "2d", "--out", "{d}/o"], "seqs.npy"),
        (["--codes", "{d}/grids.npy", "--vocab-size", "40", "--mode", "2d", "--out", "{d}/o", "--backend",
          "sentencepiece"], "backend"),
        ([*SEQS, "--mode", "1d", "--out", "{d}/o", "--codebook-size", "3"], "seqs.npy"),
        (["--codes", "{d}/junk.npy", "--vocab-size", "40", "--mode", "1d", "--out", "{d}/o"], "junk.npy"),
        ([*SEQS, "--mode", "1d", "--out", "{d}/o", "--config", "x.yaml"], "--codes takes no --config"),
        (["--tokenizer", "{d}/tok", "--vocab-size", "40", "--mode", "1d", "--out", "{d}/o"], "--tokenizer needs"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, seqs, grids, args, needle):
    np.save(tmp_path / "seqs.npy", seqs)
    np.save(tmp_path / "grids.npy", grids)
    (tmp_path / "junk.npy").write_text("not an array")
    assert main([a.format(d=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--codes", "c.npy", "--vocab-size", "x", "--mode", "1d", "--out", "o"], "--vocab-size"),
    (["--codes", "c.npy", "--vocab-size", "40", "--mode", "1d"], "--out"),
    (["--codes", "c.npy", "--tokenizer", "t", "--vocab-size", "40", "--mode", "1d", "--out", "o"], "not allowed"),
])
def test_cli_usage_errors_name_the_flag_with_exit_code_2(capsys, args, needle):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_cli_script_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_bpe.py"), "--codes", str(tmp_path / "nope.npy"), "--vocab-size", "9",
         "--mode", "flat", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.npy'}: no such file"]


def test_cli_trains_on_a_tokenizers_codes_of_a_configs_images(tmp_path, capsys):
    """`--tokenizer`: the config's training images through the tokenizer (into the priors' token cache);
    2d keeps a grid tokenizer's latent grid; a KL tokenizer has no codes."""
    import torch

    from grid.autoencoder import GridAutoencoder
    from grid.schema import GridConfig, QuantizerConfig

    torch.manual_seed(0)
    for bottleneck in ("quantized", "kl"):
        config = GridConfig(channels=16, bottleneck=bottleneck, quantizer=QuantizerConfig(fsq_levels=[8, 5]))
        GridAutoencoder(config, resolution=16).save_pretrained(tmp_path / bottleneck)
    (tmp_path / "exp.yaml").write_text(f"out_dir: {tmp_path}\ndata: {{resolution: 16, crops_per_photo: 2}}\n"
                                       "eval: {num_images: 8}\n")  # a later stage's section: ignored here
    args = ["--config", str(tmp_path / "exp.yaml"), "--mode", "2d", "--vocab-size", "48"]
    assert main(["--tokenizer", str(tmp_path / "quantized"), *args, "--out", str(tmp_path / "bpe")]) == 0
    codec = BPECodec.from_pretrained(tmp_path / "bpe")
    assert (codec.mode, codec.codebook_size, codec.grid_shape) == ("2d", 40, (4, 4))
    assert any((tmp_path / "token_cache").iterdir())  # <out_dir>/token_cache, where the priors look
    capsys.readouterr()
    assert main(["--tokenizer", str(tmp_path / "kl"), *args, "--out", str(tmp_path / "none")]) == 2
    assert "no codes to merge" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_backend_vocabularies_are_checked_when_mapped_to_public_ids():
    from bpe_image._sequence import _public_ids
    from bpe_image._text import codes_to_text

    a, b, ab = codes_to_text(np.array([0])), codes_to_text(np.array([1])), codes_to_text(np.array([0, 1]))
    to_public, table = _public_ids([None, ab, b, a], 2)  # e.g. <unk> first, merged before base tokens
    assert to_public.tolist() == [-1, 2, 1, 0]
    assert table.expand(np.array([2, 1, 0])).tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="not made of codes"):
        _public_ids([a, b, "x"], 2)
    with pytest.raises(ValueError, match="each of the 2 codes"):
        _public_ids([a, ab], 2)


def test_a_codec_folders_fingerprint_leaves_out_its_card(codecs, tmp_path):
    from base.fingerprint import fingerprint_files

    codec, other = codecs[0][0], codecs[2][0]
    codec.save_pretrained(tmp_path / "a", card={"steps": 1, "metrics": {"ratio": 2.0}})
    codec.save_pretrained(tmp_path / "elsewhere")  # another card: other path in its snippet, no metrics
    other.save_pretrained(tmp_path / "other")
    assert (tmp_path / "a" / "README.md").read_text() != (tmp_path / "elsewhere" / "README.md").read_text()
    assert fingerprint_files(tmp_path / "a") == fingerprint_files(tmp_path / "elsewhere")
    assert fingerprint_files(tmp_path / "a") != fingerprint_files(tmp_path / "other")
