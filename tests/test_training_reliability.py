"""Reliability of the tokenizer and prior training loops: bounded evaluation memory, run folders that a
fresh run refuses to overwrite, torn metric logs, `weights_only` checkpoints, a target scale that does not
depend on the rank count, and DDP told about the PatchGAN's parameters only while they are idle."""

import json
import os
import stat

import pytest
import torch
import torch.multiprocessing as mp

from base.config import load_config
from base.distributed import free_port
from base.errors import UserError
from base.files import (
    MetricsLog,
    atomic_directory,
    atomic_write_text,
    refuse_existing_run,
)
from base.training import TorchBackend, read_pointer
from flextok.schema import TokenizerRunConfig
from flextok.training import TokenizerTrainer

GRID = ["data.resolution=16", "data.crops_per_photo=4", "data.eval_crops_per_photo=12", "grid.channels=16",
        "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1", "train.threads=1"]
FLEX = ["flextok.input=pixels", "flextok.patch_size=4", "data.resolution=16", "data.crops_per_photo=8",
        "data.eval_crops_per_photo=12", "flextok.num_registers=8", "flextok.dim=32", "flextok.decoder_dim=32",
        "flextok.heads=2", "flextok.decoder_heads=2", "train.batch_size=8", "train.log_every=1", "train.threads=1"]
CONFIGS = {"grid": ("configs/grid_vq.yaml", GRID), "flextok": ("configs/1d_tiny.yaml", FLEX)}


def config(tmp_path, kind, name, *extra):
    path, base = CONFIGS[kind]
    return load_config(path, [*base, f"out_dir={tmp_path}", f"name={name}", *extra], cls=TokenizerRunConfig)


class LargestBatch:
    """The largest batch any of `modules` receives (a forward pre-hook on each)."""

    def __init__(self, *modules: torch.nn.Module):
        self.largest = 0
        for module in modules:
            module.register_forward_pre_hook(self._see)

    def _see(self, _module, inputs) -> None:
        self.largest = max(self.largest, len(inputs[0]))


@pytest.mark.parametrize("kind", ["grid", "flextok"])
def test_evaluation_runs_in_chunks_with_the_metrics_of_one_batch(tmp_path, kind):
    """24 held-out images, 4 at a time: no forward pass sees more than a chunk (times the prefixes and the
    guidance pair a 1D decoder runs per image), and the metrics equal those of one batch of 24."""
    trainer = TokenizerTrainer(config(tmp_path, kind, "eval", "data.eval_images=24", "train.steps=1",
                                      "train.eval_batch_size=4"))
    trainer.train()  # one step: a fitted target scale, and an evaluation in chunks of 4
    ema = trainer.ema
    if kind == "grid":
        encoder, per_image = LargestBatch(ema.encoder), LargestBatch(ema.decoder)
        rows = 1
    else:
        encoder, per_image = LargestBatch(ema.encoder), LargestBatch(ema.decoder.trunk)
        rows = len(ema.eval_reconstructions(trainer.eval_batch.images[:1])) * 2  # prefixes x (cond, null)
    chunked = trainer.evaluate(ema)
    assert len(trainer.eval_batch.images) == 24
    assert encoder.largest == 4 and 4 <= per_image.largest <= 4 * rows
    trainer.cfg.train.eval_batch_size = 24
    whole = trainer.evaluate(ema)
    assert encoder.largest == 24 and per_image.largest >= 24
    assert chunked.keys() == whole.keys() and len(chunked) >= 2
    for name, value in whole.items():  # equal on CPU; batched kernels elsewhere may sum in another order
        assert chunked[name] == pytest.approx(value, rel=1e-6), name
    logged = MetricsLog(tmp_path / "eval" / "metrics.jsonl").records()[-1]  # the training run's evaluation
    assert {name: logged[name] for name in chunked} == chunked


def test_plan_counts_evaluation_memory_by_the_chunk_not_the_held_out_set():
    from base.plan import Hardware
    from evaluation.schema import ExperimentConfig
    from flextok.plan import tokenizer_plan

    def evaluation(*overrides):
        cfg = load_config("configs/1d_256.yaml", list(overrides), cls=ExperimentConfig)
        line = next(l for l in tokenizer_plan(cfg, Hardware(gpus=8)).splitlines() if "evaluation on rank 0" in l)
        return line.split()[-2]  # the GiB figure

    assert evaluation() == evaluation("data.eval_images=50000")
    assert float(evaluation("train.eval_batch_size=64")) > 1.9 * float(evaluation())


