"""Train a BPE codec from a file of codes and print its statistics.

    python -m bpe_image.train --codes codes.npy --vocab-size 2048 --mode 1d --out DIR

`codes.npy` is an int array [N, L] (1d/flat) or [N, h, w] (2d). An `.npz` holding
`codes` (and, for variable-length 1D sequences, `lengths`: sequence i is
`codes[i, :lengths[i]]`) is accepted too. Bad arguments or files give a one-line error
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np

from ._backends import BACKENDS
from .codec import MODES, BPECodec

__all__ = ["EXIT_USAGE", "load_codes", "main"]

EXIT_USAGE = 2


class _UsageError(Exception):
    """A problem with the arguments or input file, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise instead of printing usage and exiting, so main() formats one line."""
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = _Parser(prog="python -m bpe_image.train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--codes", required=True, type=Path, help=".npy [N, L] / [N, h, w], or .npz with codes(, lengths)"
    )
    parser.add_argument("--vocab-size", required=True, type=int, help="V: codes plus merged tokens")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--out", required=True, type=Path, help="directory to save the codec in")
    parser.add_argument("--codebook-size", type=int, default=None, help="K (default: max code + 1)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default=None, help="1d/flat only (default tokenizers)")
    parser.add_argument("--max-token-length", type=int, default=16, help="most codes (2d: cells) per token")
    return parser


def load_codes(path: Path, mode: str) -> list[np.ndarray] | np.ndarray:
    """Read the training codes; raises _UsageError naming the file when unusable."""
    if not path.is_file():
        raise _UsageError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise _UsageError(f"{path}: not a readable .npy/.npz file ({err})") from err
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "codes" not in loaded.files:
                raise _UsageError(f"{path}: .npz has no 'codes' array (found {loaded.files})")
            codes = loaded["codes"]
            lengths = loaded["lengths"] if "lengths" in loaded.files else None
    else:
        codes, lengths = loaded, None
    want = 3 if mode == "2d" else 2
    if codes.ndim != want or codes.dtype.kind not in "iu":
        raise _UsageError(
            f"{path}: mode {mode} needs an integer array with {want} dims, got {codes.dtype} {codes.shape}"
        )
    if lengths is None:
        return codes
    if mode == "2d" or lengths.shape != (len(codes),) or (lengths < 0).any() or (lengths > codes.shape[1]).any():
        raise _UsageError(f"{path}: 'lengths' must be [N] values in [0, {codes.shape[1]}] and only for 1d/flat")
    return [row[:n] for row, n in zip(codes, lengths.tolist())]


def _default_codebook_size(codes: list[np.ndarray] | np.ndarray) -> int:
    """max code + 1 over the whole dataset."""
    if isinstance(codes, np.ndarray):
        return int(codes.max()) + 1 if codes.size else 0
    return max((int(c.max()) for c in codes if c.size), default=-1) + 1


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        if args.mode == "2d" and args.backend is not None:
            raise _UsageError("--backend applies to 1d/flat; 2d runs in the built-in grid engine")
        codes = load_codes(args.codes, args.mode)
        codebook_size = args.codebook_size if args.codebook_size is not None else _default_codebook_size(codes)
        try:
            codec = BPECodec.train(
                codes,
                codebook_size=codebook_size,
                vocab_size=args.vocab_size,
                mode=args.mode,
                backend=args.backend,
                max_token_length=args.max_token_length,
            )
        except ValueError as err:
            raise _UsageError(f"{args.codes}: {err}") from err
        codec.save_pretrained(args.out)
    except (_UsageError, OSError) as err:
        print(f"bpe_image.train: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(codec)
    print(codec.stats(codes))
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
