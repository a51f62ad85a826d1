import json
import signal

import pytest
import torch

from base.config import load_config
from base.errors import NonFiniteLoss
from base.training import TorchBackend, read_pointer
from flextok import load_tokenizer
from flextok.schema import TokenizerRunConfig
from flextok.training import TokenizerTrainer

TINY = [
    "data.resolution=16", "data.crops_per_photo=4", "data.eval_crops_per_photo=2", "data.eval_images=4",
    "grid.channels=16", "train.batch_size=4", "train.steps=6", "train.log_every=1", "train.eval_every=3",
    "train.checkpoint_every=3", "train.warmup_steps=2",
]


def config(tmp_path, name, extra=()):
    return load_config("configs/grid_vq.yaml", [*TINY, f"out_dir={tmp_path}", f"name={name}", *extra],
                       cls=TokenizerRunConfig)


def saved_state(run_dir):
    """The state file of the run's latest checkpoint."""
    checkpoints = run_dir / "checkpoints"
    return torch.load(checkpoints / read_pointer(checkpoints)["tag"] / TorchBackend.STATE, weights_only=True)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    straight = TokenizerTrainer(config(tmp_path, "straight"))
    straight.train()

    original = TokenizerTrainer.train_step

    def interrupt_at_3(self, images):  # Ctrl-C during step 4: it is finished, saved, then the run stops
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, images)

    monkeypatch.setattr(TokenizerTrainer, "train_step", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        TokenizerTrainer(config(tmp_path, "resumed")).train()
    monkeypatch.setattr(TokenizerTrainer, "train_step", original)
    with pytest.raises(Exception, match="--resume"):
        TokenizerTrainer(config(tmp_path, "resumed"))
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as log:
        log.write('{"step": 4, "loss": 0.1')  # a kill in the middle of a log line: dropped on resume
    TokenizerTrainer(config(tmp_path, "resumed"), resume=True).train()
    # a requeued job always carries --resume, also when it was killed before its first checkpoint
    assert TokenizerTrainer(config(tmp_path, "requeued"), resume=True).step == 0

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 7)) and a == b
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    ma, mb = load_tokenizer(tmp_path / "straight" / "final"), load_tokenizer(tmp_path / "resumed" / "final")
    assert [torch.equal(x, y) for x, y in zip(ma.tokenize(images), mb.tokenize(images))] == [True, True]
    run = tmp_path / "straight"
    assert (run / "config.yaml").is_file() and list((run / "samples").glob("*.png"))
    record = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "psnr" in l][-1]
    assert any(k.startswith("psnr/") for k in record)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = TokenizerTrainer(config(tmp_path, "nan", ["train.checkpoint_every=1"]))
    forward = type(trainer.objective).forward

    def poisoned(self, images, step):
        loss, logs = forward(self, images, step)
        return (loss * float("nan") if step == 2 else loss), logs

    monkeypatch.setattr(type(trainer.objective), "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match="step 2"):
        trainer.train()
    state = saved_state(tmp_path / "nan")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["ema"].values() if v.is_floating_point())


def test_streamed_run_resumes_from_the_stream_position_in_its_checkpoint(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):  # one class per image: 10 images, 2.5 batches per pass
        for i in range(n):
            (tmp_path / "images" / split / f"c{i}").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / split /
                                                                                   f"c{i}" / "x.png")
    stream = [f"data.source=imagefolder:{tmp_path / 'images'}", "data.streaming=true"]
    TokenizerTrainer(config(tmp_path, "straight", stream)).train()

    original = TokenizerTrainer.train_step

    def interrupt_at_3(self, images):  # Ctrl-C during step 4: the checkpoint is of step 4
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, images)

    monkeypatch.setattr(TokenizerTrainer, "train_step", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        TokenizerTrainer(config(tmp_path, "resumed", stream)).train()
    monkeypatch.setattr(TokenizerTrainer, "train_step", original)
    saved = saved_state(tmp_path / "resumed")
    assert saved["step"] == 4 and [position["step"] for position in saved["data"]] == [4]
    assert saved["data"][0]["consumed"] == 16  # one stream position per rank, where step 4 begins
    TokenizerTrainer(config(tmp_path, "resumed", stream), resume=True).train()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 7)) and a == b
