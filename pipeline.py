"""The stage runner behind `quickstart.py` and `study.py`: each stage is one command (train a tokenizer,
a BPE codec, a prior; evaluate) whose finished artifact is reused on a re-run, an interrupted training
stage continues with `--resume`, and `--scale` multiplies every step count (a reduced chain for CI).

A stage's folder keeps a stamp of what made it: its arguments at this scale, the sections of its config
file it reads, and the stamps of the earlier stages whose folders it names. A stage whose stamp changed
(an edited config or command line, another --scale, a changed upstream stage) is made afresh, never reused
or resumed, so a report never mixes models from different settings. Neither the launcher (interpreter, rank
count) nor the code is part of the stamp: after changing the code, re-run with --force.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from base.config import read_with_bases
from base.distributed import available_ranks
from base.errors import ConfigError
from base.runtime import matmul_gflops  # the same figure every benchmark prints
from flextok.schema import TokenizerRunConfig
from priors.schema import PriorRunConfig

__all__ = ["Stage", "bpe_stage", "evaluate_stage", "prior_stage", "run_stages", "stage_stamps", "tokenizer_stage"]

ROOT = Path(__file__).resolve().parent
STAMP = ".stage_stamp"  # what made the stage's folder (see the module docstring)


@dataclass
class Stage:
    name: str
    launcher: list[str]  # how it runs on this machine (interpreter, torchrun / deepspeed and the rank count)
    args: list[str]  # the script and everything it is told: these make the artifact
    artifact: str  # relative to the output folder: the stage is finished when this exists
    scaled: dict[str, int] = field(default_factory=dict)  # config key -> full-size value that --scale multiplies
    resumable: bool = False  # a training stage: an interrupted run continues with --resume
    sections: tuple[str, ...] | None = None  # the top-level keys of its --config file it reads (None: all)

    def scaled_args(self, scale: float) -> list[str]:
        return [*self.args, *(f"{key}={max(2, round(value * scale))}" for key, value in self.scaled.items())]

    def argv(self, scale: float) -> list[str]:
        return [*self.launcher, *self.scaled_args(scale)]


def section_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def tokenizer_launcher() -> list[str]:
    """One process on a CPU or a single GPU (the quickstart's tokenizers are too small to gain from
    DDP on 2 cores); `torchrun` with one rank per GPU when there are several."""
    gpus = torch.cuda.device_count()
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)]
    return [sys.executable]


def tokenizer_stage(out: Path, name: str, config: str, steps: int, *overrides: str) -> Stage:
    args = ["train_tokenizer.py", "--config", config, f"out_dir={out}", f"name={name}", *overrides]
    return Stage(name, tokenizer_launcher(), args, f"{name}/final/model.safetensors", {"train.steps": steps},
                 resumable=True, sections=section_names(TokenizerRunConfig))


def bpe_stage(out: Path, name: str, tokenizer: str, config: str, mode: str, vocab_size: int, *overrides: str) -> Stage:
    args = ["-m", "priors.bpe_from_tokenizer", "--tokenizer", str(out / tokenizer / "final"), "--config", config,
            "--mode", mode, "--vocab-size", str(vocab_size), "--out", str(out / name), *overrides]
    return Stage(name, [sys.executable], args, f"{name}/config.json", sections=section_names(PriorRunConfig))


def prior_stage(out: Path, name: str, config: str, steps: int, *overrides: str) -> Stage:
    launcher = ["deepspeed", "--num_gpus", str(available_ranks())]
    args = ["train_prior.py", "--config", config, f"out_dir={out}", f"name={name}", *overrides]
    return Stage(name, launcher, args, f"{name}/final/model.safetensors", {"prior_train.steps": steps},
                 resumable=True, sections=section_names(PriorRunConfig))


def evaluate_stage(config: str, classifier_steps: int, gfid_samples: int, *overrides: str) -> Stage:
    return Stage("report", [sys.executable], ["evaluate.py", "--config", config, *overrides], "report/summary.md",
                 {"eval.classifier_steps": classifier_steps, "eval.gfid_samples": gfid_samples})


def _config_of(args: list[str], sections: tuple[str, ...] | None) -> dict:
    """The raw mapping (bases merged) of the `--config` file in `args`, cut to `sections`."""
    if "--config" not in args:
        return {}
    try:
        raw = read_with_bases(ROOT / args[args.index("--config") + 1])
    except ConfigError:  # the stage's own command reports it, with exit code 2
        return {}
    return {key: value for key, value in raw.items() if sections is None or key in sections}


def _reads(arg: str, sections: tuple[str, ...] | None) -> bool:
    """False for a `section.key=value` override of a section the stage does not read (e.g. `eval.*` given
    to every stage of a study): it cannot change the stage's artifact."""
    override = re.match(r"([A-Za-z_]\w*)(?:\.\w+)*=", arg)
    return sections is None or override is None or override.group(1) in sections


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def _names_folder(text: str, folder: Path) -> bool:
    """Whether an argument or config value (`key=path` or a path) points at or into `folder`."""
    path = Path(text.rsplit("=", 1)[-1])
    path = (path if path.is_absolute() else ROOT / path).resolve()
    return path == folder or folder in path.parents


