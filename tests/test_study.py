"""`study.py` turns a study file into pipeline stages and the evaluation config that ends it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

import pipeline
import study
from base.errors import ConfigError, UserError
from evaluation.schema import ExperimentConfig
from flextok.schema import TokenizerRunConfig
from priors.schema import PriorRunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_stages_reference_each_other_and_the_evaluation_lists_them():
    config, experiment = study.load_study(ROOT / "configs/study_fmnist.yaml")
    stages, out = study.study_stages(config, experiment, ["data.train_images=100"])
    by_name = {s.name: s for s in stages}
    assert out == Path("runs/study_fmnist")
    one_d = by_name["1d"].resolved(1.0)
    assert isinstance(one_d, TokenizerRunConfig) and not isinstance(one_d, PriorRunConfig)  # its sections only
    assert one_d.flextok.autoencoder == str(out / "kl_f4" / "final") and one_d.train.steps == 1400
    assert (one_d.out_dir, one_d.name) == (str(out), "1d")
    assert one_d.data.train_images == 100 and by_name["1d_bpe"].resolved(1.0).data.train_images == 100
    assert by_name["1d_bpe"].args[:2] == ["--tokenizer", str(out / "1d" / "final")]
    prior = by_name["prior_1d_bpe"].resolved(0.01)
    assert (prior.prior.tokens, prior.prior.bpe, prior.prior_train.steps) == ("bpe", str(out / "1d_bpe"), 4)
    assert prior.prior.tokenizer == str(out / "1d" / "final")
    assert by_name["prior_kl_f4"].resumable and not by_name["1d_bpe"].resumable
    evaluation = stages[-1].resolved(1.0)
    assert isinstance(evaluation, ExperimentConfig) and evaluation.run_dir / "report" == out / "report"
    names = [e.name for e in evaluation.eval.tokenizers]
    assert names[:2] == ["kl_f4", "kl_f8"] and "1d_bpe" in names
    bpe = next(e for e in evaluation.eval.tokenizers if e.name == "1d_bpe")
    assert (bpe.path, bpe.bpe) == (str(out / "1d" / "final"), str(out / "1d_bpe"))
    assert len(evaluation.eval.priors) == 7 and evaluation.eval.codec.priors == config.codec_priors
    assert evaluation.data.train_images == 100  # the command line reaches the evaluation too


def test_the_shaping_study_trains_a_teacher_and_compares_every_row_with_its_baseline():
    config, experiment = study.load_study(ROOT / "configs/study_shaping.yaml")
    stages, out = study.study_stages(config, experiment, [])
    by_name = {s.name: s for s in stages}
    assert out == Path("runs/study_shaping")  # the study file's own overrides, before the command line's
    teacher = by_name["teacher"]
    assert teacher.script == "train_classifier.py" and teacher.args == ["--out", str(out / "teacher" / "final")]
    assert teacher.resolved(1.0).seed == 100 and teacher.scaled == ("eval.classifier_steps",)
    repa = by_name["1d_repa"].resolved(1.0).repa
    assert (repa.weight, repa.teacher) == (0.5, str(out / "teacher" / "final"))
    assert by_name["1d_eq"].resolved(1.0).flextok.autoencoder == str(out / "kl_f4_eq" / "final")
    rows = [s for s in config.stages if s.kind == "tokenizer" and s.evaluate]
    assert {s.steps for s in rows} == {1000}  # the same image-steps for every row (batch from the experiment)
    evaluation = stages[-1].resolved(1.0)
    assert evaluation.eval.baseline == "1d" and evaluation.eval.adaptive_psnr is None
    assert [e.name for e in evaluation.eval.tokenizers] == [s.name for s in rows]  # kl_f4, kl_f4_eq: not rows
    assert len(evaluation.eval.priors) == len(rows) and evaluation.seed == 0  # the FID backbone's seed is not 1
    overridden = study.study_stages(config, experiment, ["out_dir=runs/elsewhere"])[1]
    assert overridden == Path("runs/elsewhere")  # the command line comes last
    photos, photos_experiment = study.load_study(ROOT / "configs/study_shaping_photos.yaml")
    photo_stages, photo_out = study.study_stages(photos, photos_experiment, [])
    assert photo_out == Path("runs/study_shaping_photos") and photos_experiment.name == "photos.yaml"
    assert [s.name for s in photo_stages] == [s.name for s in stages]
    assert photo_stages[-1].resolved(1.0).eval.baseline == "1d"


def test_a_subset_of_a_study_keeps_the_baseline_and_what_its_stages_read(monkeypatch):
    config, experiment = study.load_study(ROOT / "configs/study_shaping.yaml")
    subset = study.select_stages(config, ["prior_1d_tail_repa", "1d_eq"])
    assert [s.name for s in subset.stages] == ["kl_f4", "kl_f4_eq", "teacher", "1d", "1d_eq", "1d_tail_repa",
                                               "prior_1d_tail_repa"]  # in the study's order
    stages = study.study_stages(subset, experiment, [])[0]
    evaluation = stages[-1].resolved(1.0).eval
    assert [e.name for e in evaluation.tokenizers] == ["1d", "1d_eq", "1d_tail_repa"] and evaluation.baseline == "1d"
    assert [e.name for e in evaluation.priors] == ["prior_1d_tail_repa"]
    fmnist = study.select_stages(study.load_study(ROOT / "configs/study_fmnist.yaml")[0], ["prior_1d_bpe"])
    assert fmnist.codec_priors == ["prior_1d_bpe"] and "1d_bpe" in [s.name for s in fmnist.stages]
    with pytest.raises(UserError, match=r"--stages: the study has no stage \['nope'\]"):
        study.select_stages(config, ["1d", "nope"])
    monkeypatch.chdir(ROOT)
    assert study.main(["--config", str(ROOT / "configs/study_shaping.yaml"), "--stages", "nope"]) == 2


def test_a_study_baseline_must_be_an_evaluated_tokenizer(tmp_path):
    (tmp_path / "exp.yaml").write_text("name: e\n")
    bad = tmp_path / "study.yaml"
    bad.write_text("experiment: exp.yaml\nbaseline: t\nstages: [{name: t, steps: 5, evaluate: false}]\n")
    with pytest.raises(ConfigError, match="baseline"):
        study.load_study(bad)
    bad.write_text("experiment: exp.yaml\nstages: [{name: c, kind: classifier, steps: 5}]\n")
    with pytest.raises(ConfigError, match="eval.classifier_steps"):  # a classifier's steps are those
        study.load_study(bad)
    bad.write_text("experiment: exp.yaml\nstages: [{name: c, kind: classifier, overrides: [seed=2]}]\n")
    config, experiment = study.load_study(bad)
    stages = study.study_stages(config, experiment, ["eval.fid_seeds=2"])[0]  # FID backbones: seeds 0 and 1
    assert stages[0].resolved(1.0).seed == 2 and not pipeline.settings(stages[0].resolved(1.0).eval).get("tokenizers")
    with pytest.raises(ConfigError, match="trains one of the evaluation's FID backbones"):
        study.study_stages(config, experiment, ["eval.fid_seeds=3"])


def test_train_scale_shortens_training_stages_but_not_the_evaluation():
    for name, scale in [("study_fmnist", 0.7), ("study_photos", 0.6)]:
        config, experiment = study.load_study(ROOT / f"configs/{name}.yaml")
        assert config.train_scale == scale
        full = study.study_stages(replace(config, train_scale=1.0), experiment, [])[0]
        for long, short in zip(full, study.study_stages(config, experiment, [])[0], strict=True):
            assert long.scaled == short.scaled
            share = 1 if short.script in ("evaluate.py", "train_classifier.py") else scale  # train_scale: training
            for key in short.scaled:
                value = pipeline._value_at(long.resolved(1.0), key.split("."))
                assert pipeline._value_at(short.resolved(1.0), key.split(".")) == round(value * share), (
                    name, short.name, key)
                # --scale multiplies the study's share once: one rounding of the full-size count
                expected = max(2, round(value * 0.01 * share))
                assert pipeline._value_at(short.resolved(0.01), key.split(".")) == expected, (name, short.name, key)


def test_a_bad_override_fails_before_any_stage_runs(monkeypatch):
    monkeypatch.chdir(ROOT)  # study.main works from the repository root; this puts the test's folder back after
    config, experiment = study.load_study(ROOT / "configs/study_fmnist.yaml")
    with pytest.raises(ConfigError, match="unknown key 'dat'"):
        study.study_stages(config, experiment, ["dat.train_images=100"])
    config.stages[0].overrides = ["gird.downsample=8"]  # a section no script reads is still an error
    with pytest.raises(ConfigError, match="unknown key 'gird'"):
        study.study_stages(config, experiment, [])
    assert study.main(["--config", str(ROOT / "configs/study_fmnist.yaml"), "train.steps=0"]) == 2


def test_a_bad_study_file_names_the_problem(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "study.yaml"
    bad.write_text("experiment: nowhere.yaml\nstages: []\n")
    with pytest.raises(ConfigError, match="experiment"):
        study.load_study(bad)
    bad.write_text("experiment: nowhere.yaml\nstages: [{name: a, kind: sideways}]\n")
    with pytest.raises(ConfigError, match="'stages\\[0\\].kind' must be one of"):
        study.load_study(bad)
    (tmp_path / "exp.yaml").write_text("name: e\n")
    bad.write_text("experiment: exp.yaml\nstages: [{name: p, kind: prior, tokenizer: later}, {name: later}]\n")
    with pytest.raises(ConfigError, match="refers to no earlier stage"):
        study.load_study(bad)
    bad.write_text("experiment: exp.yaml\nstages: [{name: t, steps: 5}]\ntrain_scale: 0\n")
    with pytest.raises(ConfigError, match="train_scale"):
        study.load_study(bad)
    bad.write_text("experiment: exp.yaml\nstages: [{name: t, overrides: ['flextok.autoencoder={kl}']}]\n")
    with pytest.raises(ConfigError, match=r"\['kl'\]"):
        study.load_study(bad)
    bad.write_text("experiment: exp.yaml\nstages: [{name: t, steps: 5}]\nstage_overrides: {u: [seed=1]}\n")
    with pytest.raises(ConfigError, match=r"stage_overrides' names no stage \['u'\]"):
        study.load_study(bad)
    bad.write_text("experiment: exp.yaml\nstages: [{name: t, steps: 5}]\nstage_overrides: [seed=1]\n")
    with pytest.raises(ConfigError, match="stage_overrides' must be a mapping"):
        study.load_study(bad)
    monkeypatch.chdir(tmp_path)  # study.main moves to the repository root; this puts the test's folder back
    assert study.main(["--config", str(bad)]) == 2  # from the command line: one line, exit 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_a_study_that_extends_another_changes_one_stage_with_stage_overrides():
    fmnist, experiment = study.load_study(ROOT / "configs/study_fmnist.yaml")
    photos, photos_experiment = study.load_study(ROOT / "configs/study_photos.yaml")
    assert [s.name for s in photos.stages] == [s.name for s in fmnist.stages] and not photos.stage_overrides
    changed = [s.name for s, t in zip(fmnist.stages, photos.stages, strict=True) if s.overrides != t.overrides]
    assert changed == ["1d"]
    resolved = {s.name: s.resolved(1.0) for s in study.study_stages(photos, photos_experiment, [])[0]}
    assert resolved["1d"].repa.weight == 0 and resolved["1d"].repa.teacher is None  # after the stage's own REPA
    assert resolved["1d"].flextok.nested_dropout == "linear" and resolved["1d_set"].repa.weight == 0.5


def test_a_stamp_covers_what_differs_from_the_defaults():
    """A new config field at its default (a code change) leaves every finished stage's stamp as it was."""
    cfg = pipeline.load_stage_config(ROOT / "configs/fmnist.yaml", ["tokenizer=flextok"], cls=TokenizerRunConfig)
    found = pipeline.settings(cfg)
    assert found["train"]["lr"] == 4e-3 and found["tokenizer"] == "flextok" and "seed" not in found
    assert "repa" not in found and "keep_all_fraction" not in found["flextok"]  # sections and keys at their defaults

    @dataclass
    class Extended(TokenizerRunConfig):
        added: int = 3

    assert pipeline.settings(Extended(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})) == found
    assert pipeline.settings(Extended(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, added=4)) == {
        **found, "added": 4}


