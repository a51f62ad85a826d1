"""Train a BPE codec on the codes a trained tokenizer gives a dataset (tokenized once, into the same
token cache the priors train from):

    python -m priors.bpe_from_tokenizer --tokenizer runs/quickstart/1d_tiny/final \
        --config configs/1d_tiny.yaml --mode 1d --vocab-size 1400 --out runs/quickstart/bpe_1d

1D tokenizers use `--mode 1d` (prefix-aligned merges); quantized grid autoencoders `--mode 2d` (their codes
laid out on the h x w latent grid) or `--mode flat`. The data section of `--config` names the images.
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
from bpe_image import BPECodec
from flextok import load_tokenizer
from grid.autoencoder import GridAutoencoder

from .schema import PriorConfig, PriorRunConfig
from .token_dataset import build_token_dataset, token_cache_dir

__all__ = ["main", "tokenizer_codes"]


def tokenizer_codes(tokenizer_path: str, config_path: str, overrides: list[str] = ()) -> tuple[np.ndarray, object]:
    """[N, L] codes of the config's training split, via the priors' token-dataset cache."""
    cfg = load_config(config_path, overrides, cls=PriorRunConfig, own_sections_only=True)  # others: later stages
    tokenizer = load_tokenizer(tokenizer_path)
    if getattr(tokenizer, "vocab_size", 0) == 0:
        raise UserError(f"{tokenizer_path}: a continuous (KL) tokenizer has no codes to merge")
    prior = PriorConfig(tokenizer=tokenizer_path, tokens="full")
    dataset = build_token_dataset(tokenizer, prior, cfg.data, cfg.data.train_split, token_cache_dir(cfg), seed=cfg.seed)
    return dataset.tokens.reshape(len(dataset), -1).astype(np.int64), tokenizer


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="saved tokenizer folder (Hub format)")
    parser.add_argument("--config", required=True, help="experiment YAML whose data section names the images")
    parser.add_argument("--mode", required=True, choices=["1d", "2d", "flat"])
    parser.add_argument("--vocab-size", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    args = parser.parse_args(argv)
    codes, tokenizer = tokenizer_codes(args.tokenizer, args.config, args.overrides)
    if args.mode == "2d":
        if not isinstance(tokenizer, GridAutoencoder):
            raise UserError(f"--mode 2d needs a grid tokenizer; {args.tokenizer} gives a 1D sequence (use 1d or flat)")
        codes = codes.reshape(len(codes), tokenizer.grid_size, tokenizer.grid_size)
    codec = BPECodec.train(codes, codebook_size=tokenizer.vocab_size, vocab_size=args.vocab_size, mode=args.mode)
    stats = codec.stats(codes).as_dict()
    codec.save_pretrained(args.out, card=ModelCardInfo(num_images=len(codes), metrics=stats))
    print(json.dumps(stats, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
