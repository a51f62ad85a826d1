"""Experiment trackers: a run's scalars and sample images go to every tracker its config lists.

- "jsonl": `runs/<name>/metrics.jsonl` (`base.files.MetricsLog`), the record the project's own readers use;
- "tensorboard": event files in `runs/<name>/tensorboard/` (`tensorboard --logdir runs/`);
- "trackio": the local-first trackio store (`$TRACKIO_DIR`, default `~/.cache/huggingface/trackio`; view it
  with `trackio show`), one project per output folder; no network. Optional: `pip install -e '.[tracking]'`.

A run resumed from step `start_step` redoes the steps after it: "jsonl" drops their records and TensorBoard
purges their events; trackio has no way to drop logged steps, so its plots show a killed run's redone steps
twice. Writing from rank 0 only is the caller's job."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml
from PIL import Image

from .errors import ConfigError, UserError
from .files import MetricsLog

__all__ = ["TRACKERS", "Trackers", "open_trackers", "tracker_names_problem"]

TRACKERS = ("jsonl", "tensorboard", "trackio")  # the names a config's `trackers` may list


class _Tracker(Protocol):
    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...
    def log_image(self, step: int, tag: str, path: Path) -> None: ...
    def close(self) -> None: ...


class _Jsonl:
    def __init__(self, run_dir: Path, *, start_step: int) -> None:
        self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.log.truncate_after(start_step)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.log.append({"step": step, **values})

    def log_image(self, step: int, tag: str, path: Path) -> None:
        """Nothing: the PNG is in the run folder already, and readers take every record for scalars."""

    def close(self) -> None:
        """Nothing: every record was appended and closed when it was logged."""


class _TensorBoard:
    def __init__(self, run_dir: Path, *, config: dict[str, Any], start_step: int) -> None:
        # imported here: importing tensorboard costs only the runs that use it
        from torch.utils.tensorboard import SummaryWriter

        # Events at steps >= purge_step that an earlier, killed process wrote are dropped by readers: the
        # steps after `start_step` are redone, `start_step` itself was logged before its checkpoint.
        self.writer = SummaryWriter(run_dir / "tensorboard", purge_step=start_step + 1)
        self.writer.add_text("config", _markdown_yaml(config), global_step=start_step)
        self.writer.flush()

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a kill then loses no step that its checkpoint keeps

    def log_image(self, step: int, tag: str, path: Path) -> None:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, run_dir: Path, *, run_name: str, config: dict[str, Any], start_step: int) -> None:
        self.trackio = _import_trackio()
        # A resumed run continues its trackio run of the same name; a fresh one starts a new one.
        self.run = self.trackio.init(project=run_dir.resolve().parent.name, name=run_name, config=config,
                                     resume="allow" if start_step > 0 else "never")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({tag: self.trackio.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def _import_trackio():
    try:
        import trackio
    except ImportError:
        raise UserError("trackers: 'trackio' needs the trackio package: pip install -e '.[tracking]'") from None
    return trackio


def _markdown_yaml(config: dict[str, Any]) -> str:
    """The config as YAML in a markdown code block (TensorBoard renders text as markdown)."""
    body = yaml.safe_dump(config, sort_keys=False)
    return "    " + body.rstrip("\n").replace("\n", "\n    ")


def tracker_names_problem(names: list[str]) -> str | None:
    """What is wrong with a `trackers` list (an unknown or repeated name), or None: the one check that both
    the config section and `open_trackers` apply."""
    for name in names:
        if name not in TRACKERS:
            return f"unknown tracker {name!r} (known: {', '.join(TRACKERS)})"
        if names.count(name) > 1:
            return f"{name!r} is listed twice"
    return None


class Trackers:
    """The trackers a run writes to; each call goes to every one of them, in the configured order."""

    def __init__(self, trackers: list[_Tracker]) -> None:
        self.trackers = trackers

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(step, values)

    def log_image(self, step: int, tag: str, path: Path) -> None:
        """Log a PNG the caller has already written (e.g. `runs/<name>/samples/step_XXXXXXX.png`)."""
        for tracker in self.trackers:
            tracker.log_image(step, tag, Path(path))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trackers(names: list[str], run_dir: Path, *, run_name: str, config: dict[str, Any],
                  start_step: int) -> Trackers:
    """Open the trackers `names` (from `TRACKERS`) for the run in `run_dir` that starts at `start_step`
    (0 for a fresh run); `config` (the resolved config as a plain dict) is logged where a tracker keeps one.
    A tracker that fails to open closes the ones opened before it."""
    if problem := tracker_names_problem(list(names)):
        raise ConfigError(f"trackers: {problem}")
    run_dir = Path(run_dir)
    openers = {
        "jsonl": lambda: _Jsonl(run_dir, start_step=start_step),
        "tensorboard": lambda: _TensorBoard(run_dir, config=config, start_step=start_step),
        "trackio": lambda: _Trackio(run_dir, run_name=run_name, config=config, start_step=start_step),
    }
    opened = Trackers([])
    try:
        for name in names:
            opened.trackers.append(openers[name]())
    except BaseException:
        opened.close()
        raise
    return opened