def test_stamps_follow_settings_and_upstream_stages(tmp_path):
    config, experiment = study.load_study(ROOT / "configs/study_fmnist.yaml")

    def stamps(scale: float = 1.0, *overrides: str) -> dict[str, str]:
        stages, out = study.study_stages(config, experiment, [f"out_dir={tmp_path}", *overrides])
        return pipeline.stage_stamps(stages, out, scale)

    base = stamps()
    assert base == stamps() and len(set(base.values())) == len(base)
    edited = config.stages[[s.name for s in config.stages].index("1d")]
    edited.overrides = [*edited.overrides, "train.lr=2e-3"]
    changed = {name for name, value in stamps().items() if value != base[name]}
    # the 1D tokenizer, everything made from its codes, and the report; no grid stage
    assert changed == {"1d", "1d_bpe", "prior_1d", "prior_1d_bpe", "report"}
    assert all(a != b for a, b in zip(stamps(0.1).values(), base.values()))
    # a command-line override reaches every stage, but only those reading its section change
    edited = stamps()
    changed = {name for name, value in stamps(1.0, "eval.gfid_samples=40").items() if value != edited[name]}
    assert changed == {"report"}


@dataclass
class ToyConfig:
    """The config of TOY_SCRIPT below: what it writes, and a count --scale multiplies."""

    value: str = ""
    steps: int = 10