def test_metrics_log_drops_a_torn_last_line_and_rejects_damage(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1.0 / step})
    with log.path.open("a") as handle:
        handle.write('{"step": 4, "lo')  # a kill in the middle of append
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.truncate_after(2)
    assert log.path.read_text() == "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2))
    log.append({"step": 3, "loss": 0.5})
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # not a torn tail: damage
    with pytest.raises(UserError, match="metrics.jsonl: line 2 is not a JSON record"):
        log.records()


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path):
    """A run killed before its first checkpoint leaves its config and log: without --resume, neither trainer
    overwrites them; with --resume, the tokenizer trainer starts from step 0 and drops the stale log."""
    cfg = config(tmp_path, "grid", "early", "train.steps=2", "data.eval_images=4")
    TokenizerTrainer(cfg).log({"loss": 1.0}, step=1)
    run = tmp_path / "early"
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    with pytest.raises(UserError, match=r"holds a run \(metrics.jsonl, config.yaml\): pass --resume"):
        TokenizerTrainer(cfg)
    assert TokenizerTrainer(cfg, resume=True).step == 0 and MetricsLog(run / "metrics.jsonl").records() == []
    refuse_existing_run(tmp_path / "nothing_here", resume=False, has_checkpoint=False)
    with pytest.raises(UserError, match=r"\(a checkpoint\)"):
        refuse_existing_run(tmp_path / "nothing_here", resume=False, has_checkpoint=True)

    from evaluation.schema import ExperimentConfig
    from priors.trainer import PriorTrainer

    (run / "config.yaml").unlink()  # the log alone is enough; the tokenizer path is never read before the check
    prior = load_config("configs/prior_tiny.yaml", [f"out_dir={tmp_path}", "name=early",
                                                    f"prior.tokenizer={tmp_path / 'no_tokenizer'}"],
                        cls=ExperimentConfig)
    with pytest.raises(UserError, match=r"holds a run \(metrics.jsonl\): pass --resume"):
        PriorTrainer(prior)


