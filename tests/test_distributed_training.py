"""Tokenizer training across 2 CPU ranks (DDP through `torchrun` and the `deepspeed` launcher): data
sharding, gradient accumulation, activation checkpointing, the PatchGAN, and SIGKILL + `--resume`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import launcher_env, require_launcher
from safetensors.torch import load_file

from base.data import StepBatchSampler, micro_batch_size
from base.distributed import free_port
from base.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GAN = [  # a quantized grid autoencoder with the PatchGAN switched on after step 2
    "--config", "configs/grid_vq.yaml", "data.resolution=16", "data.crops_per_photo=8",
    "data.eval_crops_per_photo=2", "data.eval_images=4", "grid.channels=16", "train.batch_size=8",
    "train.grad_accumulation=2", "train.activation_checkpointing=true", "train.log_every=1",
    "train.eval_every=100", "train.warmup_steps=2", "loss.adversarial=0.1", "loss.adversarial_start=2",
]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "train_tokenizer.py", *args]


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_ranks_and_micro_steps_split_each_global_batch():
    one = list(StepBatchSampler(50, 8, seed=3, start_step=0, end_step=4))
    for world, accumulation in ((2, 1), (2, 2), (4, 2)):
        parts = [list(StepBatchSampler(50, 8, 3, 0, 4, rank, world, accumulation)) for rank in range(world)]
        for step in range(4):
            pieces = [parts[r][step * accumulation + m] for m in range(accumulation) for r in range(world)]
            assert sorted(sum(pieces, [])) == sorted(one[step])  # every image once, nothing else
    with pytest.raises(UserError, match="train.batch_size: 8 does not split into 3 rank"):
        micro_batch_size(8, 3, 1)


def test_two_rank_run_killed_with_sigkill_resumes_exactly(tmp_path):
    """A 2-rank PatchGAN run is SIGKILLed (launcher and both ranks) after its first checkpoint; the same
    command with `--resume` finishes it with the losses and weights of an uninterrupted 2-rank run."""
    common = [*GAN, f"out_dir={tmp_path}", "train.steps=10", "train.checkpoint_every=4"]
    straight = subprocess.run(torchrun(*common, "name=straight"), cwd=REPO, env=launcher_env(),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = torchrun(*common, "name=killed")
    process = subprocess.Popen(killed, cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run ended before its first checkpoint"
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before the kill"
    resumed = subprocess.run([*killed, "--resume"], cwd=REPO, env=launcher_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, 11)) and a == b
    wa = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "d_loss" in r] == list(range(3, 11))  # the PatchGAN trained


def test_two_rank_flextok_run_through_the_deepspeed_launcher(tmp_path):
    """The 1D tokenizer (nested dropout, rectified-flow decoder) under DDP, started by `deepspeed`; a
    requeued `--resume` before any checkpoint starts at step 0."""
    require_launcher()
    run = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "train_tokenizer.py",
         "--config", "configs/1d_tiny.yaml", f"out_dir={tmp_path}", "name=flex", "flextok.input=pixels",
         "flextok.patch_size=4", "data.resolution=16", "data.crops_per_photo=8", "data.eval_crops_per_photo=2",
         "data.eval_images=4", "flextok.num_registers=8", "flextok.dim=32", "flextok.decoder_dim=32",
         "flextok.heads=2", "flextok.decoder_heads=2", "train.batch_size=8", "train.steps=3",
         "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=1", "--resume"],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("starting from step 0") == 1  # rank 0's notice only
    assert sorted(losses(tmp_path / "flex")) == [1, 2, 3]
    assert (tmp_path / "flex" / "final" / "model.safetensors").is_file()


def test_a_wait_on_other_ranks_times_out_with_one_line_naming_what_is_missing(tmp_path):
    from base.distributed import WaitTimeout, wait_for

    expected = tmp_path / "000001.npz"

    def missing() -> str | None:
        return None if expected.is_file() else f"token-cache shard(s) {expected.name} in {tmp_path}"

    with pytest.raises(WaitTimeout) as err:
        wait_for(missing, timeout_minutes=0.3 / 60, poll_s=0.05)
    message = str(err.value)
    assert "\n" not in message and f"000001.npz in {tmp_path}" in message
    assert "gave up after" in message and "distributed.wait_timeout" in message
    expected.write_bytes(b"")
    wait_for(missing, timeout_minutes=0.3 / 60, poll_s=0.05)  # present: returns at once


def test_wait_timeout_is_a_config_key_both_trainers_read():
    from base.config import load_config
    from base.distributed import WAIT_TIMEOUT
    from base.errors import ConfigError
    from evaluation.schema import ExperimentConfig

    cfg = load_config(REPO / "configs/prior_tiny.yaml", ["distributed.wait_timeout=0.5"], cls=ExperimentConfig)
    assert cfg.distributed.wait_timeout == 0.5 and WAIT_TIMEOUT >= 60  # hours by default, not minutes
    with pytest.raises(ConfigError, match="wait_timeout"):
        load_config(REPO / "configs/prior_tiny.yaml", ["distributed.wait_timeout=0"], cls=ExperimentConfig)


@pytest.mark.parametrize("ci, outcome", [("true", "fail"), ("", "skip"), ("false", "skip")])
def test_a_missing_launcher_skips_locally_but_fails_under_ci(monkeypatch, ci, outcome):
    import helpers

    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(helpers.shutil, "which", lambda name: None)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="deepspeed launcher is not on PATH"):
        helpers.require_launcher()
    monkeypatch.setattr(helpers.shutil, "which", lambda name: f"/usr/bin/{name}")
    helpers.require_launcher()  # found: runs
