"""The image codec (`codec`): bit-exact token round trips for every stream kind, across processes too; file
size against the prior's NLL; one-line exit-2 errors that write nothing; odd image sizes and modes.

Models are tiny and untrained (the codec's correctness does not depend on their quality); the priors'
near-uniform predictions still make the NLL comparison exact arithmetic on real coded bits.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from base.data import skimage_photo
from base.fingerprint import fingerprint_model
from base.schema import SamplingConfig
from bpe_image import BPECodec
from codec import (
    HEADER_BYTES,
    OVERHEAD_BYTES,
    CodecSettings,
    ImageCodec,
    codec_size_vs_nll,
)
from codec.images import read_image, tile
from flextok import FlexTok
from flextok.schema import FlexTokConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig, QuantizerConfig
from image_codec import main
from priors import DiscretePrior, PriorConfig

REPO = Path(__file__).resolve().parents[1]
FSQ = QuantizerConfig(fsq_levels=[8, 5])  # 40 codes
SMALL_PRIOR = dict(dim=32, depth=1, heads=2)
TARGET_PSNR = 8.5  # splits this untrained tokenizer's tiles between lengths (checked in the round trip)

# stream name -> (prior folder, settings)
STREAMS = {
    "1d": ("prior_1d", CodecSettings()),
    "1d_k4": ("prior_1d", CodecSettings(k=4)),
    "1d_pow2": ("prior_1d", CodecSettings(target_psnr=TARGET_PSNR)),
    "adaptive_eos": ("prior_adaptive", CodecSettings(chunk=7)),
    "token_set": ("prior_set", CodecSettings()),
    "grid": ("prior_grid", CodecSettings()),
    "bpe": ("prior_bpe", CodecSettings()),
}


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(skimage_photo("astronaut")[100 : 100 + height, 150 : 150 + width]).convert(mode)


def flextok(token_set: bool = False) -> FlexTok:
    return FlexTok.from_config(FlexTokConfig(
        input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32, decoder_depth=1,
        decoder_heads=2, quantizer=FSQ, token_set=token_set, sampling=SamplingConfig(steps=2)), 16)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tokenizers (1D, token set, grid FSQ), a 1d BPE codec, a prior for each stream, and test images."""
    root = tmp_path_factory.mktemp("codec")
    torch.manual_seed(0)
    photo(240, 160).save(root / "big.png")
    photo(48, 40).save(root / "small.png")
    tiles = tile(read_image(root / "big.png")[0], 16)
    tokenizers = {"oned": flextok(), "tset": flextok(token_set=True),
                  "vq": GridAutoencoder(GridConfig(channels=16, bottleneck="quantized", quantizer=FSQ), resolution=16)}
    for name, model in tokenizers.items():
        if isinstance(model, FlexTok):
            model.to_target(tiles)  # what training does first: fix the target scale
        model.eval().save_pretrained(root / name)
    with warnings.catch_warnings():  # few repeated pairs in untrained codes: fewer merges, said in a warning
        warnings.simplefilter("ignore")
        BPECodec.train(torch.stack(tokenizers["oned"].tokenize(tiles)).numpy(), codebook_size=40, vocab_size=56,
                       mode="1d").save_pretrained(root / "bpe")
    bpe_vocab = BPECodec.from_pretrained(root / "bpe").vocab_size
    oned, tset, vq = (fingerprint_model(tokenizers[n]) for n in ("oned", "tset", "vq"))
    priors = {
        "prior_1d": (PriorConfig(tokenizer=str(root / "oned"), **SMALL_PRIOR), 40, 8, {"tokenizer_hash": oned}),
        "prior_adaptive": (PriorConfig(tokenizer=str(root / "oned"), tokens="adaptive", target_psnr=TARGET_PSNR,
                                       **SMALL_PRIOR), 40, 8, {"variable_length": True, "tokenizer_hash": oned}),
        "prior_set": (PriorConfig(tokenizer=str(root / "tset"), **SMALL_PRIOR), 40, 8,
                      {"token_set": True, "tokenizer_hash": tset}),
        "prior_grid": (PriorConfig(tokenizer=str(root / "vq"), **SMALL_PRIOR), 40, 16, {"tokenizer_hash": vq}),
        "prior_bpe": (PriorConfig(tokenizer=str(root / "oned"), tokens="bpe", bpe=str(root / "bpe"), **SMALL_PRIOR),
                      bpe_vocab, 8, {"variable_length": True, "tokenizer_hash": oned}),
    }
    for name, (config, vocab, length, extra) in priors.items():
        DiscretePrior(config, vocab, length, **extra).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def codecs(root):
    return {name: ImageCodec.open(root / name) for name in {prior for prior, _ in STREAMS.values()}}


