"""The image codec (`codec`) on files: one compressed file per image, one PNG per compressed file.

    python image_codec.py compress photo.jpg --prior runs/quickstart/prior_1d/final          # -> photo.ftk
    python image_codec.py decompress photo.ftk --prior runs/quickstart/prior_1d/final        # -> photo.png

Each output is written atomically once its input has gone all the way through, so a failure leaves no
partial file (earlier inputs of the same call keep their complete outputs). Bad input is one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from base.cli import exits_cleanly
from base.errors import UserError
from base.files import atomic_write_bytes
from codec import CodecSettings, ImageCodec

__all__ = ["SUFFIX", "main"]

SUFFIX = ".ftk"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Lossy image codec: a tokenizer's tokens, entropy-coded with its "
                                "prior's probabilities.")
    commands = p.add_subparsers(dest="command", required=True)
    compress = commands.add_parser("compress", help=f"images -> <name>{SUFFIX}")
    decompress = commands.add_parser("decompress", help=f"<name>{SUFFIX} -> <name>.png")
    for command in (compress, decompress):
        command.add_argument("inputs", nargs="+", type=Path)
        command.add_argument("--prior", required=True, help="saved discrete prior (folder, or hf:owner/name)")
        command.add_argument("--tokenizer", help="its tokenizer (default: the one the prior's config names)")
        command.add_argument("--out-dir", type=Path, help="where outputs go (default: next to each input)")
        command.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        command.add_argument("--device", default="cpu", help="the tokenizer's device (the prior runs on the CPU)")
        command.add_argument("--seed", type=int, help="the decoder's noise seed (default 0, or the file's)")
        command.add_argument("--steps", type=int, help="decoder steps when sampling")
        command.add_argument("--sample", action="store_const", const="sample", dest="decode",
                             help="decode a sample from the tokens instead of the posterior mean")
    compress.add_argument("--k", type=int, help="tokens per tile of an ordered 1D stream (default: the prior's)")
    compress.add_argument("--target-psnr", type=float, help="adaptive tokens per tile to reach this PSNR (dB)")
    compress.add_argument("--guidance-scale", type=float, help="decoder guidance when sampling")
    compress.add_argument("--chunk", type=int, default=CodecSettings.chunk, help="tiles per batch")
    compress.add_argument("--threads", type=int, default=CodecSettings.threads, help="torch threads of the prior")
    decompress.add_argument("--mean", action="store_const", const="mean", dest="decode",
                            help="decode the posterior mean even if the file asks for a sample")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    suffix = SUFFIX if args.command == "compress" else ".png"
    outputs = [(args.out_dir or path.parent) / (path.stem + suffix) for path in args.inputs]
    taken = [str(out) for out in outputs if out.exists() and not args.overwrite]
    if taken:
        raise UserError(f"{taken[0]}: exists (pass --overwrite to replace it)")
    codec = ImageCodec.open(args.prior, args.tokenizer, args.device)
    if args.command == "compress":
        settings = CodecSettings(k=args.k, target_psnr=args.target_psnr, decode=args.decode or "mean",
                                 steps=args.steps, guidance_scale=args.guidance_scale,
                                 seed=0 if args.seed is None else args.seed, chunk=args.chunk, threads=args.threads)
    for path, out in zip(args.inputs, outputs):
        if args.command == "compress":
            data = codec.compress(path, settings)
        else:
            data = codec.decompress(_read(path), str(path), decode=args.decode, steps=args.steps, seed=args.seed)
        atomic_write_bytes(out, data)
        print(f"{path} -> {out} ({len(data)} bytes)")
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err.strerror or err})") from None


if __name__ == "__main__":
    sys.exit(main())