# A stand-in for a training script: reads --config, records how it was run, fails once if told to (an
# interruption after its first checkpoint), and finishes by writing its artifact.
TOY_SCRIPT = """
import pathlib, sys, yaml
folder = pathlib.Path(sys.argv[2]).parent
cfg = yaml.safe_load(open(sys.argv[2]))
resume = "--resume" in sys.argv
with open(folder.parent / "runs.txt", "a") as log:
    log.write(f"{cfg['value']}:{cfg['steps']}{'r' if resume else ''} ")
if cfg["value"] == "crash" and not resume:
    (folder / "checkpoints").mkdir()
    sys.exit(1)
(folder / "done").write_text("x")
"""


def test_a_stage_runs_its_script_on_the_resolved_config_and_is_reused_only_while_its_stamp_holds(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setattr(pipeline, "matmul_gflops", lambda: 0.0)  # the machine's speed: not what this test is about
    (tmp_path / "toy.py").write_text(TOY_SCRIPT)

    def run(value: str, scale: float = 1.0, force: bool = False) -> None:
        stage = pipeline.Stage("a", str(tmp_path / "toy.py"), ToyConfig(value), "a/done", scaled=("steps",),
                               resumable=True)
        pipeline.run_stages([stage], tmp_path, scale, force=force)

    log = lambda: (tmp_path / "runs.txt").read_text().split()  # noqa: E731
    run("1")
    assert yaml.safe_load((tmp_path / "a" / pipeline.STAGE_CONFIG).read_text()) == {"value": "1", "steps": 10}
    run("1")  # the same config: reused
    assert log() == ["1:10"]
    run("2")  # another config: made afresh
    run("2", 0.5)  # another scale: the count it gives is part of the config
    run("2", 0.5, force=True)
    assert log() == ["1:10", "2:10", "2:5", "2:5"]
    with pytest.raises(SystemExit, match="stage 'a' failed"):
        run("crash")
    run("crash")  # the same stamp and a checkpoint: continued with --resume
    assert log()[-2:] == ["crash:10", "crash:10r"]
    with pytest.raises(SystemExit):
        run("crash", 0.5)  # another stamp: made afresh (the finished folder removed), never resumed
    assert log()[-1] == "crash:5" and not (tmp_path / "a" / "done").exists()
