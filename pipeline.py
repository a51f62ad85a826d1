"""The stage runner behind `quickstart.py` and `study.py`: each stage is one command (train a tokenizer,
a BPE codec, a prior; evaluate) whose finished artifact is reused on a re-run, an interrupted training
stage continues with `--resume`, and `--scale` multiplies every step count (a reduced chain for CI).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.machine import matmul_gflops  # the same figure every benchmark prints
from flextok.distributed import available_ranks

__all__ = ["Stage", "bpe_stage", "evaluate_stage", "prior_stage", "run_stages", "tokenizer_stage"]

ROOT = Path(__file__).resolve().parent
SCALE_STAMP = ".quickstart_scale"  # the --scale a stage folder was made with: other scales never reuse it


@dataclass
class Stage:
    name: str
    command: list[str]
    artifact: str  # relative to the output folder: the stage is finished when this exists
    scaled: dict[str, int] = field(default_factory=dict)  # config key -> full-size value that --scale multiplies
    resumable: bool = False  # a training stage: an interrupted run continues with --resume

    def argv(self, scale: float) -> list[str]:
        return [*self.command, *(f"{key}={max(2, round(value * scale))}" for key, value in self.scaled.items())]


def tokenizer_launcher() -> list[str]:
    """One process on a CPU or a single GPU (the quickstart's tokenizers are too small to gain from
    DDP on 2 cores); `torchrun` with one rank per GPU when there are several."""
    gpus = torch.cuda.device_count()
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "train_tokenizer.py"]
    return [sys.executable, "train_tokenizer.py"]


def tokenizer_stage(out: Path, name: str, config: str, steps: int, *overrides: str) -> Stage:
    command = [*tokenizer_launcher(), "--config", config, f"out_dir={out}", f"name={name}"]
    return Stage(name, [*command, *overrides], f"{name}/final/model.safetensors", {"train.steps": steps},
                 resumable=True)


def bpe_stage(out: Path, name: str, tokenizer: str, config: str, mode: str, vocab_size: int, *overrides: str) -> Stage:
    return Stage(
        name,
        [sys.executable, "-m", "priors.bpe_from_tokenizer", "--tokenizer", str(out / tokenizer / "final"),
         "--config", config, "--mode", mode, "--vocab-size", str(vocab_size), "--out", str(out / name), *overrides],
        f"{name}/config.json",
    )


def prior_stage(out: Path, name: str, config: str, steps: int, *overrides: str) -> Stage:
    launcher = ["deepspeed", "--num_gpus", str(available_ranks()), "train_prior.py", "--config", config]
    return Stage(name, [*launcher, f"out_dir={out}", f"name={name}", *overrides], f"{name}/final/model.safetensors",
                 {"prior_train.steps": steps}, resumable=True)


def evaluate_stage(config: str, classifier_steps: int, gfid_samples: int, *overrides: str) -> Stage:
    return Stage("report", [sys.executable, "evaluate.py", "--config", config, *overrides], "report/summary.md",
                 {"eval.classifier_steps": classifier_steps, "eval.gfid_samples": gfid_samples})


def run_stage(stage: Stage, out: Path, scale: float, force: bool) -> float:
    """Run one stage unless its artifact exists from a run at the same --scale; resume an interrupted
    training stage; otherwise start the stage afresh (only its own folder is removed)."""
    folder, done = out / stage.name, out / stage.artifact
    stamp = folder / SCALE_STAMP
    same_scale = stamp.is_file() and stamp.read_text() == str(scale)
    if done.exists() and same_scale and not force:
        print(f"[{out.name}] {stage.name}: done already ({done}); --force retrains")
        return 0.0
    argv = stage.argv(scale)
    if stage.resumable and same_scale and not force and (folder / "checkpoints").is_dir():
        argv.append("--resume")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stamp.write_text(str(scale))
    print(f"[{out.name}] {stage.name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT)
    if proc.returncode != 0 or not done.exists():
        raise SystemExit(
            f"[{out.name}] stage '{stage.name}' failed (exit code {proc.returncode}); earlier stages' artifacts "
            f"are kept in {out}/. Fix the error above and re-run: finished stages are reused."
        )
    return time.perf_counter() - start


def run_stages(stages: list[Stage], out: Path, scale: float, force: bool) -> dict[str, float]:
    """Every stage in order; returns the seconds each took (0 for reused ones) and prints them beside the
    machine's matmul GFLOP/s, measured before the first stage and after the last."""
    before, timings, total = matmul_gflops(), {}, time.perf_counter()
    for stage in stages:
        timings[stage.name] = run_stage(stage, out, scale, force)
    elapsed, after = time.perf_counter() - total, matmul_gflops()
    print(f"\n[{out.name}] stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"[{out.name}] total {elapsed:.0f}s; matmul 2048^3 fp32 {before:.0f} GFLOP/s before, {after:.0f} after")
    return timings
