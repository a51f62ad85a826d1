"""One command per study: every tokenizer family at several rates, BPE codecs over their codes, a prior
for each token stream, then one evaluation of all of them side by side (`runs/<study>/report/`).

    python study.py --config configs/study_fmnist.yaml [section.key=value ...] [--scale 0.1] [--force]

A study file names an `experiment` YAML (the data, the evaluation settings and every stage's defaults; its
`out_dir` holds the study) and lists `stages`. Overrides on the command line apply to every stage and
to the evaluation (e.g. `data.train_images=2000` for a quick run). Finished stages are reused, an
interrupted one resumes, and `--scale` multiplies every step count. `--stages a,b` runs only those stages, the
baseline and what they read (the report then covers them alone: a quick check of a few rows). A study file's
`train_scale` multiplies its tokenizer and prior steps only (0.7 for Fashion-MNIST, 0.6 for photographs: their
2-hour budgets); its `stage_overrides` add overrides to named stages, so that a study extending another with
`base:` changes one stage without restating the list.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipeline import (
    ROOT,
    Stage,
    bpe_stage,
    classifier_stage,
    evaluate_stage,
    load_stage_config,
    prior_stage,
    run_stages,
    tokenizer_stage,
)

__all__ = ["StudyConfig", "StudyStage", "main", "select_stages", "stage_needs", "study_stages"]


@dataclass
class StudyStage:
    """One stage. In `overrides`, `{stage}` stands for that earlier stage's saved model folder."""

    name: str = ""
    kind: Literal["tokenizer", "bpe", "prior", "classifier"] = "tokenizer"  # classifier: a REPA teacher
    steps: int = 0  # train.steps (tokenizer) or prior_train.steps (prior) at full size
    overrides: list[str] = field(default_factory=list)
    tokenizer: str = ""  # bpe and prior stages: the tokenizer stage whose codes they use
    bpe: str = ""  # prior stages over BPE ids: the bpe stage
    mode: Literal["1d", "2d", "flat"] = "1d"  # bpe stages
    vocab_size: int = 0  # bpe stages
    evaluate: bool = True  # tokenizer, bpe and prior stages all become report rows unless false


@dataclass
class StudyConfig:
    experiment: str = ""  # the experiment YAML every stage and the evaluation use (relative to this file)
    stages: list[StudyStage] = field(default_factory=list)
    # multiplies every tokenizer and prior stage's `steps` (not the evaluation's), so that a study on costlier
    # data fits its time budget without restating the stages of the study it extends
    train_scale: float = 1.0
    # prior stages whose codec (`codec.ImageCodec`) the evaluation measures against JPEG and WebP
    # (eval.codec.priors); the experiment's eval.codec section says on which images and at which settings
    codec_priors: list[str] = field(default_factory=list)
    # applied to every stage and to the evaluation before the command line's (e.g. eval.adaptive_psnr=null)
    overrides: list[str] = field(default_factory=list)
    # an ablation: the tokenizer stage every other one is compared with, paired over the same images (eval.baseline)
    baseline: str = ""
    # more overrides for named stages, after their own: a study that extends another (`base:`) changes a stage
    # without restating the list, e.g. {1d: [repa.weight=0]}
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)


def load_study(path: Path) -> tuple[StudyConfig, Path]:
    from base.config import check, load_config

    study = load_config(path, cls=StudyConfig)
    experiment = (path.parent / study.experiment).resolve()
    check(experiment.is_file(), f"experiment' must name an experiment YAML (looked for {experiment})", study.experiment)
    names = [s.name for s in study.stages]
    check(len(set(names)) == len(names) and all(names), "stages' need unique, non-empty names", names)
    unknown = [name for name in study.stage_overrides if name not in names]
    check(not unknown, f"stage_overrides' names no stage {unknown}", list(study.stage_overrides))
    study = replace(study, stage_overrides={}, stages=[
        replace(s, overrides=[*s.overrides, *study.stage_overrides.get(s.name, [])]) for s in study.stages])
    for i, s in enumerate(study.stages):
        earlier = names[:i]
        references = stage_needs(s)
        unknown = [ref for ref in references if ref not in earlier]
        check(not unknown, f"stages[{i}]' ({s.name}) refers to no earlier stage {unknown}", references)
        if s.kind == "classifier":  # eval.classifier_steps counts its steps; it is never a report row
            check(s.steps == 0, f"stages[{i}].steps' must be left out: a classifier trains eval.classifier_steps",
                  s.steps)
        check(s.kind in ("bpe", "classifier") or s.steps > 0,
              f"stages[{i}].steps' must be positive for a {s.kind} stage", s.steps)
        check(s.kind != "bpe" or s.vocab_size > 0, f"stages[{i}].vocab_size' must be positive", s.vocab_size)
    check(study.train_scale > 0, "train_scale' must be positive", study.train_scale)
    priors = {s.name for s in study.stages if s.kind == "prior" and s.evaluate}
    unknown = [name for name in study.codec_priors if name not in priors]
    check(not unknown, "codec_priors' must name evaluated prior stages", unknown)
    tokenizers = {s.name for s in study.stages if s.kind == "tokenizer" and s.evaluate}
    check(not study.baseline or study.baseline in tokenizers, "baseline' must name an evaluated tokenizer stage",
          study.baseline)
    return study, experiment


