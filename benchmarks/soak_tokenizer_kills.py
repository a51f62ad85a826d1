"""Fault soak of the tokenizer trainer: a 2-rank DDP run (`torchrun`, gloo on CPUs) of a tiny quantized
grid autoencoder with its PatchGAN is SIGKILLed (launcher and both ranks) `--kills` times at seeded random
moments, each time restarted with the same command plus `--resume`, then run to the end. Its logged
losses and final weights must equal those of an uninterrupted 2-rank run of the same config.

    python benchmarks/soak_tokenizer_kills.py --kills 20 [--seed 0] [--steps N] [--keep DIR]

Each round picks a moment at random: a random delay after launch (mostly start-up: imports, process
group, data), or a random fraction of a second after the log reaches a random step ahead of the last one
(mid-step, mid-evaluation, mid-log line or mid-checkpoint write: the run evaluates every 5 steps and
checkpoints every 2). A round whose run ends before its kill lands is counted as such. Exit status 0
when the runs are identical, else 1.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from base.distributed import free_port
from base.files import MetricsLog

TINY_GAN = [  # the 2-rank PatchGAN config of tests/test_distributed_training.py, evaluating every 5 steps
    "--config", "configs/grid_vq.yaml", "data.resolution=16", "data.crops_per_photo=8",
    "data.eval_crops_per_photo=2", "data.eval_images=4", "grid.channels=16", "train.batch_size=8",
    "train.grad_accumulation=2", "train.activation_checkpointing=true", "train.log_every=1",
    "train.eval_every=5", "train.checkpoint_every=2", "train.warmup_steps=2", "loss.adversarial=0.1",
    "loss.adversarial_start=3",
]
TIMEOUT_S = 600


def command(out: Path, name: str, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "train_tokenizer.py", *TINY_GAN, f"out_dir={out}", f"name={name}",
            f"train.steps={steps}", *(["--resume"] if resume else [])]


def environment() -> dict[str, str]:
    """This environment without process-group variables (the ranks get theirs from torchrun)."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def logged_step(run: Path) -> int:
    """The last training step in the run's log (torn last lines are dropped by `MetricsLog`)."""
    return max((r["step"] for r in MetricsLog(run / "metrics.jsonl").records() if "loss" in r), default=0)


def losses(run: Path) -> dict[int, float]:
    records = MetricsLog(run / "metrics.jsonl").records()
    steps = [r["step"] for r in records if "loss" in r]
    if len(steps) != len(set(steps)):
        raise SystemExit(f"{run}: a step is logged twice: {steps}")
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def finish(argv: list[str], what: str) -> float:
    started = time.perf_counter()
    run = subprocess.run(argv, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    if run.returncode != 0:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return time.perf_counter() - started


def kill_round(argv: list[str], run: Path, rng: random.Random, startup_s: float, steps: int) -> str:
    """Start `argv`, SIGKILL its process group at a random moment; what happened, in words."""
    before = logged_step(run)
    process = subprocess.Popen(argv, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + TIMEOUT_S
    if rng.random() < 0.25:
        moment = f"{rng.uniform(0, startup_s):.1f} s after launch"
        time.sleep(float(moment.split()[0]))
    else:  # the log passes a random step ahead (redone steps appear again after the truncation)
        target = min(before + rng.randint(1, 3), steps)
        while process.poll() is None and time.time() < deadline and logged_step(run) < target:
            time.sleep(0.02)
        delay = rng.uniform(0, 0.5)
        time.sleep(delay)
        moment = f"{delay:.2f} s after step {target} was logged"
    if process.poll() is not None:
        return f"the run ended before the kill ({moment}; exit {process.returncode})"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return f"killed {moment}; log at step {logged_step(run)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to attempt (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2 x kills + 10)")
    parser.add_argument("--keep", type=Path, default=None, help="run folders here instead of a temporary one")
    args = parser.parse_args(argv)
    steps = args.steps or 2 * args.kills + 10
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        seconds = finish(command(out, "straight", steps, resume=False), "the uninterrupted run")
        startup_s = min(seconds, 15.0)
        print(f"uninterrupted 2-rank run: {steps} steps in {seconds:.0f} s", flush=True)
        soaked, landed = out / "soaked", 0
        for round_ in range(1, args.kills + 1):
            outcome = kill_round(command(out, "soaked", steps, resume=True), soaked, rng, startup_s, steps)
            landed += outcome.startswith("killed")
            print(f"round {round_}: {outcome}", flush=True)
        finish(command(out, "soaked", steps, resume=True), "the final --resume")
        a, b = losses(out / "straight"), losses(soaked)
        wa = load_file(str(out / "straight" / "final" / "model.safetensors"))
        wb = load_file(str(soaked / "final" / "model.safetensors"))
        same_losses = sorted(b) == list(range(1, steps + 1)) and a == b
        same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"{landed} of {args.kills} kills landed on a live run; every step logged once with the uninterrupted "
          f"run's loss: {same_losses}; final weights bit-identical: {same_weights}")
    return 0 if same_losses and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