def test_checkpoint_loads_with_weights_only_and_restores_every_random_stream(tmp_path):
    import random

    import numpy as np

    trainer = TokenizerTrainer(config(tmp_path, "grid", "rng", "train.steps=1", "data.eval_images=4"))
    random.random(), np.random.normal(), torch.rand(3)  # noqa: B018 (advance each stream, numpy's Gaussian cached)
    trainer.save_checkpoint()
    expected = random.random(), np.random.normal(), torch.rand(3)
    checkpoints = trainer.checkpoint_dir
    state = torch.load(checkpoints / read_pointer(checkpoints)["tag"] / TorchBackend.STATE, weights_only=True)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    TokenizerTrainer(config(tmp_path, "grid", "rng", "train.steps=1", "data.eval_images=4"), resume=True)
    again = random.random(), np.random.normal(), torch.rand(3)
    assert state["step"] == 0 and again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def _rank_main(rank: int, port: int, out: str, argv: list[str]) -> None:
    """One rank of a 2-rank gloo run of `argv`'s trainer; saves what the tests compare."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = TokenizerTrainer(load_config(argv[0], argv[1:], cls=TokenizerRunConfig))
    wrappers, last, backend = [], [None], trainer.backend
    replicate = backend.replicate

    def spy(step):
        wrapper = replicate(step)
        wrappers.append((step, len(backend.idle), wrapper.find_unused_parameters, wrapper is not last[0]))
        last[0] = wrapper
        return wrapper

    backend.replicate = spy
    trainer.train()
    torch.save({"state": trainer.objective.state_dict(), "wrappers": wrappers}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def two_ranks(tmp_path, kind, name, *overrides) -> list[dict]:
    path, base = CONFIGS[kind]
    argv = [path, *base, f"out_dir={tmp_path}", f"name={name}", *overrides]
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path), argv), nprocs=2)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_target_scale_does_not_depend_on_the_rank_count(tmp_path):
    """FlexTok's target scale comes from the whole first global batch: 2 ranks of 4 images each, 1 rank
    of 8, and 1 rank of 2 micro-batches of 4 all measure the same 8 images."""
    step = ["train.steps=1", "train.eval_every=10", "data.eval_images=4"]
    ranks = two_ranks(tmp_path, "flextok", "two", *step)
    scale = ranks[0]["state"]["model.target_scale"]
    assert scale > 0 and torch.equal(ranks[1]["state"]["model.target_scale"], scale)
    for name, extra in (("one", []), ("accumulated", ["train.grad_accumulation=2"])):
        single = TokenizerTrainer(config(tmp_path, "flextok", name, *step, *extra))
        single.train()
        # float64 sums in another order: equal after rounding to float32 here, 1e-6 allows a last-bit flip
        assert single.model.target_scale.item() == pytest.approx(scale.item(), rel=1e-6), name


def test_ddp_ignores_the_patchgan_only_while_it_is_idle(tmp_path):
    """2 ranks, PatchGAN from step 2: steps 0-1 run a wrapper that leaves the discriminator out, step 2 on
    a rebuilt one with it; neither searches for unused parameters, and both ranks end with the same
    (trained) discriminator."""
    ranks = two_ranks(tmp_path, "grid", "gan", "train.steps=3", "train.eval_every=10", "data.eval_images=4",
                      "train.batch_size=8", "data.crops_per_photo=8", "loss.adversarial=0.1",
                      "loss.adversarial_start=2")
    for report in ranks:
        (s0, idle0, unused0, new0), (s1, idle1, _, new1), (s2, idle2, unused2, new2) = report["wrappers"]
        assert (s0, s1, s2) == (0, 1, 2) and idle0 == idle1 > 0 and idle2 == 0
        assert (new0, new1, new2) == (True, False, True) and not unused0 and not unused2
    a, b = (r["state"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = config(tmp_path, "grid", "fresh", "loss.adversarial=0.1")
    torch.manual_seed(fresh.seed)
    untrained = TokenizerTrainer(fresh).objective.state_dict()
    disc = [k for k in a if k.startswith("discriminator.")]
    assert disc and any(not torch.equal(a[k], untrained[k]) for k in disc)


def test_prior_sample_grids_go_through_the_tokenizer_in_chunks(tmp_path, monkeypatch):
    """6 samples, 4 at a time: the tokenizer never decodes more than 4 images at once."""
    from helpers import DIST_ENV

    from base.distributed import ensure_launch_env
    from evaluation.schema import ExperimentConfig
    from priors.trainer import PriorTrainer

    tokenizer = TokenizerTrainer(config(tmp_path, "grid", "vq", "train.steps=1", "data.eval_images=4",
                                        "grid.quantizer.fsq_levels=[8,5]")).train()
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    ensure_launch_env()  # what a plain `python train_prior.py` sets for itself
    for key in DIST_ENV:  # restored afterwards by monkeypatch
        monkeypatch.setenv(key, os.environ[key])
    cfg = load_config("configs/prior_tiny.yaml", [
        f"out_dir={tmp_path}", "name=prior", f"prior.tokenizer={tokenizer}", f"prior.cache_dir={tmp_path / 'cache'}",
        "data.resolution=16", "data.crops_per_photo=4", "data.eval_crops_per_photo=2", "data.eval_images=4",
        "prior.dim=32", "prior.depth=1", "prior.heads=2", "prior_train.batch_size=4", "prior_train.steps=1",
        "prior_train.num_samples=6", "prior_train.eval_batch_size=4", "prior_train.threads=1"], cls=ExperimentConfig)
    trainer = PriorTrainer(cfg)
    decoded = LargestBatch(trainer.tokenizer.decoder)
    trainer.train()
    assert decoded.largest == 4 and (tmp_path / "prior" / "samples" / "step_0000001.png").is_file()


def test_atomic_files_and_folders_get_the_permissions_of_a_plain_write(tmp_path, monkeypatch):
    """mkstemp/mkdtemp make owner-only temporaries; what they become must be readable as `open` would make it
    (base.files reads the umask once, at import: the test sets both)."""
    monkeypatch.setattr("base.files._UMASK", 0o022)
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
        folder = atomic_directory(tmp_path / "folder", lambda d: (d / "f.txt").write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
