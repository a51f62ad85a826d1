"""The training skeleton both trainers share (`base.training`): one checkpoint pointer and one resume guard,
one per-micro-step seed, and one meaning of `batch_size` (the global batch of an optimizer step)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import DIST_ENV

from base.config import load_config
from base.data import EpochOrder
from base.distributed import ensure_launch_env
from base.errors import UserError
from base.training import POINTER, TRAINING_RECORD, read_pointer, step_seed
from evaluation.schema import ExperimentConfig
from flextok.schema import TokenizerRunConfig
from flextok.training import TokenizerTrainer
from priors.schema import PriorRunConfig, PriorTrainConfig

TOKENIZER = ["data.resolution=16", "data.crops_per_photo=4", "data.eval_crops_per_photo=2", "data.eval_images=4",
             "grid.channels=16", "grid.quantizer.fsq_levels=[8,5]", "train.batch_size=4", "train.steps=2",
             "train.eval_every=2", "train.checkpoint_every=1", "train.log_every=1", "train.threads=1"]
PRIOR = ["data.resolution=16", "data.crops_per_photo=4", "data.eval_crops_per_photo=2", "data.eval_images=4",
         "prior.dim=32", "prior.depth=1", "prior.heads=2", "prior_train.batch_size=8", "prior_train.steps=2",
         "prior_train.eval_every=2", "prior_train.sample_every=2", "prior_train.num_samples=2",
         "prior_train.checkpoint_every=1", "prior_train.log_every=1", "prior_train.threads=1"]


@pytest.fixture
def one_process_group(monkeypatch):
    """The environment a plain `python train_prior.py` sets for itself, restored afterwards."""
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    ensure_launch_env()
    for key in DIST_ENV:
        monkeypatch.setenv(key, os.environ[key])


def tokenizer_config(tmp_path, name: str) -> TokenizerRunConfig:
    return load_config("configs/grid_vq.yaml", [*TOKENIZER, f"out_dir={tmp_path}", f"name={name}"],
                       cls=TokenizerRunConfig)


def prior_config(tmp_path, name: str, tokenizer, *extra: str) -> PriorRunConfig:
    return load_config("configs/prior_tiny.yaml", [*PRIOR, f"out_dir={tmp_path}", f"name={name}",
                                                   f"prior.tokenizer={tokenizer}",
                                                   f"prior.cache_dir={tmp_path / 'cache'}", *extra],
                       cls=PriorRunConfig, within=ExperimentConfig)


def test_both_trainers_write_one_pointer_and_resume_through_one_guard(tmp_path, one_process_group, capsys):
    from priors.trainer import PriorTrainer

    tokenizer = TokenizerTrainer(tokenizer_config(tmp_path, "tok")).train()
    PriorTrainer(prior_config(tmp_path, "prior", tokenizer)).train()
    pointers = {}
    for kind, name in (("tokenizer", "tok"), ("prior", "prior")):
        checkpoints = tmp_path / name / "checkpoints"
        pointers[kind] = read_pointer(checkpoints)
        assert (checkpoints / POINTER).is_file() and sorted(p.name for p in checkpoints.iterdir()) == [
            POINTER, "step_00000002"]  # the last checkpoint only: older tags are deleted once it is complete
    for kind, pointer in pointers.items():
        assert {key: pointer[key] for key in ("tag", "step", "kind")} == {"tag": "step_00000002", "step": 2,
                                                                          "kind": kind}
    assert pointers["prior"]["tokenizer_hash"]  # string client state goes into the pointer too
    # beside each exported model, what its training cost: steps, units over all ranks, the steps' own seconds
    records = {name: json.loads((tmp_path / name / "final" / TRAINING_RECORD).read_text()) for name in ("tok", "prior")}
    assert {k: records["tok"][k] for k in ("steps", "batch_size", "images", "world_size")} == {
        "steps": 2, "batch_size": 4, "images": 8, "world_size": 1}
    assert records["prior"]["steps"] == 2 and records["prior"]["tokens"] > 0
    for record in records.values():
        assert record["step_seconds"] > 0 and record["matmul_gflops"] > 0

    # the one guard: a fresh run refuses a folder that holds a run, whichever trainer wrote it
    with pytest.raises(UserError, match="already holds a run"):
        TokenizerTrainer(tokenizer_config(tmp_path, "tok"))
    with pytest.raises(UserError, match="already holds a run"):
        PriorTrainer(prior_config(tmp_path, "prior", tokenizer))
    # one trainer never resumes the other's run
    with pytest.raises(UserError, match="holds a prior run"):
        TokenizerTrainer(tokenizer_config(tmp_path, "prior"), resume=True)
    with pytest.raises(UserError, match="holds a tokenizer run"):
        PriorTrainer(prior_config(tmp_path, "tok", tokenizer), resume=True)
    # --resume continues from the pointer's step; with no checkpoint yet it starts from 0
    assert TokenizerTrainer(tokenizer_config(tmp_path, "tok"), resume=True).step == 2
    assert PriorTrainer(prior_config(tmp_path, "prior", tokenizer), resume=True).step == 2
    assert TokenizerTrainer(tokenizer_config(tmp_path, "fresh_tok"), resume=True).step == 0
    # a resumed run's record counts the steps before the resume too
    longer = load_config("configs/grid_vq.yaml", [*TOKENIZER, f"out_dir={tmp_path}", "name=tok", "train.steps=3"],
                         cls=TokenizerRunConfig)
    assert not list((tmp_path / "tok").glob("config.step_*.yaml"))  # the same settings: nothing to keep
    TokenizerTrainer(longer, resume=True).train()
    # other settings on --resume: named, and the earlier config.yaml kept under the step it ran to
    assert "changed settings (train.steps: 2 -> 3)" in capsys.readouterr().out
    kept = load_config(tmp_path / "tok" / "config.step_00000002.yaml", cls=TokenizerRunConfig)
    assert kept.train.steps == 2
    assert load_config(tmp_path / "tok" / "config.yaml", cls=TokenizerRunConfig).train.steps == 3
    record = json.loads((tmp_path / "tok" / "final" / TRAINING_RECORD).read_text())
    assert (record["steps"], record["images"]) == (3, 12) and record["step_seconds"] > records["tok"]["step_seconds"]
    assert PriorTrainer(prior_config(tmp_path, "fresh_prior", tokenizer), resume=True).step == 0


def test_prior_batch_size_is_the_global_batch(tmp_path, one_process_group):
    """prior_train.batch_size=8 with 2 accumulation micro-steps: 4 sequences per micro-step, together the
    step's whole global batch (what 2 ranks of 1 micro-step each would split the same way)."""
    from priors.trainer import PriorTrainer

    tokenizer = TokenizerTrainer(tokenizer_config(tmp_path, "tok")).train()
    trainer = PriorTrainer(prior_config(tmp_path, "prior", tokenizer, "prior_train.grad_accumulation=2"))
    batches = trainer.batches(0)
    order = EpochOrder(len(trainer.train_tokens), 8, trainer.cfg.seed)
    for step in range(2):
        micro_batches = next(batches)
        assert [len(batch["tokens"]) for batch in micro_batches] == [4, 4]
        expected = trainer.train_tokens.batch(order.batch(step)[0])["tokens"]
        assert torch.equal(torch.cat([batch["tokens"] for batch in micro_batches]), expected)
        logs = trainer.train_step(micro_batches)
        trainer.step += 1
        assert logs["count"] == expected.numel()  # the tokens of the global batch, all micro-steps together

    # the split arithmetic the DeepSpeed config gets, and a batch that does not split, named by its key
    from priors.deepspeed_utils import deepspeed_config

    config = deepspeed_config(PriorTrainConfig(batch_size=32, grad_accumulation=2), cuda=False, world_size=4)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (32, 4)
    with pytest.raises(UserError, match=r"prior_train.batch_size: 32 does not split into 3 rank"):
        deepspeed_config(PriorTrainConfig(batch_size=32), cuda=False, world_size=3)


def test_one_seed_per_micro_step():
    assert step_seed(7, 5) == step_seed(7, 5, 0, 0) == 7 * 1_000_003 + 5  # a one-process run's seed
    seeds = {step_seed(7, step, rank, micro) for step in range(4) for rank in range(3) for micro in range(3)}
    assert len(seeds) == 4 * 3 * 3 and all(0 <= seed < 2**63 for seed in seeds)
    assert step_seed(7, 5, 1, 0) == step_seed(7, 5, 1, 0) != step_seed(8, 5, 1, 0)
