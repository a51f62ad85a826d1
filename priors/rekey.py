"""Record a tokenizer's current fingerprint in a prior trained on its tokens (see `priors.pairing`):

    python -m priors.rekey PRIOR_DIR TOKENIZER_DIR
"""

from __future__ import annotations

import argparse
import sys

from base.cli import exits_cleanly

from .pairing import rekey

__all__ = ["main"]


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior", help="saved prior folder (Hub format)")
    parser.add_argument("tokenizer", help="the saved tokenizer that prior was trained with")
    args = parser.parse_args(argv)
    old, new = rekey(args.prior, args.tokenizer)
    print(f"{args.prior}: tokenizer fingerprint {old[:12]} -> {new[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
