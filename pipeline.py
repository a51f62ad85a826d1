"""The stage runner behind `quickstart.py` and `study.py`: each stage is one script (train a tokenizer, a
BPE codec, a prior; evaluate) run on its typed config, whose finished artifact is reused on a re-run; an
interrupted training stage continues with `--resume`, and `--scale` multiplies every step count (a reduced
chain for CI).

A stage holds the config its script reads, loaded once. At run time the stage's counts are scaled
(`scaled`), the resolved config is written to the stage's folder (`stage_config.yaml`) and the script is
run with `--config` on that file. The launcher stays a subprocess (torchrun and deepspeed start the ranks).

A stage's folder keeps a stamp of what made it: its resolved config's settings that differ from their
defaults (`settings`), its other arguments, and the stamps of the earlier stages whose folders they name. A
stage whose stamp changed (an edited config or command line, a --scale that gives other counts, a changed
upstream stage) is made afresh, never reused or resumed, so a report never mixes models from different
settings. Neither the launcher (interpreter, rank count) nor the code (a changed default included) is part
of the stamp: after changing the code, re-run with --force.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from base.config import load_config, save_config
from base.distributed import available_ranks
from base.files import atomic_write_text
from base.runtime import matmul_gflops  # the same figure every benchmark prints
from evaluation.schema import EvalConfig, ExperimentConfig
from flextok.schema import TokenizerRunConfig
from priors.schema import PriorRunConfig

__all__ = ["STAGE_CONFIG", "Stage", "bpe_stage", "classifier_stage", "evaluate_stage", "load_stage_config",
           "prior_stage", "run_stages", "scaled", "settings", "stage_stamps", "tokenizer_stage"]

ROOT = Path(__file__).resolve().parent
STAMP = ".stage_stamp"  # what made the stage's folder (see the module docstring)
STAGE_CONFIG = "stage_config.yaml"  # the resolved config the stage's script ran with


@dataclass
class Stage:
    name: str
    script: str  # run as `<launcher> <script> --config <folder>/stage_config.yaml <args>`
    config: Any  # the typed config the script reads, at full size
    artifact: str  # relative to the output folder: the stage is finished when this exists
    launcher: list[str] = field(default_factory=lambda: [sys.executable])  # how it runs on this machine
    args: list[str] = field(default_factory=list)  # the script's other arguments: they make the artifact too
    scaled: tuple[str, ...] = ()  # dotted fields of `config` (counts) that --scale multiplies
    train_scale: float = 1.0  # this stage's share of its full-size counts (a study's train_scale)
    resumable: bool = False  # a training stage: an interrupted run continues with --resume

    def resolved(self, scale: float):
        """The config the script runs with at `scale`."""
        return scaled(self.config, self.scaled, self.train_scale * scale)

    def argv(self, folder: Path) -> list[str]:
        return [*self.launcher, self.script, "--config", str(folder / STAGE_CONFIG), *self.args]


def scaled(cfg, keys: tuple[str, ...], factor: float):
    """`cfg` with each count named in `keys` (dotted, e.g. `train.steps`) multiplied by `factor`, rounded and
    at least 2: the one place where step counts are scaled."""
    if factor == 1.0:
        return cfg
    for key in keys:
        cfg = _replace_at(cfg, key.split("."), max(2, round(_value_at(cfg, key.split(".")) * factor)))
    return cfg


def _value_at(cfg, path: list[str]) -> Any:
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def _replace_at(cfg, path: list[str], value: Any):
    """`dataclasses.replace` down a path of sections: each section's checks run on the new value."""
    head, *rest = path
    return replace(cfg, **{head: _replace_at(getattr(cfg, head), rest, value) if rest else value})


def load_stage_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, cls: type):
    """An experiment file and overrides, every section checked (as its scripts load it: a typo in any section
    fails here, before a stage runs), narrowed to `cls`'s sections: those the stage's script reads, so its
    stamp changes with nothing else."""
    full = load_config(path, overrides, cls=ExperimentConfig)
    return cls(**{f.name: getattr(full, f.name) for f in dataclasses.fields(cls)})


def tokenizer_launcher() -> list[str]:
    """One process on a CPU or a single GPU (the quickstart's tokenizers are too small to gain from
    DDP on 2 cores); `torchrun` with one rank per GPU when there are several."""
    gpus = torch.cuda.device_count()
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)]
    return [sys.executable]


def tokenizer_stage(cfg: TokenizerRunConfig, out: Path, name: str, steps: int, *, train_scale: float = 1.0) -> Stage:
    """Train a tokenizer for `steps` (at full size) into <out>/<name>/."""
    cfg = replace(cfg, out_dir=str(out), name=name, train=replace(cfg.train, steps=steps))
    return Stage(name, "train_tokenizer.py", cfg, f"{name}/final/model.safetensors", launcher=tokenizer_launcher(),
                 scaled=("train.steps",), train_scale=train_scale, resumable=True)