def stage_stamps(stages: list[Stage], out: Path, scale: float) -> dict[str, str]:
    """Each stage's stamp: a digest of its arguments at `scale`, the sections of its config file that it
    reads, and the stamps of the earlier stages whose folders its arguments or config name."""
    stamps: dict[str, str] = {}
    folders: dict[str, Path] = {}
    for stage in stages:
        args = [arg for arg in stage.scaled_args(scale) if _reads(arg, stage.sections)]
        config = _config_of(args, stage.sections)
        texts = _strings([args, config])
        reads = {name: stamps[name] for name, folder in folders.items() if any(_names_folder(t, folder) for t in texts)}
        payload = json.dumps({"scale": scale, "args": args, "config": config, "reads": reads}, sort_keys=True,
                             default=str)
        stamps[stage.name] = hashlib.sha256(payload.encode()).hexdigest()[:20]
        folders[stage.name] = (ROOT / out / stage.name).resolve()
    return stamps


def run_stage(stage: Stage, out: Path, scale: float, force: bool, stamp: str) -> float:
    """Run one stage unless its artifact exists with the same stamp; resume an interrupted training stage
    with the same stamp; otherwise start the stage afresh (only its own folder is removed)."""
    folder, done = out / stage.name, out / stage.artifact
    stamp_file = folder / STAMP
    same = stamp_file.is_file() and stamp_file.read_text() == stamp
    if done.exists() and same and not force:
        print(f"[{out.name}] {stage.name}: done already ({done}); --force retrains")
        return 0.0
    if done.exists() and not same and not force:
        print(f"[{out.name}] {stage.name}: its settings or an earlier stage changed since it was made; retraining")
    argv = stage.argv(scale)
    if stage.resumable and same and not force and (folder / "checkpoints").is_dir():
        argv.append("--resume")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stamp_file.write_text(stamp)
    print(f"[{out.name}] {stage.name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT)
    if proc.returncode != 0 or not done.exists():
        raise SystemExit(
            f"[{out.name}] stage '{stage.name}' failed (exit code {proc.returncode}); earlier stages' artifacts "
            f"are kept in {out}/. Fix the error above and re-run: finished stages are reused."
        )
    seconds = time.perf_counter() - start
    print(f"[{out.name}] {stage.name}: finished in {seconds:.0f}s", flush=True)  # long runs show each as it ends
    return seconds


def run_stages(stages: list[Stage], out: Path, scale: float, force: bool) -> dict[str, float]:
    """Every stage in order; returns the seconds each took (0 for reused ones) and prints them beside the
    machine's matmul GFLOP/s, measured before the first stage and after the last."""
    stamps = stage_stamps(stages, out, scale)
    before, timings, total = matmul_gflops(), {}, time.perf_counter()
    for stage in stages:
        timings[stage.name] = run_stage(stage, out, scale, force, stamps[stage.name])
    elapsed, after = time.perf_counter() - total, matmul_gflops()
    print(f"\n[{out.name}] stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"[{out.name}] total {elapsed:.0f}s; matmul 2048^3 fp32 {before:.0f} GFLOP/s before, {after:.0f} after")
    return timings
