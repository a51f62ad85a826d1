"""train_prior.py on DeepSpeed (CPU, gloo): learning, ZeRO-2/3 save/load/resume, crash safety, export,
the flow prior, clean config errors, and the real `deepspeed --num_gpus 2` launcher.

Everything but the launcher test runs in this process (one DeepSpeed process group, world size 1), so
DeepSpeed's start-up cost is paid once; `init_distributed` skips the shared-memory op compile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DIST_ENV, launcher_env, require_launcher

from base.config import load_config
from base.distributed import ensure_launch_env, free_port
from base.errors import UserError
from base.hub import load_model
from base.schema import SamplingConfig
from base.training import POINTER, read_pointer
from evaluation.schema import ExperimentConfig
from grid.autoencoder import GridAutoencoder
from grid.schema import GridConfig
from priors import DiscretePrior, FlowPrior, PriorConfig, generate_images
from priors.deepspeed_utils import consolidated_weights
from priors.trainer import PriorTrainer

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.resolution=16", "data.crops_per_photo=16", "data.eval_crops_per_photo=4", "data.eval_images=8",
    "prior.dim=64", "prior.heads=2", "prior.depth=2", "prior_train.batch_size=8",
    "prior_train.log_every=1", "prior_train.num_samples=6", "prior_train.warmup_steps=2", "prior_train.threads=1",
]


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    """The env a plain `python train_prior.py` sets for itself, restored afterwards."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    ensure_launch_env()
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("priors")


@pytest.fixture(scope="module")
def vq_tokenizer(workdir) -> Path:
    """A quantized grid autoencoder, freshly trained for a few steps with the tokenizer trainer."""
    from flextok.training import TokenizerTrainer

    cfg = load_config(REPO / "configs/grid_vq.yaml", cls=ExperimentConfig, overrides=[
        f"out_dir={workdir}", "name=vq", "data.resolution=16", "data.crops_per_photo=16", "data.eval_crops_per_photo=4",
        "data.eval_images=8", "grid.channels=16", "grid.quantizer.fsq_levels=[8,5]", "train.steps=3",
        "train.batch_size=8",
        "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=3", "train.threads=1",
    ])
    return TokenizerTrainer(cfg).train()


@pytest.fixture(scope="module")
def kl_tokenizer(workdir) -> Path:
    torch.manual_seed(0)
    return GridAutoencoder(GridConfig(channels=16, bottleneck="kl"), resolution=16).save_pretrained(workdir / "kl")


def config(workdir: Path, tokenizer: Path, name: str, *overrides: str):
    return load_config(REPO / "configs/prior_tiny.yaml", cls=ExperimentConfig, overrides=[
        f"out_dir={workdir}", f"name={name}", f"prior.tokenizer={tokenizer}", f"prior.cache_dir={workdir / 'cache'}",
        *TINY, *overrides,
    ])


def records(run_dir: Path, key: str) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


