import subprocess
import sys
from pathlib import Path

import pytest

from base.config import from_dict
from base.config import load_config as load_with_schema
from base.errors import ConfigError
from evaluation.schema import ExperimentConfig
from flextok.schema import FlexTokConfig


def load_config(path, overrides=()):
    return load_with_schema(path, overrides, cls=ExperimentConfig)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_base_chain_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "name: parent\ngrid:\n  latent_channels: 8\ntrain:\n  steps: 10\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\ntrain:\n  lr: 0.01\n")
    cfg = load_config(child, ["train.steps=7", "grid.quantizer.fsq_levels=[4,4]", "data.label_column=null",
                              "loss.l1=2e-1"])  # YAML reads 2e-1 (no dot) as a string: still a number here
    assert isinstance(cfg, ExperimentConfig)
    assert (cfg.name, cfg.grid.latent_channels, cfg.train.steps, cfg.train.lr) == ("child", 8, 7, 0.01)
    assert cfg.loss.l1 == 0.2
    assert cfg.grid.quantizer.fsq_levels == [4, 4] and cfg.data.label_column is None
    assert cfg.train.batch_size == ExperimentConfig().train.batch_size  # untouched defaults come from the dataclass


@pytest.mark.parametrize(
    "text, override, fragment",
    [
        ("train:\n  stepz: 3\n", [], "unknown key 'train.stepz'"),
        ("train:\n  steps: many\n", [], "'train.steps' must be an integer"),
        ("grid:\n  downsample: 3\n", [], "'grid.downsample' must be 4, 8 or 16"),
        ("grid:\n  bottleneck: gaussian\n", [], "'grid.bottleneck' must be one of"),
        ("data:\n  hflip: 1\n", [], "'data.hflip' must be true/false"),
        ("", ["train.lr=fast"], "'train.lr' must be a number"),
        ("", ["train.lr=nan"], "'train.lr' must be a number"),
        ("", ["nosuch.key=1"], "unknown key 'nosuch'"),
        ("", ["train.steps"], "must look like section.key=value"),
        ("grid:\n  quantizer: vq\n", [], "'grid.quantizer' must be a mapping"),
        ("grid:\n  quantizer: {codebook_size: 1}\n", [], "'grid.quantizer.codebook_size' must be in 2.."),
        ("", ["prior.sampling.top_p=0"], "'prior.sampling.top_p' must be in (0, 1]"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, override, fragment):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path, override)
    assert fragment in str(err.value) and (str(path) in str(err.value) or "override" in str(err.value))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("args", [["--config", "missing.yaml"], ["--config", "configs/grid_kl.yaml", "train.lr=fast"]])
def test_entry_script_exits_2_with_one_line(args):
    proc = subprocess.run([sys.executable, "train_tokenizer.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name.startswith("study_"):  # a study: stages over an experiment file
        import study

        config, experiment = study.load_study(path)
        stages, out = study.study_stages(config, experiment, [])
        assert [s.name for s in stages] == [s.name for s in config.stages] + ["report"]
        return
    load_config(path)


def test_a_check_error_names_the_file_and_the_whole_dotted_key():
    """`check` in a nested section knows only its own key; `from_dict` puts the file and the path in front."""
    with pytest.raises(ConfigError) as err:
        from_dict(FlexTokConfig, {"quantizer": {"kind": "lfq", "codebook_size": 12}}, "config.json", "config.")
    assert str(err.value) == ("config.json: 'config.quantizer.codebook_size' must be a power of two for lfq, "
                              "got 12")


def test_eval_sampling_overrides_replace_only_the_fields_given(tmp_path):
    import dataclasses

    from base.schema import SamplingConfig, SamplingOverrides

    names = lambda cls: [f.name for f in dataclasses.fields(cls)]  # noqa: E731
    assert names(SamplingOverrides) == names(SamplingConfig)
    path = write(tmp_path, "eval.yaml", "eval:\n  decoder_sampling: {steps: 4}\n")
    own = SamplingConfig(steps=25, guidance_scale=7.5)
    assert load_config(path).eval.decoder_sampling.apply(own) == SamplingConfig(steps=4, guidance_scale=7.5)
    bad = write(tmp_path, "bad.yaml", "eval:\n  prior_sampling: {steps: 0}\n")
    with pytest.raises(ConfigError, match="'eval.prior_sampling.steps' must be positive"):
        load_config(bad)


def test_a_partly_given_section_keeps_its_fields_defaults():
    """`prior.sampling: {guidance_scale: 2.0}` keeps the prior's 25 Euler steps and `flextok.sampling:
    {steps: 8}` the tokenizer's guidance interval: a section starts from its field's default."""
    prior = load_config(ROOT / "configs/prior_tiny.yaml").prior.sampling
    assert (prior.guidance_scale, prior.steps, prior.guidance_interval) == (2.0, 25, [0.0, 1.0])
    decoder = load_config(ROOT / "configs/1d_tiny.yaml").flextok.sampling
    assert (decoder.steps, decoder.guidance_interval) == (8, [0.3, 0.7])
