"""Experiment trackers (base.tracking): what each writes is read back with the tracker's own reader, and a
tiny tokenizer run's TensorBoard events."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from base.config import load_config
from base.errors import ConfigError, UserError
from base.files import MetricsLog
from base.tracking import TRACKERS, open_trackers
from flextok.schema import TokenizerRunConfig
from flextok.training import TokenizerTrainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"name": "tiny", "train": {"lr": 0.001, "steps": 10, "trackers": ["jsonl", "tensorboard"]}}


def png(path: Path, height: int = 6, width: int = 10) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def events(run_dir: Path) -> EventAccumulator:
    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    reader.Reload()
    return reader


def log_steps(run_dir: Path, steps: range, start_step: int, scale: float = 1.0) -> None:
    with open_trackers(["jsonl", "tensorboard"], run_dir, run_name="tiny", config=CONFIG,
                       start_step=start_step) as trackers:
        for step in steps:
            trackers.log_scalars(step, {"loss": scale * step, "lr": 0.5 / step})


def test_jsonl_and_tensorboard_hold_what_was_logged(tmp_path):
    image = png(tmp_path / "grid.png")
    with open_trackers(["jsonl", "tensorboard"], tmp_path, run_name="tiny", config=CONFIG, start_step=0) as trackers:
        for step in (1, 2, 3):
            trackers.log_scalars(step, {"loss": 1.0 / step, "psnr/k=4": 20.0 + step})
        trackers.log_image(3, "samples", image)
    assert MetricsLog(tmp_path / "metrics.jsonl").records() == [
        {"step": step, "loss": 1.0 / step, "psnr/k=4": 20.0 + step} for step in (1, 2, 3)]  # no image record
    reader = events(tmp_path)
    assert [(e.step, e.value) for e in reader.Scalars("loss")] == [(s, pytest.approx(1.0 / s)) for s in (1, 2, 3)]
    assert [(e.step, e.value) for e in reader.Scalars("psnr/k=4")] == [(s, pytest.approx(20.0 + s)) for s in (1, 2, 3)]
    [grid] = reader.Images("samples")
    assert (grid.step, grid.width, grid.height) == (3, 10, 6)
    logged = Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB")
    assert np.array_equal(np.asarray(logged), np.asarray(Image.open(image).convert("RGB")))
    [text] = reader.Tensors("config/text_summary")
    assert "lr: 0.001" in text.tensor_proto.string_val[0].decode()


def test_resumed_run_logs_each_redone_step_once(tmp_path):
    log_steps(tmp_path, range(1, 11), start_step=0)
    log_steps(tmp_path, range(6, 8), start_step=5, scale=10.0)  # killed after step 10, resumed from step 5
    records = MetricsLog(tmp_path / "metrics.jsonl").records()
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 60), (7, 70)]
    scalars = events(tmp_path).Scalars("loss")
    assert [(e.step, e.value) for e in scalars] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 60), (7, 70)]


def test_fresh_run_drops_a_killed_first_attempt(tmp_path):
    log_steps(tmp_path, range(1, 4), start_step=0)  # killed before its first checkpoint
    log_steps(tmp_path, range(1, 3), start_step=0, scale=10.0)
    assert [r["loss"] for r in MetricsLog(tmp_path / "metrics.jsonl").records()] == [10, 20]
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("loss")] == [(1, 10), (2, 20)]


def test_unknown_or_repeated_tracker_is_a_config_error(tmp_path):
    known = r"\(known: jsonl, tensorboard, trackio\)"
    with pytest.raises(ConfigError, match=rf"^trackers: unknown tracker 'wandb' {known}$"):
        open_trackers(["jsonl", "wandb"], tmp_path, run_name="tiny", config=CONFIG, start_step=0)
    with pytest.raises(ConfigError, match=r"^trackers: 'jsonl' is listed twice$"):
        open_trackers(["jsonl", "jsonl"], tmp_path, run_name="tiny", config=CONFIG, start_step=0)
    assert not (tmp_path / "metrics.jsonl").exists() and set(TRACKERS) == {"jsonl", "tensorboard", "trackio"}


def test_missing_trackio_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # makes `import trackio` raise ImportError
    command = r"pip install -e '\.\[tracking\]'"
    with pytest.raises(UserError, match=rf"^trackers: 'trackio' needs the trackio package: {command}$"):
        open_trackers(["tensorboard", "trackio"], tmp_path, run_name="tiny", config=CONFIG, start_step=0)


TRACKIO_RUN = """
import json, sys
from pathlib import Path
import trackio
from base.tracking import open_trackers
run_dir, image, out = map(Path, sys.argv[1:4])
with open_trackers(["trackio"], run_dir, run_name="tiny", config={"train": {"lr": 0.001}}, start_step=0) as trackers:
    for step in (1, 2, 3):
        trackers.log_scalars(step, {"loss": 1.0 / step})
    trackers.log_image(3, "samples", image)
