"""The whole pipeline on the embedded photographs, CPU-sized, one command:

    python quickstart.py [--force] [--scale 1.0]

Stages (each reuses its finished artifact on a re-run; --force retrains everything):
grid KL autoencoder -> 1D tokenizer on its latents -> grid FSQ baseline -> BPE codecs on both code streams
-> priors with the DeepSpeed launcher (2 CPU ranks): 1D tokens, BPE'd 1D tokens, grid codes, and a flow
prior on KL latents -> evaluate.py. Everything lands in runs/quickstart/<stage>/, the report in
runs/quickstart/report/. `--scale` multiplies every stage's step count (CI runs a reduced chain).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = Path("runs/quickstart")
SCALE_STAMP = ".quickstart_scale"  # the --scale a stage folder was made with: other scales never reuse it


@dataclass
class Stage:
    name: str
    command: list[str]
    artifact: str  # relative to OUT: the stage is finished when this exists
    scaled: dict[str, int] = field(default_factory=dict)  # config key -> full-size value that --scale multiplies
    resumable: bool = False  # a training stage: an interrupted run continues with --resume

    def argv(self, scale: float) -> list[str]:
        return [*self.command, *(f"{key}={max(2, round(value * scale))}" for key, value in self.scaled.items())]


def tokenizer_stage(name: str, config: str, steps: int) -> Stage:
    return Stage(name, [sys.executable, "train_tokenizer.py", "--config", config], f"{name}/final/model.safetensors",
                 {"train.steps": steps}, resumable=True)


def bpe_stage(name: str, tokenizer: str, mode: str, vocab_size: int) -> Stage:
    return Stage(
        name,
        [sys.executable, "-m", "priors.bpe_from_tokenizer", "--tokenizer", str(OUT / tokenizer / "final"),
         "--config", "configs/grid_kl.yaml", "--mode", mode, "--vocab-size", str(vocab_size), "--out",
         str(OUT / name)],
        f"{name}/bpe_config.json",
    )


def prior_stage(name: str, steps: int, *overrides: str) -> Stage:
    launcher = ["deepspeed", "--num_gpus", "2", "train_prior.py", "--config", "configs/prior_tiny.yaml"]
    return Stage(name, [*launcher, f"name={name}", *overrides], f"{name}/final/model.safetensors",
                 {"prior_train.steps": steps}, resumable=True)


def report_stage(config: str) -> Stage:
    from evaluation.schema import ExperimentConfig
    from flextok.config import load_config

    ev = load_config(config, cls=ExperimentConfig).eval
    return Stage("report", [sys.executable, "evaluate.py", "--config", config], "report/summary.md",
                 {"eval.classifier_steps": ev.classifier_steps, "eval.gfid_samples": ev.gfid_samples})


def stages() -> list[Stage]:
    tok = lambda name: f"prior.tokenizer={OUT / name / 'final'}"  # noqa: E731
    return [
        tokenizer_stage("grid_kl", "configs/grid_kl.yaml", 400),
        tokenizer_stage("1d_tiny", "configs/1d_tiny.yaml", 1250),
        tokenizer_stage("grid_vq", "configs/grid_vq.yaml", 400),
        bpe_stage("bpe_1d", "1d_tiny", "1d", 1400),
        bpe_stage("bpe_grid", "grid_vq", "2d", 1400),
        prior_stage("prior_1d", 200, tok("1d_tiny")),
        prior_stage("prior_1d_bpe", 200, tok("1d_tiny"), "prior.tokens=bpe", f"prior.bpe={OUT / 'bpe_1d'}"),
        prior_stage("prior_grid_vq", 200, tok("grid_vq")),
        prior_stage("prior_kl", 200, tok("grid_kl"), "prior.kind=flow"),
        report_stage("configs/eval_tiny.yaml"),
    ]


def run_stage(stage: Stage, scale: float, force: bool) -> float:
    """Run one stage unless its artifact exists from a run at the same --scale; resume an interrupted
    training stage; otherwise start the stage afresh (only its own folder is removed)."""
    folder, done = OUT / stage.name, OUT / stage.artifact
    stamp = folder / SCALE_STAMP
    same_scale = stamp.is_file() and stamp.read_text() == str(scale)
    if done.exists() and same_scale and not force:
        print(f"[quickstart] {stage.name}: done already ({done}); --force retrains")
        return 0.0
    argv = stage.argv(scale)
    if stage.resumable and same_scale and not force and (folder / "checkpoints").is_dir():
        argv.append("--resume")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stamp.write_text(str(scale))
    print(f"[quickstart] {stage.name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT)
    if proc.returncode != 0 or not done.exists():
        raise SystemExit(
            f"[quickstart] stage '{stage.name}' failed (exit code {proc.returncode}); earlier stages' artifacts "
            f"are kept in {OUT}/. Fix the error above and re-run: finished stages are reused."
        )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain every stage")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's training steps")
    args = parser.parse_args()
    os.chdir(ROOT)
    timings = {}
    total = time.perf_counter()
    for stage in stages():
        timings[stage.name] = run_stage(stage, args.scale, args.force)
    print("\n[quickstart] stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"[quickstart] total {time.perf_counter() - total:.0f}s")
    report = OUT / "report"
    print(f"[quickstart] summary: {report / 'summary.md'}")
    for png in sorted(report.glob("*.png")):
        print(f"[quickstart] plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
