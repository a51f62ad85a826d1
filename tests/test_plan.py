"""`--plan`: parameter counts equal real builds, ZeRO partitioning, FLOPs formulas, and the scripts' flag."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from base.config import load_config
from base.errors import UserError
from base.plan import (
    Hardware,
    count,
    parameter_rows,
    per_token_weights,
    run_flops,
    step_flops,
    zero_model_states,
)
from evaluation.schema import ExperimentConfig
from flextok.model import FlexTok
from flextok.plan import planned_tokenizer, tokenizer_plan, tokenizer_workloads
from grid.autoencoder import GridAutoencoder
from priors.plan import (
    planned_prior,
    planned_tokens,
    prior_plan,
    prior_workload,
    sequence_length,
)
from priors.token_dataset import TokenSpec
from priors.trainer import build_prior

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the entry scripts, for their main([...])

import train_prior  # noqa: E402
import train_tokenizer  # noqa: E402


def cfg(name: str, *overrides: str) -> ExperimentConfig:
    return load_config(ROOT / "configs" / name, list(overrides), cls=ExperimentConfig)


def real_count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name, overrides", [
    ("grid_kl.yaml", ()), ("grid_vq.yaml", ()), ("grid_vq.yaml", ("loss.adversarial=0.1",)),
])
def test_grid_tokenizer_counts_equal_the_trainers_build(name, overrides):
    from flextok.training import build_objective, build_tokenizer

    c = cfg(name, *overrides)
    objective = build_objective(c, build_tokenizer(c))  # holds the model and any discriminator
    rows = parameter_rows(planned_tokenizer(c).groups)
    assert rows[-1] == ("total", real_count(objective), real_count(objective, trainable=True))
    assert sum(total for _, total, _ in rows[:-1]) == rows[-1][1]  # the groups partition the model


def test_1d_tokenizer_counts_equal_the_trainers_build(tmp_path):
    """The plan builds the frozen autoencoder from the grid section; the trainer loads the saved one."""
    from flextok.training import build_objective, build_tokenizer

    c = cfg("1d_tiny.yaml")
    GridAutoencoder(c.grid, resolution=c.data.resolution).save_pretrained(tmp_path / "ae")
    real = build_objective(c, build_tokenizer(cfg("1d_tiny.yaml", f"flextok.autoencoder={tmp_path / 'ae'}")))
    rows = parameter_rows(planned_tokenizer(c).groups)
    assert rows[-1] == ("total", real_count(real), real_count(real, trainable=True))
    assert real_count(real) > real_count(real, trainable=True)  # the autoencoder is frozen
    assert sum(total for _, total, _ in rows[:-1]) == rows[-1][1]


def spec_of(tokenizer: torch.nn.Module, **fields) -> TokenSpec:
    """The spec a token cache of this (real, untrained) tokenizer reports for full tokens."""
    tokens = tokenizer.tokenize(torch.rand(2, 3, 32, 32) * 2 - 1)
    continuous = tokens[0].dtype.is_floating_point
    return TokenSpec(continuous=continuous, vocab_size=0 if continuous else tokenizer.vocab_size,
                     token_dim=tokens[0].shape[1] if continuous else 0, max_length=len(tokens[0]),
                     variable_length=False, token_set=False, tokenizer_hash="", **fields)


def test_discrete_prior_counts_equal_a_real_build():
    c = cfg("prior_tiny.yaml")
    tokenizer = FlexTok(c.flextok, 32, autoencoder_config=dataclasses.asdict(c.grid))
    spec = spec_of(tokenizer)
    planned = planned_prior(c)
    assert (planned.spec.vocab_size, planned.spec.max_length) == (spec.vocab_size, spec.max_length) == (1000, 32)
    real = build_prior(c, spec, spec.max_length)
    assert count(planned.model) == real_count(real) == parameter_rows({"all": planned.model})[-1][1]


@pytest.mark.parametrize("overrides, continuous", [
    (("tokenizer=grid", "prior.kind=flow"), True),  # a flow prior over grid KL latents
    (("tokenizer=grid", "grid.bottleneck=quantized"), False),  # a GPT over grid FSQ codes
])
def test_grid_priors_count_equal_real_builds(overrides, continuous):
    c = cfg("prior_tiny.yaml", *overrides)
    spec = spec_of(GridAutoencoder(c.grid, resolution=32))
    planned = planned_prior(c)
    assert planned.spec == spec and spec.continuous == continuous
    assert count(planned.model) == real_count(build_prior(c, spec, spec.max_length))


def test_token_modes_set_lengths_and_eos():
    prefix = planned_tokens(cfg("prior_tiny.yaml", "prior.tokens=prefix", "prior.prefix_length=8"))[0]
    assert (prefix.max_length, prefix.variable_length, sequence_length(prefix)) == (8, False, 8)
    adaptive = planned_tokens(cfg("prior_tiny.yaml", "prior.tokens=adaptive"))[0]
    assert (adaptive.max_length, adaptive.variable_length, sequence_length(adaptive)) == (32, True, 33)
    bpe, notes = planned_tokens(cfg("prior_tiny.yaml", "prior.tokens=bpe", "prior.bpe=no/such/codec"))
    assert bpe.vocab_size == 1000 and any("LOWER BOUND" in n for n in notes)
    with pytest.raises(UserError, match="prior.kind"):  # KL latents for a GPT
        planned_tokens(cfg("prior_tiny.yaml", "tokenizer=grid"))
    with pytest.raises(UserError, match="prior.prefix_length"):
        planned_tokens(cfg("prior_tiny.yaml", "prior.tokens=prefix", "prior.prefix_length=33"))


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("gpus", [1, 3, 8])
def test_zero_stages_partition_model_states(gpus):
    params = 1_000_003
    s0, s1, s2, s3 = (zero_model_states(params, stage, gpus) for stage in range(4))
    assert (s0.weights, s0.gradients, s0.optimizer) == (2 * params, 2 * params, 12 * params)
    assert (s1.weights, s1.gradients, s1.optimizer) == (2 * params, 2 * params, 12 * params / gpus)
    assert (s2.weights, s2.gradients, s2.optimizer) == (2 * params, 2 * params / gpus, 12 * params / gpus)
    assert (s3.weights, s3.gradients, s3.optimizer) == (2 * params / gpus, 2 * params / gpus, 12 * params / gpus)
    assert s3.total == 16 * params / gpus
    fp32 = zero_model_states(params, 0, gpus, precision="fp32")
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * params, 4 * params, 8 * params)
    assert zero_model_states(params, 2, gpus, offload_optimizer=True).optimizer == 0


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flops_scale_linearly_with_the_batch():
    c = cfg("prior_tiny.yaml")
    prior = [prior_workload(c, planned_prior(c))]
    tokenizer = tokenizer_workloads(c, planned_tokenizer(c))
    for work in (prior, tokenizer):
        assert step_flops(work, 64) == 2 * step_flops(work, 32) > 0
        assert run_flops(work, 64, 300) == 2 * run_flops(work, 32, 300) == 600 * step_flops(work, 32)


def test_prior_training_flops_follow_the_formula():
    c = cfg("prior_tiny.yaml")
    work = prior_workload(c, planned_prior(c))
    w, layers, h, s = per_token_weights(planned_prior(c).model), 4, 128, 32
    assert work.train_flops == 6 * w * s + 12 * layers * h * s**2


def test_a_discriminator_joins_at_its_start_step():
    c = cfg("grid_vq.yaml", "loss.adversarial=0.1", "loss.adversarial_start=100", "train.steps=300")
    work = tokenizer_workloads(c, planned_tokenizer(c))
    late = [w for w in work if w.start_step == 100]
    assert len(late) == 1 and late[0].passes == 6
    assert step_flops(work, 1, step=0) + late[0].train_flops == step_flops(work, 1, step=100)
    assert run_flops(work, 1, 300) == 300 * step_flops(work, 1, 0) + 200 * late[0].train_flops


@pytest.mark.parametrize("kind", ["discrete", "flow"])
def test_per_token_weights_match_torchs_flop_counter(kind):
    """W of 2·W·s: torch's counter on a real forward lies between the matmul term and matmul + attention
    (per-sample conditioning counts a little; the CPU attention path may not be counted)."""
    c = cfg("prior_tiny.yaml", *(["tokenizer=grid", "prior.kind=flow"] if kind == "flow" else []))
    planned = planned_prior(c)
    model = build_prior(c, planned.spec, planned.spec.max_length)
    b, s, L, h = 2, sequence_length(planned.spec), c.prior.depth, c.prior.dim
    with FlopCounterMode(display=False) as counter:
        if kind == "flow":
            model.velocity(torch.randn(b, s, planned.spec.token_dim), torch.rand(b), torch.zeros(b, dtype=torch.long))
        else:
            model.net(torch.zeros(b, s, dtype=torch.long))
    matmuls = b * 2 * per_token_weights(model) * s
    assert 0.98 * matmuls <= counter.get_total_flops() <= matmuls * 1.02 + b * 4 * L * h * s**2


# ---------------------------------------------------------------------------------------------- the scripts


def test_prior_plan_through_the_script(tmp_path, capsys):
    assert train_prior.main(["--config", str(ROOT / "configs/1d_256.yaml"), "--plan", "--gpus", "8",
                             f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "184.07M" in out  # the 1d_256 prior: 64,000 codes, 1,000 classes
    assert "65,536 tokens per optimizer step" in out  # 32 x 1 x 8 sequences of 256 positions
    assert "2 (prior_train.zero_stage)" in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no token cache


def test_tokenizer_plan_through_the_script(tmp_path, capsys):
    assert train_tokenizer.main(["--config", str(ROOT / "configs/1d_256.yaml"), "--plan", "--gpus", "8",
                                 f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "839.37M" in out and "32 per GPU" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", [train_prior, train_tokenizer])
@pytest.mark.parametrize("flags, key", [(["--plan", "--gpus", "0"], "--gpus"), (["--gpus", "8"], "--gpus"),
                                        (["--plan", "--mfu", "1.5"], "--mfu")])
def test_bad_plan_options_exit_2_with_one_line(script, flags, key, capsys):
    assert script.main(["--config", str(ROOT / "configs/prior_tiny.yaml"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}:") and err.count("\n") == 1


def test_the_plan_starts_no_deepspeed():
    code = ("import sys, train_prior; rc = train_prior.main(['--config', 'configs/prior_tiny.yaml', '--plan']); "
            "assert rc == 0 and 'deepspeed' not in sys.modules, sorted(m for m in sys.modules if 'deepspeed' in m)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_plans_print_for_every_family():
    hw = Hardware(gpus=2)
    for c in (cfg("grid_kl.yaml"), cfg("grid_vq.yaml", "loss.adversarial=0.1"), cfg("1d_tiny.yaml")):
        assert "FLOPs per optimizer step" in tokenizer_plan(c, hw)
    assert "flow prior" in prior_plan(cfg("prior_tiny.yaml", "tokenizer=grid", "prior.kind=flow"), hw)


def test_the_plan_merges_the_deepspeed_json_as_the_trainer_does(tmp_path, capsys):
    """`prior_train.deepspeed_config` and `--deepspeed_config` (which wins) change the stage, precision and
    offload the plan sizes, through the trainer's own merge and checks."""
    yaml_json, cli_json, bad_json = tmp_path / "yaml.json", tmp_path / "cli.json", tmp_path / "bad.json"
    yaml_json.write_text('{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}')
    cli_json.write_text('{"zero_optimization": {"stage": 1}, "bf16": {"enabled": false}, "fp16": {"enabled": true}}')
    bad_json.write_text('{"train_micro_batch_size_per_gpu": 3}')
    hw = Hardware(gpus=4)
    plain = prior_plan(cfg("prior_tiny.yaml"), hw)
    assert "0 (prior_train.zero_stage)" in plain and "bf16" in plain and "offload" not in plain

    merged = prior_plan(cfg("prior_tiny.yaml", f"prior_train.deepspeed_config={yaml_json}"), hw)
    assert f"3 ({yaml_json}: zero_optimization.stage)" in merged
    assert "optimizer state 12 B in host memory" in merged and "optimizer offload:" in merged
    assert f"DeepSpeed JSON {yaml_json} merged over prior_train, as the trainer does: ZeRO stage 3, bf16" in merged

    assert train_prior.main(["--config", str(ROOT / "configs/prior_tiny.yaml"), "--plan", "--gpus", "4",
                             f"prior_train.deepspeed_config={yaml_json}", "--deepspeed_config", str(cli_json)]) == 0
    out = capsys.readouterr().out
    assert f"1 ({cli_json}: zero_optimization.stage)" in out and "memory per GPU: DeepSpeed AdamW, fp16" in out
    assert "host memory" not in out  # the command line's JSON wins over the YAML key's

    assert train_prior.main(["--config", str(ROOT / "configs/prior_tiny.yaml"), "--plan",
                             "--deepspeed_config", str(bad_json)]) == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu=3 disagrees with 32 from prior_train.batch_size=32" in err
    assert err.count("\n") == 1
