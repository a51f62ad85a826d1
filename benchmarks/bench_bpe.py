"""Benchmark bpe_image on the shared BPE data of ANCHORS.md section C.

    python benchmarks/bench_bpe.py [--repeats 3]

Prints, per mode, train seconds, encode sequences (grids) per second and compression
(codes per token), next to the reference figures recorded in ANCHORS.md, plus raw HF
``tokenizers`` measured in this same run for the flat comparison, and this process's
2048^3 fp32 matmul GFLOP/s (the machines are noisy; compare throughput / GFLOP/s).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, trainers

from bpe_image import BPECodec
from bpe_image._backends import MIN_PAIR_COUNT
from bpe_image._text import alphabet, codes_to_text

K, V = 1024, 2048
REFERENCE = {
    "vbpe_2d_train_s": 28.3,
    "vbpe_2d_encode_per_s": 535.0,
    "vbpe_2d_ratio": 1.012,
    "hf_flat_train_s": 0.59,
    "hf_flat_encode_per_s": 15015.0,
    "hf_flat_ratio": 1.686,
}
TARGET = {"2d_train_s": 2.8, "2d_ratio": 1.5, "2d_encode_per_s": 5350.0, "flat_train_x": 1.5, "flat_encode_per_s": 15000.0}


def benchmark_grids() -> np.ndarray:
    """The shared data, made exactly as ANCHORS.md prescribes: 2000 16x16 grids, K = 1024."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 1024, size=(2000, 4, 4))
    grids = base.repeat(4, axis=1).repeat(4, axis=2)
    noise = rng.random(grids.shape) < 0.10
    grids[noise] = rng.integers(0, 1024, size=int(noise.sum()))
    return grids


