"""Write any image source's train and eval splits as a local Hugging Face dataset of parquet shards.

    python export_parquet.py --source builtin:skimage --out runs/mini_data [data.key=value ...]

The folder (`<out>/data/<split>-<shard>-of-<shards>.parquet`, e.g. `train-00000-of-00001.parquet`: an
'image' column of encoded images and 'label') is what `datasets.load_dataset(<out>)` reads, so
`data.source: hf:<out>` trains on it through exactly the code path of a Hub dataset id.
`configs/1d_256_mini.yaml` uses it to rehearse the ImageNet recipe on CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from base.cli import exits_cleanly
from base.config import load_config
from base.data import load_source
from base.errors import UserError
from base.schema import DataConfig
from flextok.schema import TokenizerRunConfig

__all__ = ["export_parquet", "main"]


def export_parquet(data: DataConfig, out: str | Path, seed: int = 0, rows_per_shard: int = 10_000) -> dict[str, int]:
    """Both splits of `data` (its train split at full size, its eval split up to `eval_images`) as parquet
    shards under `out/data/`; returns the image count per split."""
    if data.streaming:
        raise UserError("data.streaming: export a map-style source (a stream has no length to shard)")
    counts = {}
    for split in dict.fromkeys([data.train_split, data.eval_split]):
        source = load_source(data, split, seed)
        if split == data.eval_split and split != data.train_split:
            source = source.select(range(min(data.eval_images, len(source))))
        shards = max(1, -(-len(source) // rows_per_shard))
        for index in range(shards):
            path = Path(out) / "data" / f"{split}-{index:05d}-of-{shards:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            source.shard(shards, index, contiguous=True).to_parquet(str(path))
        counts[split] = len(source)
    return counts


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--source", required=True, help="any data.source (builtin:skimage, photos:..., ...)")
    parser.add_argument("--out", required=True, type=Path, help="the dataset folder to write")
    parser.add_argument("--config", default=None, help="a YAML whose data section to start from")
    parser.add_argument("overrides", nargs="*", metavar="data.key=value", help="e.g. data.resolution=64")
    args = parser.parse_args(argv)
    if (args.out / "data").exists():
        raise UserError(f"{args.out / 'data'} exists already: delete it to export again")
    cfg = load_config(args.config, [f"data.source={args.source}", *args.overrides], cls=TokenizerRunConfig)
    counts = export_parquet(cfg.data, args.out, cfg.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
