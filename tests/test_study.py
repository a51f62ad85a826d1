"""`study.py` turns a study file into pipeline stages and the evaluation config that ends it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import pipeline
import study
from base.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_stages_reference_each_other_and_the_evaluation_lists_them():
    config, experiment = study.load_study(ROOT / "configs/study_fmnist.yaml")
    stages, out, evaluation = study.study_stages(config, experiment, ["data.train_images=100"])
    by_name = {s.name: s for s in stages}
    assert out == Path("runs/study_fmnist")
    one_d = " ".join(by_name["1d"].argv(1.0))
    assert f"flextok.autoencoder={out / 'kl_f4' / 'final'}" in one_d and "train.steps=1400" in one_d
    assert "data.train_images=100" in one_d and "data.train_images=100" in " ".join(by_name["1d_bpe"].argv(1.0))
    prior = " ".join(by_name["prior_1d_bpe"].argv(0.01))
    assert "prior.tokens=bpe" in prior and f"prior.bpe={out / '1d_bpe'}" in prior and "prior_train.steps=4" in prior
    assert by_name["prior_kl_f4"].resumable and not by_name["1d_bpe"].resumable
    names = [e["name"] for e in evaluation["eval"]["tokenizers"]]
    assert names[:2] == ["kl_f4", "kl_f8"] and "1d_bpe" in names
    bpe = next(e for e in evaluation["eval"]["tokenizers"] if e["name"] == "1d_bpe")
    assert bpe == {"name": "1d_bpe", "path": str(out / "1d" / "final"), "bpe": str(out / "1d_bpe")}
    assert len(evaluation["eval"]["priors"]) == 7 and (evaluation["out_dir"], evaluation["name"]) == ("runs",
                                                                                                    "study_fmnist")


def test_train_scale_shortens_training_stages_but_not_the_evaluation():
    unscaled = study.load_study(ROOT / "configs/study_fmnist.yaml")
    unscaled[0].train_scale = 1.0
    full = study.study_stages(*unscaled, [])[0]
    for name, scale in [("study_fmnist", 0.7), ("study_photos", 0.6)]:
        config, experiment = study.load_study(ROOT / f"configs/{name}.yaml")
        assert config.train_scale == scale and [s.name for s in config.stages] == [s.name for s in full[:-1]]
        for long, short in zip(full, study.study_stages(config, experiment, [])[0]):
            assert set(long.scaled) == set(short.scaled)
            for key, value in long.scaled.items():
                expected = value if short.name == "report" else round(value * scale)
                assert short.scaled[key] == expected, (name, short.name, key)


def test_a_bad_study_file_names_the_problem(tmp_path):
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


def test_stamps_follow_settings_and_upstream_stages(tmp_path):
    config, experiment = study.load_study(ROOT / "configs/study_fmnist.yaml")

    def stamps(scale: float = 1.0, *overrides: str) -> dict[str, str]:
        stages, out, evaluation = study.study_stages(config, experiment, [f"out_dir={tmp_path}", *overrides])
        (out / "study_eval.yaml").write_text(yaml.safe_dump(evaluation))  # as study.main writes it
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


def test_a_stage_is_reused_only_while_its_stamp_holds(tmp_path):
    log = tmp_path / "runs.txt"

    def stage(value: str) -> pipeline.Stage:
        code = (f"import pathlib; p = pathlib.Path({str(tmp_path / 'a' / 'done')!r}); p.write_text('x'); "
                f"open({str(log)!r}, 'a').write({value!r})")
        return pipeline.Stage("a", [sys.executable], ["-c", code], "a/done")

    pipeline.run_stages([stage("1")], tmp_path, 1.0, force=False)
    pipeline.run_stages([stage("1")], tmp_path, 1.0, force=False)  # same command: reused
    assert log.read_text() == "1"
    pipeline.run_stages([stage("2")], tmp_path, 1.0, force=False)  # another command: made afresh
    pipeline.run_stages([stage("2")], tmp_path, 0.5, force=False)  # another scale: made afresh
    pipeline.run_stages([stage("2")], tmp_path, 0.5, force=True)
    assert log.read_text() == "1222"
