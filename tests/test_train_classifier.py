"""`train_classifier.py`: a dataset classifier trained on an experiment's labelled images and saved in the Hub
format, loadable as a REPA teacher; its seed makes it another network than the evaluation's FID backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_classifier
from base.classifier import DatasetClassifier
from base.teachers import load_teacher

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.source=fashion_mnist:/usr/share/datasets/fashion-mnist", "eval.train_images=64",
         "eval.classifier_steps=3", "eval.num_images=16"]


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist")
def test_a_saved_classifier_is_a_teacher_and_its_seed_makes_another_network(tmp_path, capsys):
    for seed in (0, 1):
        assert train_classifier.main(["--config", str(ROOT / "configs/fmnist.yaml"), "--out", str(tmp_path / str(seed)),
                                      *SMALL, f"seed={seed}"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    first, second = (DatasetClassifier.from_pretrained(tmp_path / str(seed)) for seed in (0, 1))
    assert not torch.equal(first.head[1].weight, second.head[1].weight)
    teacher = load_teacher(str(tmp_path / "1"))
    features = teacher.patch_features(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 4 * first.config.width, 4, 4)
    assert "held_out_accuracy" in (tmp_path / "1" / "README.md").read_text()


def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    assert train_classifier.main(["--config", str(ROOT / "configs/fmnist.yaml"), "--out", str(tmp_path),
                                  "eval.classifier_steps=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "classifier_steps" in err