def matmul_gflops(repeats: int = 5) -> float:
    """Best 2048^3 fp32 torch matmul speed in this process."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    return 2 * 2048**3 / best_time(lambda: a @ b, repeats)[0] / 1e9


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Fastest wall time over ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_codec(data: np.ndarray, mode: str, backend: str | None, repeats: int) -> dict[str, Any]:
    """Train, encode and check exact round trips for one mode/backend."""
    train_s, codec = best_time(lambda: BPECodec.train(data, codebook_size=K, vocab_size=V, mode=mode, backend=backend), repeats)
    encode_s, ids = best_time(lambda: codec.encode_batch(data), repeats)
    decode_s, decoded = best_time(lambda: codec.decode_batch(ids), repeats)
    exact = all(np.array_equal(x, y) for x, y in zip(data, decoded))
    stats = codec.stats(data)
    return {
        "label": f"{mode}/{codec.backend}",
        "train_s": train_s,
        "encode_per_s": len(data) / encode_s,
        "decode_per_s": len(data) / decode_s,
        "ratio": stats.compression_ratio,
        "exact": exact,
        "merges": codec.num_merges,
        "codec": codec,
    }


def prefixes_aligned(codec: BPECodec, sequences: np.ndarray, count: int = 200) -> bool:
    """1d: truncation at every power-of-two edge equals encoding the truncated codes."""
    for x in sequences[:count]:
        ids = codec.encode(x)
        for k in [1 << i for i in range(9) if 1 << i <= len(x)]:
            if not np.array_equal(codec.truncate(ids, k), codec.encode(x[:k])):
                return False
    return True


def measure_raw_tokenizers(sequences: np.ndarray, repeats: int) -> dict[str, Any]:
    """HF ``tokenizers`` used directly, with the same configuration as our flat backend."""
    text = codes_to_text(sequences.reshape(-1))
    length = sequences.shape[1]
    strings = [text[i * length : (i + 1) * length] for i in range(len(sequences))]

    def train() -> Tokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.decoder = decoders.Fuse()
        trainer = trainers.BpeTrainer(
            vocab_size=V,
            min_frequency=MIN_PAIR_COUNT,
            show_progress=False,
            special_tokens=[],
            limit_alphabet=K,
            initial_alphabet=alphabet(K),
            max_token_length=16,
        )
        tokenizer.train_from_iterator(strings, trainer=trainer, length=len(strings))
        return tokenizer

    train_s, tokenizer = best_time(train, repeats)
    encode_s, encodings = best_time(lambda: tokenizer.encode_batch(strings, add_special_tokens=False), repeats)
    fast_s, _ = best_time(lambda: tokenizer.encode_batch_fast(strings, add_special_tokens=False), repeats)
    tokens = sum(len(e.ids) for e in encodings)
    return {
        "train_s": train_s,
        "encode_per_s": len(strings) / encode_s,
        "encode_fast_per_s": len(strings) / fast_s,
        "ratio": sequences.size / tokens,
    }


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (best is kept)")
    args = parser.parse_args()

    grids = benchmark_grids()
    sequences = grids.reshape(len(grids), -1)
    gflops_before = matmul_gflops()
    rows = [
        measure_codec(grids, "2d", None, args.repeats),
        measure_codec(sequences, "flat", "tokenizers", args.repeats),
        measure_codec(sequences, "1d", "tokenizers", args.repeats),
        measure_codec(sequences, "flat", "sentencepiece", args.repeats),
        measure_codec(sequences, "1d", "sentencepiece", args.repeats),
    ]
    raw = measure_raw_tokenizers(sequences, args.repeats)
    gflops = max(gflops_before, matmul_gflops())

    print(f"data: 2000 grids 16x16 (ANCHORS.md C), K={K}, V={V}; torch threads {torch.get_num_threads()}")
    print(f"matmul 2048^3 fp32: {gflops:.1f} GFLOP/s (best in this process)\n")
    print(f"{'mode/backend':<20}{'train s':>9}{'encode/s':>11}{'decode/s':>11}{'codes/tok':>11}{'merges':>8}  exact")
    for row in rows:
        print(
            f"{row['label']:<20}{row['train_s']:>9.3f}{row['encode_per_s']:>11.0f}{row['decode_per_s']:>11.0f}"
            f"{row['ratio']:>11.3f}{row['merges']:>8}  {row['exact']}"
        )
    print(
        f"{'raw HF tokenizers':<20}{raw['train_s']:>9.3f}{raw['encode_per_s']:>11.0f}{'':>11}{raw['ratio']:>11.3f}"
        f"{'':>8}  (encode_batch; encode_batch_fast {raw['encode_fast_per_s']:.0f}/s)"
    )
    one_d = next(r for r in rows if r["label"] == "1d/tokenizers")
    print(f"1d prefix alignment at every power-of-two edge (200 sequences): {prefixes_aligned(one_d['codec'], sequences)}")

    two_d, flat = rows[0], rows[1]
    print("\ncomparison with ANCHORS.md C (reference rows were measured on other runs of this machine type)")
    print(
        f"  2d train      {two_d['train_s']:.3f} s  vs vBPE {REFERENCE['vbpe_2d_train_s']} s "
        f"-> {REFERENCE['vbpe_2d_train_s'] / two_d['train_s']:.1f}x faster; target <= {TARGET['2d_train_s']} s: "
        f"{verdict(two_d['train_s'] <= TARGET['2d_train_s'])}"
    )
    print(
        f"  2d encode     {two_d['encode_per_s']:.0f} grids/s vs vBPE {REFERENCE['vbpe_2d_encode_per_s']:.0f} "
        f"-> {two_d['encode_per_s'] / REFERENCE['vbpe_2d_encode_per_s']:.1f}x; target >= {TARGET['2d_encode_per_s']:.0f}: "
        f"{verdict(two_d['encode_per_s'] >= TARGET['2d_encode_per_s'])}"
    )
    print(
        f"  2d ratio      {two_d['ratio']:.3f} codes/token (exact: {two_d['exact']}) vs vBPE {REFERENCE['vbpe_2d_ratio']} "
        f"(lossy); target >= {TARGET['2d_ratio']}: {verdict(two_d['ratio'] >= TARGET['2d_ratio'] and two_d['exact'])}"
    )
    slowdown = flat["train_s"] / raw["train_s"]
    print(
        f"  flat train    {flat['train_s']:.3f} s vs raw HF {raw['train_s']:.3f} s this run ({slowdown:.2f}x; "
        f"reference {REFERENCE['hf_flat_train_s']} s); target within {TARGET['flat_train_x']}x: "
        f"{verdict(slowdown <= TARGET['flat_train_x'])}"
    )
    print(
        f"  flat encode   {flat['encode_per_s']:.0f} seq/s at {flat['ratio']:.3f} codes/token vs raw HF encode_batch "
        f"{raw['encode_per_s']:.0f} seq/s this run (reference {REFERENCE['hf_flat_encode_per_s']:.0f} at "
        f"{REFERENCE['hf_flat_ratio']}); target >= {TARGET['flat_encode_per_s']:.0f}: "
        f"{verdict(flat['encode_per_s'] >= TARGET['flat_encode_per_s'])}"
    )
    print("\nper GFLOP/s (comparable across runs): " + ", ".join(
        f"{row['label']} encode {row['encode_per_s'] / gflops:.1f}" for row in rows
    ))


if __name__ == "__main__":
    main()