def stage_needs(stage: StudyStage) -> list[str]:
    """The earlier stages whose models `stage` reads: its tokenizer and BPE, and every `{stage}` in its overrides."""
    needed = {"bpe": [stage.tokenizer], "prior": [stage.tokenizer] + ([stage.bpe] if stage.bpe else [])}
    return needed.get(stage.kind, []) + [ref for item in stage.overrides for ref in re.findall(r"{(\w+)}", item)]


def select_stages(study: StudyConfig, names: list[str]) -> StudyConfig:
    """The study narrowed to the stages `names`, the baseline, and every stage they read (transitively); its
    codec priors narrowed alike. An unknown name is a one-line error."""
    from base.errors import UserError

    by_name = {s.name: s for s in study.stages}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise UserError(f"--stages: the study has no stage {unknown} (it has {list(by_name)})")
    keep, todo = set(), [*names, *([study.baseline] if study.baseline else [])]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += stage_needs(by_name[name])
    return replace(study, stages=[s for s in study.stages if s.name in keep],
                   codec_priors=[p for p in study.codec_priors if p in keep])


def study_stages(study: StudyConfig, experiment: Path, overrides: list[str]) -> tuple[list[Stage], Path]:
    """The pipeline stages of a study, the evaluation of its models last, and its output folder. Every stage
    loads the experiment file with the command line's `overrides` and then its own."""
    from base.config import check
    from evaluation.schema import EvalPriorConfig, EvalTokenizerConfig, ExperimentConfig
    from flextok.schema import TokenizerRunConfig
    from priors.schema import PriorRunConfig

    overrides = [*study.overrides, *overrides]
    cfg = load_stage_config(experiment, overrides, cls=ExperimentConfig)
    out = Path(cfg.out_dir)
    folder = lambda name: out / name / "final"  # noqa: E731
    folders = {s.name: folder(s.name) for s in study.stages}

    def stage_cfg(stage: StudyStage, cls: type):
        return load_stage_config(experiment, [*overrides, *(item.format(**folders) for item in stage.overrides)],
                                 cls=cls)

    stages, tokenizers, priors = [], [], []
    for s in study.stages:
        if s.kind == "classifier":
            classifier = stage_cfg(s, ExperimentConfig)
            fid_seeds = range(cfg.seed, cfg.seed + cfg.eval.fid_seeds)
            check(cfg.eval.fid_backbone != "dataset_classifier" or classifier.seed not in fid_seeds,
                  f"stages' ({s.name}): seed {classifier.seed} trains one of the evaluation's FID backbones (seeds "
                  f"{fid_seeds.start}..{fid_seeds.stop - 1}); give the classifier another seed", classifier.seed)
            stages.append(classifier_stage(classifier, out, s.name))
            continue
        if s.kind == "tokenizer":
            stages.append(tokenizer_stage(stage_cfg(s, TokenizerRunConfig), out, s.name, s.steps,
                                          train_scale=study.train_scale))
            entries, entry = tokenizers, EvalTokenizerConfig(name=s.name, path=str(folder(s.name)))
        elif s.kind == "bpe":
            stages.append(bpe_stage(stage_cfg(s, PriorRunConfig), out, s.name, s.tokenizer, s.mode, s.vocab_size))
            entries = tokenizers
            entry = EvalTokenizerConfig(name=s.name, path=str(folder(s.tokenizer)), bpe=str(out / s.name))
        else:
            prior_cfg = stage_cfg(s, PriorRunConfig)
            tokens = {"tokens": "bpe", "bpe": str(out / s.bpe)} if s.bpe else {}
            prior_cfg = replace(prior_cfg, prior=replace(prior_cfg.prior, tokenizer=str(folder(s.tokenizer)), **tokens))
            stages.append(prior_stage(prior_cfg, out, s.name, s.steps, train_scale=study.train_scale))
            entries = priors
            entry = EvalPriorConfig(name=s.name, path=str(folder(s.name)), tokenizer=str(folder(s.tokenizer)))
        if s.evaluate:
            entries.append(entry)
    codec = replace(cfg.eval.codec, priors=study.codec_priors)
    evaluation = replace(cfg, eval=replace(cfg.eval, tokenizers=tokenizers, priors=priors, codec=codec,
                                           baseline=study.baseline or cfg.eval.baseline))
    stages.append(evaluate_stage(evaluation, out))
    return stages, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="study YAML (e.g. configs/study_fmnist.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every stage")
    parser.add_argument("--force", action="store_true", help="retrain every stage")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--stages", type=lambda text: [name for name in text.split(",") if name], default=None,
                        metavar="A,B,...", help="only these stages, the baseline and the stages they read; the "
                        "report covers them alone")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    from base.errors import UserError

    try:
        study, experiment = load_study(args.config)
        if args.stages is not None:
            study = select_stages(study, args.stages)
        stages, out = study_stages(study, experiment, args.overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_stages(stages, out, args.scale, args.force)
    print(f"[{out.name}] report: {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