def test_one_process_deepspeed_run_learns(workdir, vq_tokenizer):
    cfg = config(workdir, vq_tokenizer, "learn", "prior_train.steps=40", "prior_train.lr=0.003",
                 "prior_train.eval_every=20", "prior_train.sample_every=40", "prior_train.checkpoint_every=20")
    final = PriorTrainer(cfg).train()
    losses, bits = records(cfg.run_dir, "loss"), records(cfg.run_dir, "val_bits_per_image")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert len(bits) == 2 and bits[1] < bits[0]
    assert records(cfg.run_dir, "val_bits_per_image_cond") == []  # held-out photographs are unseen classes
    assert all(rate > 0 for rate in records(cfg.run_dir, "tokens_per_s"))
    assert (cfg.run_dir / "samples" / "step_0000040.png").is_file()
    prior = load_model(final)
    assert isinstance(prior, DiscretePrior) and prior.max_length == 16 and prior.config.num_classes == 6
    images = generate_images(prior, load_model(vq_tokenizer), [0, 1, 2],
                             sampling=SamplingConfig(guidance_scale=2.0, top_k=20))
    assert images.shape == (3, 3, 16, 16)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_matches_an_uninterrupted_run(workdir, vq_tokenizer, stage):
    extra = (f"prior_train.zero_stage={stage}", "prior_train.steps=6", "prior_train.grad_accumulation=2",
             "prior_train.checkpoint_every=3", "prior_train.eval_every=6", "prior_train.sample_every=6",
             "prior.dropout=0.1")
    whole = config(workdir, vq_tokenizer, f"whole{stage}", *extra)
    PriorTrainer(whole).train()

    parts = config(workdir, vq_tokenizer, f"parts{stage}", *extra)
    first = PriorTrainer(parts)
    batches = first.batches(0)
    while first.step < 3:
        first.log({"loss": first.train_step(next(batches))["loss"]}, step=first.step + 1)
        first.step += 1
    first.save_checkpoint()
    first.log({"loss": first.train_step(next(batches))["loss"]}, step=4)  # past the checkpoint, then "killed"
    del first
    resumed = PriorTrainer(parts, resume=True)
    assert resumed.step == 3
    resumed.train()

    torch.testing.assert_close(records(parts.run_dir, "loss"), records(whole.run_dir, "loss"), rtol=1e-5, atol=1e-6)
    a, b = load_model(whole.run_dir / "final").state_dict(), load_model(parts.run_dir / "final").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert [p.name for p in (parts.run_dir / "checkpoints").glob("step_*")] == ["step_00000006"]


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_loadable(workdir, vq_tokenizer, monkeypatch):
    cfg = config(workdir, vq_tokenizer, "killed", "prior_train.zero_stage=2", "prior_train.steps=10")
    trainer = PriorTrainer(cfg)
    batches = trainer.batches(0)
    for _ in range(2):
        trainer.train_step(next(batches))
        trainer.step += 1
    trainer.save_checkpoint()
    trainer.train_step(next(batches))
    trainer.step += 1

    def dies_while_writing(save_dir, tag, **kwargs):
        (Path(save_dir) / tag).mkdir()
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
        raise SystemExit("SIGKILL stand-in")

    monkeypatch.setattr(trainer.engine, "save_checkpoint", dies_while_writing)
    with pytest.raises(SystemExit):
        trainer.save_checkpoint()
    checkpoints = cfg.run_dir / "checkpoints"
    assert read_pointer(checkpoints)["tag"] == "step_00000002"
    weights = consolidated_weights(checkpoints, 2, bf16=False, model=trainer.engine.module)
    assert set(weights) == set(trainer.engine.module.state_dict())
    resumed = PriorTrainer(cfg, resume=True)
    assert resumed.step == 2 and not (checkpoints / "step_00000003").exists()


