"""Ablations of the 1D tokenizer: train named variants of one experiment's `flextok` section for the same
number of steps, then decode each held-out image from every prefix k = 1, 2, 4, ..., R as the posterior mean
(one Euler step from t = 1) and print PSNR per k with a 95% bootstrap interval, beside training time and img/s.
Two probes of what the later tokens carry: each register's code entropy over the held-out images, and the
PSNR when the tokens after the first `--swap-after` come from another image.

    python benchmarks/ablate_flextok.py --config configs/fmnist.yaml --autoencoder runs/study_fmnist/kl_f4/final \
        --steps 1000 --variant base: --variant enc4:flextok.depth=4 --variant dec6:flextok.decoder_depth=6

A variant is NAME:OVERRIDE[;OVERRIDE...] (`section.key=value`, as on train_tokenizer.py's command line). Each
trains in its own `train_tokenizer.py` process into OUT/NAME, logging to OUT/NAME.log; a variant whose
OUT/NAME/final exists is not retrained. Nothing else should run meanwhile, or the times say nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import matmul_gflops

from base.config import load_config
from base.data import load_images
from base.metrics import psnr
from evaluation.bootstrap import bootstrap_interval
from evaluation.schema import ExperimentConfig
from flextok import FlexTok
from flextok.nested_dropout import powers_of_two_upto
from flextok.schema import TokenizerRunConfig

ROOT = Path(__file__).resolve().parent.parent


def train(config: str, out: Path, name: str, steps: int, overrides: list[str]) -> float:
    """Train one variant of any tokenizer family (`overrides` choose it) in its own `train_tokenizer.py`
    process into OUT/NAME, resuming a run killed before it finished; returns its wall-clock seconds (0 when
    OUT/NAME/final exists and is reused; for a resumed run, only this process's part: its training.json sums
    the steps' time over every part)."""
    if (out / name / "final").exists():
        return 0.0
    command = [sys.executable, str(ROOT / "train_tokenizer.py"), "--config", str(Path(config).resolve()),
               f"name={name}", f"out_dir={out}", f"train.steps={steps}", f"train.eval_every={steps}", *overrides]
    if (out / name / "checkpoints").is_dir():
        command.append("--resume")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / f"{name}.log", "a") as log:  # the trainer's progress bar and lines, every part of the run
        subprocess.run(command, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


@torch.no_grad()
def mean_psnr_per_k(model: FlexTok, images: torch.Tensor, batch: int = 100) -> dict[int, np.ndarray]:
    ks = powers_of_two_upto(model.num_registers)
    values = {k: [] for k in ks}
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        decoded = model.detokenize_prefixes(model.tokenize(x), ks, seed=0, steps=1, guidance_scale=1.0)
        for k in ks:
            values[k].append(psnr(decoded[k], x))
    return {k: torch.cat(v).double().numpy() for k, v in values.items()}


def register_entropy(tokens: torch.Tensor, vocab_size: int) -> list[float]:
    """Empirical entropy in bits of each register's code over the held-out images ([N, R] tokens)."""
    entropies = []
    for column in tokens.T:
        p = torch.bincount(column, minlength=vocab_size).double()
        p = p[p > 0] / p.sum()
        entropies.append(float(-(p * p.log2()).sum()))
    return entropies


@torch.no_grad()
def tail_swap(model: FlexTok, images: torch.Tensor, tokens: torch.Tensor, j: int) -> dict[str, float]:
    """Mean PSNR (posterior-mean decoding) from all own tokens, from the own first j followed by another
    image's tokens, and from the own first j alone: whether the decoder uses tokens past j, and whether
    they add anything to the first j."""
    other = tokens.roll(1, 0)  # each image gets its neighbour's tail
    variants = {"own": tokens, "swapped tail": torch.cat([tokens[:, :j], other[:, j:]], 1), "prefix": tokens[:, :j]}
    return {name: psnr(model.detokenize(list(t), steps=1, guidance_scale=1.0), images).mean().item()
            for name, t in variants.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML whose flextok section is the base")
    parser.add_argument("--autoencoder", required=True, help="trained grid KL autoencoder (flextok.autoencoder)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--images", type=int, default=500, help="held-out images (the config's eval_split)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablate_flextok"))
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:OVERRIDES")
    parser.add_argument("--swap-after", type=int, default=8, help="the tail-swap probe keeps this many own tokens")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the trainer runs in the repository root, this script anywhere
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul 2048^3 fp32: "
          f"{matmul_gflops():.1f} GFLOP/s")
    cfg = load_config(args.config, cls=TokenizerRunConfig, within=ExperimentConfig)
    images = load_images(cfg.data, cfg.data.eval_split, limit=args.images).images
    autoencoder = args.autoencoder  # a local folder (else a hub id hf:owner/name)
    autoencoder = str(Path(autoencoder).resolve()) if Path(autoencoder).exists() else autoencoder
    rows = []
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        overrides = [o for o in rest.split(";") if o]
        seconds = train(args.config, args.out, name, args.steps,
                        ["tokenizer=flextok", f"flextok.autoencoder={autoencoder}", *overrides])
        model = FlexTok.from_pretrained(args.out / name / "final").eval()
        per_k = mean_psnr_per_k(model, images)
        trained = (f"trained {seconds:.0f} s ({args.steps * cfg.train.batch_size / seconds:.0f} img/s)" if seconds
                   else "trained earlier (reused)")
        cells = "  ".join(f"k={k} {v.mean():.2f} [{lo:.2f}, {hi:.2f}]"
                          for k, v in per_k.items() for lo, hi in [bootstrap_interval(v)])
        print(f"{name} ({'; '.join(overrides) or 'the config as it is'}): {trained}; mean PSNR dB on "
              f"{len(images)} held-out images: {cells}", flush=True)
        tokens = torch.stack(model.tokenize(images))
        entropy = register_entropy(tokens, model.vocab_size)
        half = len(entropy) // 2
        swap = tail_swap(model, images, tokens, args.swap_after)
        print(f"  code entropy per register, bits: first {half} {np.mean(entropy[:half]):.1f}, last {half} "
              f"{np.mean(entropy[half:]):.1f} ({' '.join(f'{e:.1f}' for e in entropy)})")
        print(f"  tokens after {args.swap_after}: PSNR with own tokens {swap['own']:.2f}, with another image's "
              f"{swap['swapped tail']:.2f}, without them {swap['prefix']:.2f}", flush=True)
        rows.append({"name": name, "overrides": overrides, "seconds": seconds, "entropy": entropy, "swap": swap,
                     "psnr": {k: float(v.mean()) for k, v in per_k.items()}})
    print(f"matmul after: {matmul_gflops():.1f} GFLOP/s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