@pytest.mark.parametrize("stream", list(STREAMS))
def test_tokens_round_trip_bit_exact(stream, root, codecs):
    prior, settings = STREAMS[stream]
    codec = codecs[prior]
    data, streams = codec.compress_with_tokens(root / "small.png", settings)
    header, decoded = codec.read(data)
    assert header.num_tiles == len(streams) == 9 and (header.width, header.height) == (48, 40)
    assert [s.tolist() for s in decoded] == [s.tolist() for s in streams]
    lengths = {len(s) for s in streams}
    tiles = tile(read_image(root / "small.png")[0], 16)
    if stream == "1d":  # exactly the tokenizer's tokens of each tile
        assert [s.tolist() for s in streams] == [t.tolist() for t in codec.tokenizer.tokenize(tiles)]
    elif stream == "1d_k4":
        assert lengths == {4}
    elif stream in ("1d_pow2", "adaptive_eos"):
        assert len(lengths) > 1 and lengths <= {1, 2, 4, 8}  # adaptive: tiles of different lengths
    elif stream == "token_set":
        assert all((np.diff(s) >= 0).all() for s in streams) and lengths == {8}
    elif stream == "grid":
        assert lengths == {16}
    elif stream == "bpe":
        assert min(lengths) < 8  # merges shortened some tiles
        assert [codec.bpe.decode(s).tolist() for s in decoded] == [t.tolist() for t in
                                                                    codecs["prior_1d"].tokenizer.tokenize(tiles)]
    png = Image.open(io.BytesIO(codec.decompress(data)))
    assert png.size == (48, 40) and png.mode == "RGB"


@pytest.mark.parametrize("stream", ["1d", "adaptive_eos", "token_set", "grid", "bpe"])
def test_file_size_tracks_prior_nll(stream, root, codecs):
    prior, settings = STREAMS[stream]
    (m,) = codec_size_vs_nll(codecs[prior], [root / "big.png"], settings, decode=False)
    assert m.tiles == 150 and m.file_bytes == m.payload_bytes + OVERHEAD_BYTES
    assert m.nll_bits > 4000
    assert abs(m.overhead_bits) <= 0.01 * m.model_bits, (m.payload_bytes * 8, m.model_bits)


def test_round_trip_across_processes(root, codecs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "image_codec.py", *args, "--prior", str(root / "prior_1d"), "--out-dir",
                   str(tmp_path)]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)

    done = run("compress", str(root / "small.png"))
    assert done.returncode == 0, done.stderr
    done = run("decompress", str(tmp_path / "small.ftk"))  # exits 2 unless the tokens' CRC matches
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "small.png").size == (48, 40)
    _, decoded = codecs["prior_1d"].read((tmp_path / "small.ftk").read_bytes())  # a third process: this one
    _, here = codecs["prior_1d"].compress_with_tokens(root / "small.png")
    assert [s.tolist() for s in decoded] == [s.tolist() for s in here]


def corrupt(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1 :]


def resealed(data: bytes, at: int, value: bytes) -> bytes:
    """`data` with bytes changed at `at` and a valid file CRC again (a consistent but wrong file)."""
    body = data[:at] + value + data[at + len(value) : -4]
    return body + struct.pack("<I", zlib.crc32(body))


BAD_FILES = {  # name -> (make the bad file from a good one, the prior to decode with, a word of the error)
    "truncated": (lambda d: d[:-9], "prior_1d", "truncated"),
    "corrupted": (lambda d: corrupt(d, OVERHEAD_BYTES, d[OVERHEAD_BYTES] ^ 0x40), "prior_1d", "corrupted"),
    "wrong_magic": (lambda d: b"PNG?" + d[4:], "prior_1d", "magic"),
    "wrong_version": (lambda d: corrupt(d, 4, 9), "prior_1d", "version"),
    "other_prior": (lambda d: d, "prior_adaptive", "prior"),
    # the token CRC field: what a decoder whose prior rounds differently sees
    "tokens_differ": (lambda d: resealed(d, HEADER_BYTES - 8, b"\0\0\0\0"), "prior_1d", "differ"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_one_line_exit_2_nothing_written(case, root, tmp_path, capsys):
    make, prior, word = BAD_FILES[case]
    good = ImageCodec.open(root / "prior_1d").compress(root / "small.png")
    (tmp_path / "bad.ftk").write_bytes(make(good))
    rc = main(["decompress", str(tmp_path / "bad.ftk"), "--prior", str(root / prior)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and word in err and "bad.ftk" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ftk"]


def test_unreadable_image_one_line_exit_2_nothing_written(root, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    rc = main(["compress", str(tmp_path / "notes.png"), "--prior", str(root / "prior_grid")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "notes.png: unreadable image" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.png"]


@pytest.mark.parametrize("mode, prior_name", [("L", "prior_grid"), ("RGBA", "prior_1d")])
def test_odd_size_any_mode_round_trips_to_same_size_png(mode, prior_name, root, tmp_path, capsys):
    photo(45, 37, mode).save(tmp_path / "odd.png")
    out = tmp_path / "out"
    prior = ["--prior", str(root / prior_name)]
    assert main(["compress", str(tmp_path / "odd.png"), *prior, "--out-dir", str(out)]) == 0
    assert main(["decompress", str(out / "odd.ftk"), *prior, "--sample"]) == 0  # the 1D decoder samples
    png = Image.open(out / "odd.png")
    assert png.size == (45, 37) and png.mode == ("L" if mode == "L" else "RGB")
    assert main(["decompress", str(out / "odd.ftk"), *prior]) == 2  # the PNG exists
    assert "--overwrite" in capsys.readouterr().err
