"""The commands of docs/scaling.md for the 256 recipe's miniature (configs/1d_256_mini.yaml), run as written with a
few steps each: parquet export, then every stage on 2 CPU ranks (torchrun, torchrun, deepspeed)."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import launcher_env, require_launcher

import priors  # noqa: F401  (registers the prior classes with load_model)
from base.distributed import free_port
from base.hub import load_model

REPO = Path(__file__).resolve().parents[1]


def miniature_commands() -> list[list[str]]:
    text = (REPO / "docs" / "scaling.md").read_text()
    section = text[text.index("## A miniature of the 256 recipe"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


@pytest.mark.launcher
def test_miniature_recipe_runs_from_the_docs_on_two_ranks(tmp_path):
    require_launcher()
    export, autoencoder, tokenizer, prior = miniature_commands()
    data, out = tmp_path / "mini_data", tmp_path / "mini"
    paths = [f"out_dir={out}", f"data.source=hf:{data}", f"flextok.autoencoder={out}/mini_kl_f8c16/final",
             f"prior.tokenizer={out}/1d_256_mini/final"]
    few = ["train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
           "loss.adversarial_start=1", "data.eval_images=8"]
    env = launcher_env()

    def run(argv: list[str]) -> None:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, " ".join(argv) + "\n" + done.stdout[-2000:] + done.stderr[-3000:]

    assert export[:2] == ["python", "export_parquet.py"]
    run(["python", *export[1:export.index("--out")], "--out", str(data), *export[export.index("--out") + 2:],
         "data.crops_per_photo=4", "data.eval_crops_per_photo=4"])
    for command in (autoencoder, tokenizer):
        assert command[:3] == ["torchrun", "--nproc_per_node", "2"]
        run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), *command[3:], *paths, *few])
    assert prior[:3] == ["deepspeed", "--num_gpus", "2"]
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *prior[3:], *paths,
         "prior_train.steps=2", "prior_train.eval_every=2", "prior_train.sample_every=2",
         "prior_train.checkpoint_every=2", "prior.cache_shard_size=8"])

    for run_dir in ("mini_kl_f8c16", "1d_256_mini", "1d_256_mini_prior"):
        final = out / run_dir / "final"
        assert load_model(final) is not None and (final / "README.md").is_file()
    card = (out / "1d_256_mini_prior" / "final" / "README.md").read_text()
    assert f"hf:{data}" in card
    prior_steps = [json.loads(line)["step"] for line in (out / "1d_256_mini_prior" / "metrics.jsonl").open()]
    assert max(prior_steps) == 2
