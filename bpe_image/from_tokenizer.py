"""Train a BPE codec on the codes a trained tokenizer gives a dataset (tokenized once, cached):

    python -m bpe_image.from_tokenizer --tokenizer runs/quickstart/1d_tiny/final \
        --config configs/1d_tiny.yaml --mode 1d --vocab-size 1400 --out runs/quickstart/bpe_1d

1D tokenizers use `--mode 1d` (prefix-aligned merges); quantized grid autoencoders `--mode 2d` (their codes
are reshaped to the h x w grid) or `--mode flat`. The data section of `--config` names the images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from flextok.cli import UserError, exits_cleanly


def tokenizer_codes(tokenizer_path: str, config_path: str) -> tuple[np.ndarray, object]:
    """[N, L] codes of the config's training split, via the priors' token-dataset cache."""
    from flextok import load_tokenizer
    from flextok.config import PriorConfig, load_config
    from priors.token_dataset import build_token_dataset

    cfg = load_config(config_path)
    tokenizer = load_tokenizer(tokenizer_path)
    if getattr(tokenizer, "vocab_size", 0) == 0:
        raise UserError(f"{tokenizer_path}: a continuous (KL) tokenizer has no codes to merge")
    prior = PriorConfig(tokenizer=tokenizer_path, tokens="full")
    cache = Path(cfg.prior.cache_dir or cfg.run_dir.parent / "token_cache")
    dataset = build_token_dataset(tokenizer, prior, cfg.data, cfg.data.train_split, cache, seed=cfg.seed)
    return dataset.tokens.reshape(len(dataset), -1).astype(np.int64), tokenizer


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="saved tokenizer folder (Hub format)")
    parser.add_argument("--config", required=True, help="experiment YAML whose data section names the images")
    parser.add_argument("--mode", required=True, choices=["1d", "2d", "flat"])
    parser.add_argument("--vocab-size", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    from bpe_image import BPECodec

    codes, tokenizer = tokenizer_codes(args.tokenizer, args.config)
    if args.mode == "2d":
        side = int(round(codes.shape[1] ** 0.5))
        codes = codes.reshape(len(codes), side, side)
    codec = BPECodec.train(codes, codebook_size=tokenizer.vocab_size, vocab_size=args.vocab_size, mode=args.mode)
    codec.save_pretrained(args.out)
    stats = codec.stats(codes)
    print(json.dumps(stats.as_dict(), indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
