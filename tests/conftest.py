import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def eight_images():
    """Eight 16x16 held-out crops of the embedded photographs (deterministic)."""
    from base.data import load_images
    from base.schema import DataConfig

    return load_images(DataConfig(resolution=16, eval_crops_per_photo=4), "test", limit=8).images


# Tiny models are overhead-bound; one thread is as fast and immune to oversubscription on 2 cores.
torch.set_num_threads(1)