project = run_dir.resolve().parent.name
logs = trackio.SQLiteStorage.get_logs(project, "tiny")
[run] = trackio.Api().runs(project)
logs = [{k: v for k, v in log.items() if k in ("step", "loss", "samples")} for log in logs]
out.write_text(json.dumps({"logs": logs, "config": run.config}, default=str))  # trackio prints to stdout too
"""


def require_trackio() -> None:
    """Skip when the optional trackio package is missing, but fail under `CI=true`: CI installs it."""
    if importlib.util.find_spec("trackio") is not None:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail("trackio is not installed, and CI=true: pip install -e '.[tracking]'", pytrace=False)
    pytest.skip("trackio is not installed (pip install -e '.[tracking]')")


def test_trackio_stores_scalars_image_and_config_locally(tmp_path):
    require_trackio()
    store = tmp_path / "store"  # trackio reads TRACKIO_DIR once, at import: a fresh process keeps it here
    env = {**os.environ, "TRACKIO_DIR": str(store), "PYTHONPATH": str(REPO)}
    args = [tmp_path / "runs" / "tiny", png(tmp_path / "grid.png"), tmp_path / "stored.json"]
    done = subprocess.run([sys.executable, "-c", TRACKIO_RUN, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    stored = json.loads((tmp_path / "stored.json").read_text())
    scalars = [(log["step"], log["loss"]) for log in stored["logs"] if "loss" in log]
    assert scalars == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [log["step"] for log in stored["logs"] if "samples" in log] == [3]
    assert stored["config"]["train"] == {"lr": 0.001}
    assert (store / "runs.db").is_file() and list(store.rglob("*.png"))  # the project is the output folder's name


def test_tokenizer_run_writes_tensorboard_events(tmp_path):
    tiny = ["flextok.input=pixels", "flextok.patch_size=4", "data.resolution=16", "data.crops_per_photo=8",
            "data.eval_crops_per_photo=2", "data.eval_images=4", "flextok.num_registers=4", "flextok.dim=32",
            "flextok.decoder_dim=32", "flextok.heads=2", "flextok.decoder_heads=2", "train.batch_size=8",
            "train.steps=2", "train.log_every=1", "train.threads=1", "train.trackers=[jsonl,tensorboard]"]
    cfg = load_config("configs/1d_tiny.yaml", [*tiny, f"out_dir={tmp_path}", "name=tracked"], cls=TokenizerRunConfig)
    TokenizerTrainer(cfg).train()
    reader = events(tmp_path / "tracked")
    scalars = reader.Tags()["scalars"]
    for name in ("loss", "lr", "images_per_s"):
        assert [e.step for e in reader.Scalars(name)] == [1, 2], name
    psnrs = [name for name in scalars if name.startswith("psnr/k=")]
    assert psnrs and all([e.step for e in reader.Scalars(name)] == [2] for name in psnrs)
    [grid] = reader.Images("samples")
    with Image.open(tmp_path / "tracked" / "samples" / "step_0000002.png") as written:
        assert (grid.step, grid.width, grid.height) == (2, *written.size)


def test_a_config_with_an_unknown_or_repeated_tracker_is_one_line_naming_the_key():
    from base.config import load_config
    from flextok.schema import TokenizerRunConfig

    config = Path(__file__).resolve().parents[1] / "configs" / "1d_tiny.yaml"
    for override, problem in (("train.trackers=[jsonl,jsonl]", "'jsonl' is listed twice"),
                              ("train.trackers=[wandb]", "unknown tracker 'wandb'")):
        with pytest.raises(ConfigError, match=rf"'train\.trackers': {problem}") as err:
            load_config(config, [override], cls=TokenizerRunConfig)
        assert "\n" not in str(err.value)
