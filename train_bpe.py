"""Train a BPE codec (`bpe_image`) over image codes: a trained tokenizer's codes of a config's images, or
codes saved in a file. Prints the codec's statistics.

    python train_bpe.py --tokenizer runs/quickstart/1d_tiny/final --config configs/1d_tiny.yaml \\
        --mode 1d --vocab-size 1400 --out runs/quickstart/bpe_1d [section.key=value ...]
    python train_bpe.py --codes codes.npy --mode 1d --vocab-size 2048 --out DIR

`--tokenizer`: the training split of `--config`'s data section, tokenized once into the priors' token-cache
folder. 1D tokenizers use `--mode 1d` (prefix-aligned merges); quantized grid autoencoders
`--mode 2d` (their codes on the h x w latent grid) or `--mode flat`.
`--codes`: an integer `.npy` [N, L] (1d/flat) or [N, h, w] (2d), or an `.npz` holding `codes` and, for
variable-length 1D sequences, `lengths` (sequence i is `codes[i, :lengths[i]]`).
Bad arguments or files: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from base.cli import exits_cleanly
from base.config import load_config
from base.errors import UserError
from base.hub import ModelCardInfo
from bpe_image import BACKENDS, MODES, BPECodec, load_codes
from evaluation.schema import ExperimentConfig
from flextok import load_tokenizer
from grid.autoencoder import GridAutoencoder
from priors.schema import PriorConfig, PriorRunConfig
from priors.token_dataset import build_token_dataset, token_cache_dir

__all__ = ["main", "tokenizer_codes"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="saved quantized tokenizer (folder or hf:owner/name); needs --config")
    source.add_argument("--codes", type=Path, help=".npy [N, L] / [N, h, w], or .npz with codes(, lengths)")
    p.add_argument("--config", help="--tokenizer: the experiment YAML whose data section names the images")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--vocab-size", required=True, type=int, help="V: codes plus merged tokens")
    p.add_argument("--out", required=True, type=Path, help="folder to save the codec in")
    p.add_argument("--codebook-size", type=int, help="--codes: K (default: max code + 1); a tokenizer's is its own")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="1d/flat only (default tokenizers)")
    p.add_argument("--max-token-length", type=int, default=16, help="most codes (2d: cells) per token")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="--tokenizer: override --config values")
    return p


def tokenizer_codes(tokenizer_path: str, cfg: PriorRunConfig, mode: str) -> tuple[np.ndarray, int]:
    """A quantized tokenizer's codes of `cfg`'s training split ([N, L], or [N, h, w] for mode 2d) through
    the token cache the priors train from, and its codebook size."""
    tokenizer = load_tokenizer(tokenizer_path)
    if getattr(tokenizer, "vocab_size", 0) == 0:
        raise UserError(f"{tokenizer_path}: a continuous (KL) tokenizer has no codes to merge")
    if mode == "2d" and not isinstance(tokenizer, GridAutoencoder):
        raise UserError(f"--mode 2d needs a grid tokenizer; {tokenizer_path} gives a 1D sequence (use 1d or flat)")
    prior = PriorConfig(tokenizer=tokenizer_path, tokens="full")
    dataset = build_token_dataset(tokenizer, prior, cfg.data, cfg.data.train_split, token_cache_dir(cfg), seed=cfg.seed)
    codes = dataset.tokens.reshape(len(dataset), -1).astype(np.int64)
    if mode == "2d":
        codes = codes.reshape(len(codes), tokenizer.grid_size, tokenizer.grid_size)
    return codes, tokenizer.vocab_size


def file_codes(path: Path, mode: str, codebook_size: int | None) -> tuple[list[np.ndarray] | np.ndarray, int]:
    """The codes saved in `path` and the codebook size (given, else max code + 1)."""
    codes = load_codes(path, mode)
    if codebook_size is not None:
        return codes, codebook_size
    if isinstance(codes, np.ndarray):
        return codes, int(codes.max()) + 1 if codes.size else 0
    return codes, max((int(c.max()) + 1 for c in codes if c.size), default=0)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.tokenizer is not None:
        if args.config is None or args.codebook_size is not None:
            raise UserError("--tokenizer needs --config, and takes its codebook size from the tokenizer")
        # the other sections belong to later stages (the evaluation's, for one)
        cfg = load_config(args.config, args.overrides, cls=PriorRunConfig, within=ExperimentConfig)
        codes, codebook_size = tokenizer_codes(args.tokenizer, cfg, args.mode)
    else:
        if args.config is not None or args.overrides:
            raise UserError("--codes takes no --config and no overrides: the codes file is the whole input")
        codes, codebook_size = file_codes(args.codes, args.mode, args.codebook_size)
    try:
        codec = BPECodec.train(codes, codebook_size=codebook_size, vocab_size=args.vocab_size, mode=args.mode,
                               backend=args.backend, max_token_length=args.max_token_length)
    except ValueError as err:
        raise UserError(f"{args.tokenizer or args.codes}: {err}") from None
    stats = codec.stats(codes).as_dict()
    codec.save_pretrained(args.out, card=ModelCardInfo(num_images=len(codes), metrics=stats))
    print(codec)
    print(json.dumps(stats, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
