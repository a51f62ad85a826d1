"""Evaluate tokenizers and priors side by side: tokens and bits per image against PSNR, SSIM and rFID;
prior NLL (bits per image), gFID and sampling speed. Writes runs/<name>/report/.

    python evaluate.py --config configs/eval_tiny.yaml [eval.num_images=32 ...]

Exit code 0: every entry was measured; 1: the report was written but some entries failed (listed in
summary.md and report.json); 2: a config or input problem stopped the evaluation.
"""

from __future__ import annotations

import sys

from base.cli import config_parser, exits_cleanly
from base.config import load_config
from evaluation.schema import ExperimentConfig


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, cls=ExperimentConfig)
    from base.config import save_config
    from evaluation.report import write_report
    from evaluation.run import run_evaluation

    result = run_evaluation(cfg)
    directory = cfg.run_dir / "report"
    save_config(cfg, directory / "config.yaml")
    for path in write_report(result, directory):
        print(f"wrote {path}")
    if result.errors:
        print(f"error: {len(result.errors)} entries failed; see {directory / 'summary.md'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