def bpe_stage(cfg: PriorRunConfig, out: Path, name: str, tokenizer: str, mode: str, vocab_size: int) -> Stage:
    """Train a BPE codec into <out>/<name>/ on the codes the tokenizer stage `tokenizer` gives `cfg`'s training
    images (tokenized into <out>/token_cache, unless `prior.cache_dir` says otherwise, as the priors are)."""
    args = ["--tokenizer", str(out / tokenizer / "final"), "--mode", mode, "--vocab-size", str(vocab_size),
            "--out", str(out / name)]
    return Stage(name, "train_bpe.py", replace(cfg, out_dir=str(out), name=name), f"{name}/config.json", args=args)


def prior_stage(cfg: PriorRunConfig, out: Path, name: str, steps: int, *, train_scale: float = 1.0) -> Stage:
    """Train a prior for `steps` (at full size) into <out>/<name>/, with the DeepSpeed launcher."""
    # run_name=None: the prior's folder is the stage's, whatever the experiment file names
    cfg = replace(cfg, out_dir=str(out), name=name, prior_train=replace(cfg.prior_train, steps=steps, run_name=None))
    return Stage(name, "train_prior.py", cfg, f"{name}/final/model.safetensors",
                 launcher=["deepspeed", "--num_gpus", str(available_ranks())], scaled=("prior_train.steps",),
                 train_scale=train_scale, resumable=True)


def classifier_stage(cfg: ExperimentConfig, out: Path, name: str) -> Stage:
    """Train a dataset classifier (a REPA teacher) into <out>/<name>/final/. Its config keeps only what
    `train_classifier.py` reads, so that no other setting retrains it (and the stages that read it)."""
    ev = cfg.eval
    cfg = ExperimentConfig(name=name, out_dir=str(out), seed=cfg.seed, data=cfg.data,
                           eval=EvalConfig(num_images=ev.num_images, train_images=ev.train_images,
                                           classifier_steps=ev.classifier_steps, device=ev.device))
    return Stage(name, "train_classifier.py", cfg, f"{name}/final/model.safetensors",
                 args=["--out", str(out / name / "final")], scaled=("eval.classifier_steps",))


def evaluate_stage(cfg: ExperimentConfig, out: Path) -> Stage:
    """Evaluate `cfg.eval`'s entries into <out>/report/, with the token caches the stages' priors filled
    (<out>/token_cache) and its own caches in <out>/eval_cache, unless the file names other folders."""
    prior = replace(cfg.prior, cache_dir=cfg.prior.cache_dir or str(out / "token_cache"))
    ev = replace(cfg.eval, cache_dir=cfg.eval.cache_dir or str(out / "eval_cache"))
    cfg = replace(cfg, out_dir=str(out.parent), name=out.name, prior=prior, eval=ev)
    return Stage("report", "evaluate.py", cfg, "report/summary.md",
                 scaled=("eval.classifier_steps", "eval.gfid_samples"))


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def _names_folder(text: str, folder: Path) -> bool:
    """Whether an argument or config value points at or into `folder`."""
    path = Path(text)
    path = (path if path.is_absolute() else ROOT / path).resolve()
    return path == folder or folder in path.parents


def settings(cfg) -> dict[str, Any]:
    """A config's fields that differ from their defaults, sections recursively (in lists and dicts too): what a
    stamp covers, so that a new config field at its default leaves finished stages valid. A changed default is
    a code change, as any other: re-run with --force."""
    found = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if _is_section(value) and _is_section(default):
            if section := settings(value):
                found[f.name] = section
        elif default is dataclasses.MISSING or value != default:
            found[f.name] = _plain(value)
    return found


def _is_section(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _plain(value):
    """`value` with every section in it as its non-default settings."""
    if _is_section(value):
        return settings(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def stage_stamps(stages: list[Stage], out: Path, scale: float) -> dict[str, str]:
    """Each stage's stamp: a digest of its script, its resolved config at `scale`, its other arguments, and
    the stamps of the earlier stages whose folders its config or arguments name."""
    stamps: dict[str, str] = {}
    folders: dict[str, Path] = {}
    for stage in stages:
        config = settings(stage.resolved(scale))
        texts = _strings([stage.args, config])
        reads = {name: stamps[name] for name, folder in folders.items() if any(_names_folder(t, folder) for t in texts)}
        payload = json.dumps({"script": stage.script, "config": config, "args": stage.args, "reads": reads},
                             sort_keys=True, default=str)
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
    argv = stage.argv(folder)
    if stage.resumable and same and not force and (folder / "checkpoints").is_dir():
        argv.append("--resume")
    else:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        atomic_write_text(stamp_file, stamp)
    save_config(stage.resolved(scale), folder / STAGE_CONFIG)  # the same bytes on a resume
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
