"""Crash-safe files: every checkpoint, cache, config, image and log rewrite goes through `atomic_write`,
and every run's `metrics.jsonl` through `MetricsLog`; `refuse_existing_run` keeps a fresh run from
overwriting an earlier one's folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

__all__ = ["RUN_FILES", "MetricsLog", "atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "refuse_existing_run"]

RUN_FILES = ("metrics.jsonl", "config.yaml")  # what every trainer writes into its run folder from step 0


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, not while other threads write files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)`, fsync the file, then rename it onto `path`: a crash at any moment leaves
    either the old file or the complete new one, never a partial one. The file gets the permissions a plain
    `open` would give it (mkstemp's are owner-only, which would hide models and reports from a shared team)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:  # the bytes reach the disk before the rename makes them visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_directory(path: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Call `fill(tmp_dir)` on a temporary sibling folder, fsync its files, then rename it to `path`: a
    crash leaves no partial folder. When another process finished the same folder first, theirs is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's folder is owner-only
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def refuse_existing_run(run_dir: str | Path, resume: bool, has_checkpoint: bool) -> None:
    """A run started without `--resume` must not overwrite another run's folder: one that holds a
    checkpoint, or the log and config of a run killed before its first checkpoint. One-line UserError."""
    if resume:
        return
    run_dir = Path(run_dir)
    held = (["a checkpoint"] if has_checkpoint else []) + [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        raise UserError(f"{run_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                        "or set name=<new>")


class MetricsLog:
    """A run's `metrics.jsonl`: one JSON record per line, each with a `step`.

    A kill can land in the middle of `append`, leaving a torn last line: reading drops it (the step it
    logged is redone after `--resume`); a bad line anywhere else is damage, a UserError."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in order (none when the file does not exist)."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text().split("\n")
        lines.pop()  # "" after a complete last line, else the unterminated tail of a killed `append`: dropped
        records = []
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{self.path}: line {number} is not a JSON record ({err.msg})") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run logs those steps again) and any torn last line."""
        if not self.path.is_file():
            return
        kept = [record for record in self.records() if record["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))
