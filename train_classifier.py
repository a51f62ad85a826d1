"""Train the dataset classifier (`base.classifier.DatasetClassifier`) on an experiment's labelled training
images, as the evaluation trains its FID backbone, and save it in the Hub format: a frozen REPA teacher
(`repa.teacher`) that is not the FID backbone (give it another `seed`).

    python train_classifier.py --config configs/fmnist.yaml --out runs/teacher [section.key=value ...]

It trains on `eval.train_images` images of `data.train_split` for `eval.classifier_steps` steps, seeded by
`seed`, and prints its accuracy on `eval.num_images` held-out images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="experiment YAML")
    parser.add_argument("--out", required=True, type=Path, help="folder for the saved classifier")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)

    import torch

    from base.config import load_config
    from base.data import load_images
    from base.errors import UserError
    from base.hub import ModelCardInfo
    from base.runtime import pick_device
    from evaluation.context import classifier_training_set
    from evaluation.dataset_classifier import fit_dataset_classifier
    from evaluation.schema import ExperimentConfig

    try:
        cfg = load_config(args.config, args.overrides, cls=ExperimentConfig)
        device = pick_device(cfg.eval.device, "eval.device")
        images, labels = classifier_training_set(cfg)
        network, key = fit_dataset_classifier(images, labels, int(labels.max()) + 1, cfg.eval.classifier_steps,
                                              cfg.seed, device=device)
        held_out = load_images(cfg.data, cfg.data.eval_split, cfg.eval.num_images, cfg.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = {}
    known = (held_out.labels >= 0) & (held_out.labels < network.num_classes)
    if known.any():
        with torch.no_grad():
            logits = network(held_out.images[known].to(device))
        metrics["held_out_accuracy"] = (logits.argmax(1).cpu() == held_out.labels[known]).float().mean().item()
        print(f"held-out accuracy {metrics['held_out_accuracy']:.1%} on {int(known.sum())} images")
    card = ModelCardInfo(data_source=cfg.data.source, data_split=cfg.data.train_split, num_images=len(labels),
                         resolution=cfg.data.resolution, steps=cfg.eval.classifier_steps, metrics=metrics)
    network.cpu().save_pretrained(args.out, card=card)
    print(f"saved {args.out} (trained on inputs {key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