def test_flow_prior_loss_falls_and_samples(workdir, kl_tokenizer):
    cfg = config(workdir, kl_tokenizer, "flow", "prior.kind=flow", "prior_train.steps=40", "prior_train.lr=0.002",
                 "prior_train.eval_every=20", "prior_train.sample_every=40", "prior_train.checkpoint_every=40",
                 "prior.sampling.steps=4")
    final = PriorTrainer(cfg).train()
    losses, val = records(cfg.run_dir, "loss"), records(cfg.run_dir, "val_loss")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert len(val) == 2 and val[1] < val[0]
    prior = load_model(final)
    assert isinstance(prior, FlowPrior) and prior.latent_std.min() > 0 and (prior.latent_std != 1).all()
    images = generate_images(prior, load_model(kl_tokenizer), [0, 5],
                             sampling=SamplingConfig(steps=4, guidance_scale=2.0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_resume_without_a_checkpoint_starts_from_step_0(workdir, vq_tokenizer, capsys):
    """A cluster requeues a preempted job with the same command, `--resume` included, also when it was killed
    before its first checkpoint: that run starts from step 0 and finishes."""
    cfg = config(workdir, vq_tokenizer, "requeued", "prior_train.steps=2", "prior_train.eval_every=2",
                 "prior_train.sample_every=2", "prior_train.checkpoint_every=2")
    trainer = PriorTrainer(cfg, resume=True)
    assert trainer.step == 0 and "starting from step 0" in capsys.readouterr().out
    assert isinstance(load_model(trainer.train()), DiscretePrior)


def test_user_errors_exit_with_code_2(workdir, vq_tokenizer, kl_tokenizer, capsys):
    import train_prior

    base = ["--config", str(REPO / "configs/prior_tiny.yaml"), f"out_dir={workdir}", *TINY,
            f"prior.cache_dir={workdir / 'cache'}"]
    assert train_prior.main([*base, "prior_train.zero_stage=4"]) == 2
    assert "zero_stage" in capsys.readouterr().err
    assert train_prior.main([*base, "name=missing", f"prior.tokenizer={workdir / 'nowhere'}"]) == 2
    assert "not found" in capsys.readouterr().err
    PriorTrainer(config(workdir, vq_tokenizer, "mismatch", "prior_train.steps=1")).train()
    assert train_prior.main([*base, "name=mismatch", f"prior.tokenizer={kl_tokenizer}", "prior.kind=flow"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resuming on another tokenizer's tokens
    assert train_prior.main([*base, "name=mismatch", f"prior.tokenizer={kl_tokenizer}", "prior.kind=flow",
                             "--resume"]) == 2
    err = capsys.readouterr().err.strip()  # one line, before any tokenizing (no progress bars)
    assert "trained on tokens of tokenizer" in err and len(err.splitlines()) == 1


def test_sigkill_at_any_moment_leaves_a_resumable_run(workdir, vq_tokenizer):
    """A real SIGKILL, at a random moment after the first checkpoint, then `--resume` to the end."""
    common = [sys.executable, str(REPO / "train_prior.py"), "--config", str(REPO / "configs/prior_tiny.yaml"),
              f"out_dir={workdir}", "name=sigkill", f"prior.tokenizer={vq_tokenizer}",
              f"prior.cache_dir={workdir / 'cache'}", *TINY, "prior_train.checkpoint_every=1",
              "prior_train.zero_stage=2", "prior_train.eval_every=1000", "prior_train.sample_every=1000"]
    env = launcher_env()
    process = subprocess.Popen([*common, "prior_train.steps=1000"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    pointer = workdir / "sigkill" / "checkpoints" / POINTER
    deadline = time.time() + 120
    while not pointer.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.05 + 0.5 * torch.rand(()).item())  # somewhere inside the train/save cycle
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert pointer.exists(), "the run died before its first checkpoint"
    killed_at = read_pointer(pointer.parent)["step"]
    done = subprocess.run([*common, f"prior_train.steps={killed_at + 2}", "--resume"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert isinstance(load_model(workdir / "sigkill" / "final"), DiscretePrior)
    assert [p.name for p in pointer.parent.glob("step_*")] == [f"step_{killed_at + 2:08d}"]


def test_user_deepspeed_json_merges_over_prior_train(tmp_path):
    from priors.deepspeed_utils import deepspeed_config
    from priors.schema import PriorTrainConfig

    t = PriorTrainConfig(batch_size=16, grad_accumulation=2, zero_stage=1)
    base = deepspeed_config(t, cuda=False, world_size=2)
    assert base["zero_optimization"] == {"stage": 1} and not base["bf16"]["enabled"]
    # prior_train.batch_size is the global batch: 16 = 4 per rank x 2 micro-steps x 2 ranks
    assert (base["train_batch_size"], base["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert deepspeed_config(t, cuda=True, world_size=2)["bf16"]["enabled"]  # auto: bf16 on GPUs
    assert deepspeed_config(PriorTrainConfig(precision="fp16"), cuda=True, world_size=1)["fp16"]["enabled"]

    def with_json(value) -> dict:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(value))
        return deepspeed_config(t, cuda=False, world_size=2, user=str(path))

    merged = with_json({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                        "train_batch_size": 16, "bf16": {"enabled": True}})
    assert merged["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert merged["bf16"]["enabled"] and merged["optimizer"] == base["optimizer"]  # unset keys stay ours
    for value, message in [
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8 disagrees with 4 from "
                                                 "prior_train.batch_size=16, grad_accumulation=2 on 2 rank"),
        ({"train_batch_size": 32}, "train_batch_size=32 disagrees with 16 from prior_train.batch_size=16"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove 'scheduler'"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both enabled"),
        ([1, 2], "a JSON object"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            with_json(value)
    with pytest.raises(UserError, match="not found"):
        deepspeed_config(t, cuda=False, world_size=1, user=str(tmp_path / "missing.json"))


def test_zero3_builds_the_prior_partitioned_with_the_plain_initialization(vq_tokenizer):
    """Under ZeRO-3 the model is built inside `zero.Init` (parameters are partitioned as they are
    created); the initializations modules make to their children afterwards are replayed, so every
    constant-initialized tensor matches a plain build exactly and random ones match in scale."""
    import deepspeed

    from priors.deepspeed_utils import build_model, deepspeed_config, init_distributed
    from priors.schema import PriorConfig, PriorTrainConfig

    init_distributed()
    config3 = deepspeed_config(PriorTrainConfig(zero_stage=3), cuda=False, world_size=1)
    prior = PriorConfig(dim=64, heads=2, depth=2, num_classes=3)
    for build in (lambda: DiscretePrior(prior, vocab_size=500, max_length=16),
                  lambda: FlowPrior(prior, num_tokens=16, token_dim=4)):
        torch.manual_seed(0)
        plain = build().state_dict()
        model = build_model(build, config3)
        # partitioned from the start: outside a gather, no parameter holds its full data
        assert all(hasattr(param, "ds_id") and param.data.numel() == 0 for param in model.parameters())
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            built = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for key, value in plain.items():
            if value.numel() > 1 and value.unique().numel() == 1:  # zeros, ones, constants
                assert torch.equal(built[key], value), key
            elif value.is_floating_point() and value.numel() > 64:
                ratio = built[key].std() / value.std()
                assert 0.8 < ratio < 1.25, (key, ratio.item())


@pytest.mark.launcher
def test_two_rank_zero3_offload_prior_survives_repeated_kills(workdir, vq_tokenizer, tmp_path):
    """A requeued 2-rank job: the same `deepspeed ... --resume` command (ZeRO-3, optimizer offload to
    CPU from the user's DeepSpeed JSON) is SIGKILLed again and again at seeded random moments (during
    start-up and token caching, before the first checkpoint, and while training), then finishes."""
    require_launcher()
    ds_json = tmp_path / "offload.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    env = launcher_env()

    def command() -> list[str]:
        return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "train_prior.py",
                "--config", "configs/prior_tiny.yaml", f"out_dir={workdir}", "name=requeued_zero3",
                f"prior.tokenizer={vq_tokenizer}", f"prior.cache_dir={workdir / 'requeued_zero3_cache'}", *TINY,
                "prior.cache_shard_size=16", "prior_train.steps=16", "prior_train.eval_every=8",
                "prior_train.sample_every=16", "prior_train.checkpoint_every=2", "--deepspeed_config",
                str(ds_json), "--resume"]

    rng = torch.Generator().manual_seed(7)
    pointer = workdir / "requeued_zero3" / "checkpoints" / POINTER

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=rng).item()

    # start-up, token caching, before the first checkpoint; then twice somewhere in the train/save cycle
    for kill_after_checkpoint, delay in ((False, uniform(1, 5)), (False, uniform(5, 10)), (True, uniform(0, 0.3)),
                                         (True, uniform(0, 0.3))):
        had = read_pointer(pointer.parent)["step"] if pointer.exists() else 0
        process = subprocess.Popen(command(), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while kill_after_checkpoint and process.poll() is None and time.time() < deadline and (
                not pointer.exists() or read_pointer(pointer.parent)["step"] == had):
            time.sleep(0.05)
        time.sleep(delay)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert pointer.exists() and read_pointer(pointer.parent)["step"] < 16, "no kill landed while training"
    run = subprocess.run(command(), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = workdir / "requeued_zero3"
    tag = run_dir / "checkpoints" / read_pointer(run_dir / "checkpoints")["tag"]
    assert tag.name == "step_00000016"
    assert len(list(tag.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # two ranks' optimizer shards
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 17))  # every step logged exactly once across all the restarts
    assert len(records(run_dir, "val_bits_per_image")) == 2
    assert isinstance(load_model(run_dir / "final"), DiscretePrior)


def test_flow_normalization_samples_rows_at_random_from_a_class_sorted_cache():
    """A cache sorted by class (class k's latents sit around k): the first rows would see class 0 only;
    a seeded random sample of whole sequences sees them all."""
    from priors.flow import normalization_sample

    classes, per_class, positions, channels = 8, 200, 4, 3
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    tokens = (labels.repeat(positions)[:, None] + rng.normal(0, 0.1, (len(labels) * positions, channels)))
    tokens = tokens.astype(np.float32)
    offsets = np.arange(len(labels) + 1) * positions
    sample = normalization_sample(tokens, offsets, rows=400, seed=3)
    assert sample.shape == (400, channels) and sample.dtype == torch.float32
    assert abs(float(sample.mean()) - 3.5) < 0.5 and abs(float(sample.std()) - float(tokens.std())) < 0.5
    assert abs(float(torch.from_numpy(tokens[:400]).mean()) - 3.5) > 3  # what the first rows gave
    assert torch.equal(sample, normalization_sample(tokens, offsets, rows=400, seed=3))  # seeded
    assert not torch.equal(sample, normalization_sample(tokens, offsets, rows=400, seed=4))
    assert len(normalization_sample(tokens, offsets, rows=10**9)) == len(tokens)  # small caches: every row
    prior = FlowPrior(PriorConfig(kind="flow", dim=32, heads=2, depth=1), num_tokens=positions, token_dim=channels)
    prior.set_normalization(sample)
    assert torch.allclose(prior.latent_mean, torch.full((channels,), 3.5), atol=0.5)


class _NotATensor:
    """Stands in for any pickled object: a weights-only load must refuse it."""


def test_a_checkpoint_is_unpickled_weights_only(tmp_path):
    tag = tmp_path / "step_00000001"
    tag.mkdir()
    (tmp_path / POINTER).write_text(json.dumps({"tag": tag.name, "step": 1}))
    torch.save({"module": {"w": torch.ones(2, dtype=torch.bfloat16)}, "ds_version": "0.16"},
               tag / "mp_rank_00_model_states.pt")
    weights = consolidated_weights(tmp_path, 0, bf16=False, model=torch.nn.Linear(1, 1))
    assert weights["w"].dtype == torch.float32 and torch.equal(weights["w"], torch.ones(2))
    torch.save({"module": {}, "payload": _NotATensor()}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match=r"refused, it holds more than tensors .*_NotATensor") as err:
        consolidated_weights(tmp_path, 0, bf16=False, model=torch.nn.Linear(1, 1))
    assert "\n" not in str(err.value)
