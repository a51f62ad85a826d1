import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from base.data import StepBatchSampler, load_images, loader_state, to_rgb, train_loader
from base.errors import UserError
from base.schema import DataConfig


def make_folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), "L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (33, 37), dtype=np.uint16)).save(root / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(root / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (20, 1000, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").convert("P").save(root / "palette.png")
    good = (root / "gray.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "I", "1", "CMYK"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (7, 5), (10, 200, 30)).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (7, 5)


def test_odd_images_converted_and_corrupt_skipped(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    # eval_images=0: no held-out slice is carved from this split-less folder, so 'train' is all of it
    cfg = DataConfig(source=f"imagefolder:{folder}", resolution=16, label_column=None, eval_images=0)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable"):
        batch = load_images(cfg, "train", seed=0)
    assert batch.images.shape == (6, 3, 16, 16)
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert len(batch.skipped) == 1


def test_no_usable_image_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match="no usable image"), pytest.warns(UserWarning):
        load_images(DataConfig(source=f"imagefolder:{folder}", resolution=16, label_column=None), "train")


def test_builtin_skimage_is_deterministic_with_disjoint_photos():
    cfg = DataConfig(resolution=16, crops_per_photo=4, eval_crops_per_photo=3)
    a, b = load_images(cfg, "train", seed=1), load_images(cfg, "train", seed=1)
    assert torch.equal(a.images, b.images) and a.images.shape == (24, 3, 16, 16)
    held_out = load_images(cfg, "test", seed=1)
    assert set(held_out.labels.tolist()).isdisjoint(a.labels.tolist())
    assert not torch.equal(load_images(cfg, "train", seed=2).images, a.images)


def test_fashion_mnist_reads_idx(tmp_path):
    import gzip

    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([4, 5, 6]))
    batch = load_images(DataConfig(source=f"fashion_mnist:{tmp_path}", resolution=32), "test")
    assert batch.images.shape == (3, 3, 32, 32) and batch.labels.tolist() == [4, 5, 6]
    padded = load_images(DataConfig(source=f"fashion_mnist:{tmp_path}", resolution=32, pad_to=32), "test")
    expected = torch.from_numpy(images).float().div(127.5).sub(1.0)
    assert torch.allclose(padded.images[:, 0, 2:30, 2:30], expected, atol=1e-6)  # centered, not resized
    assert (padded.images[:, :, :2] == -1).all() and torch.equal(padded.images[:, 0], padded.images[:, 2])

    # the same images as a Hugging Face dataset (a local folder with a test split): the same tensors
    import datasets
    from PIL import Image

    folder = tmp_path / "hf_fmnist"
    folder.mkdir()
    rows = {"image": [Image.fromarray(a, mode="L") for a in images], "label": [4, 5, 6]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(folder / "test.parquet")
    hub = load_images(DataConfig(source=f"hf:{folder}", resolution=32, pad_to=32), "test")
    assert torch.equal(hub.images, padded.images) and hub.labels.tolist() == [4, 5, 6]


def test_unknown_source_and_missing_folder():
    with pytest.raises(UserError, match="unknown source"):
        load_images(DataConfig(source="ftp:x"), "train")
    with pytest.raises(UserError, match="not found"):
        load_images(DataConfig(source="imagefolder:/does/not/exist"), "train")


def test_batches_depend_only_on_seed_and_step():
    full = StepBatchSampler(10, 4, seed=3, start_step=0, end_step=8)
    resumed = StepBatchSampler(10, 4, seed=3, start_step=5, end_step=8)
    assert list(full)[5:] == list(resumed)


def test_train_loader_yields_augmented_batches():
    cfg = DataConfig(resolution=16, crops_per_photo=4)
    batches = list(train_loader(cfg, batch_size=8, seed=0, start_step=0, end_step=3))
    assert len(batches) == 3 and all(b.images.shape == (8, 3, 16, 16) for b in batches)


def test_train_images_keeps_a_seeded_subset_of_the_training_split():
    cfg = DataConfig(resolution=16, crops_per_photo=8, eval_crops_per_photo=2, train_images=10)
    a, b = load_images(cfg, "train", seed=0), load_images(cfg, "train", seed=0)
    assert len(a.images) == 10 and torch.equal(a.images, b.images)
    full = DataConfig(resolution=16, crops_per_photo=8, eval_crops_per_photo=2)
    assert torch.equal(load_images(cfg, "test").images, load_images(full, "test").images)  # held-out: untouched


def test_photos_are_split_by_photograph_and_checked_against_the_manifest(tmp_path, monkeypatch):
    import hashlib
    import json

    from PIL import Image

    import base.data

    monkeypatch.setattr(base.data, "photo_crops_cache_dir", lambda: tmp_path / "crops")

    entries = []
    for i in range(6):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(np.full((80, 96, 3), 40 * i, dtype=np.uint8)).save(path)
        entries.append({"split": "test" if i in (1, 4) else "train", "package": "some-wallpapers", "version": "1",
                        "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = tmp_path / "photos.json"
    manifest.write_text(json.dumps(entries))
    cfg = DataConfig(source=f"photos:{manifest}", resolution=16, crops_per_photo=5, eval_crops_per_photo=3)
    train, test = load_images(cfg, "train"), load_images(cfg, "test")
    # training photographs are classes 0..3 (manifest order), the held-out ones come after them
    assert sorted(set(train.labels.tolist())) == [0, 1, 2, 3] and sorted(set(test.labels.tolist())) == [4, 5]
    assert len(train.images) == 4 * 5 and len(test.images) == 2 * 3
    assert torch.equal(load_images(cfg, "train").images, train.images)  # crops are seeded
    cached = sorted(path.suffix for path in (tmp_path / "crops").iterdir())
    assert cached == [".npz", ".npz"]  # one file per split, no temporary file left
    with monkeypatch.context() as m:  # a second run reads the crops it drew back from the cache
        m.setattr(base.data, "_photo_crops", lambda *a: pytest.fail("crops drawn again"))
        assert torch.equal(load_images(cfg, "train").images, train.images)
    more = dataclasses.replace(cfg, crops_per_photo=6)  # another setting is another cache entry
    assert len(load_images(more, "train").images) == 4 * 6
    (tmp_path / "photo3.png").write_bytes((tmp_path / "photo2.png").read_bytes())
    with pytest.raises(UserError, match="differs from the one in"):
        load_images(cfg, "train")
    (tmp_path / "photo3.png").unlink()
    with pytest.raises(UserError, match="apt-get install some-wallpapers"):
        load_images(cfg, "train")


def test_the_shipped_photo_manifest_holds_out_whole_photographs():
    import json
    from pathlib import Path

    entries = json.loads((Path(__file__).resolve().parents[1] / "data/debian_photos.json").read_text())
    train = {e["sha256"] for e in entries if e["split"] == "train"}
    test = {e["sha256"] for e in entries if e["split"] == "test"}
    assert len(train) >= 20 and len(test) >= 5 and not train & test
    assert all(min(e["width"], e["height"]) >= 1024 and e["licence"] and e["author"] for e in entries)


def write_parquet(path, n: int, seed: int, first_label: int = 0):
    """`n` random 20x24 RGB images (PNG-encoded, as `datasets` stores them) with labels from `first_label`."""
    import datasets

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]
    rows = {"image": images, "label": list(range(first_label, first_label + n))}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(path)
    return path


def save_random_png(path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)


def test_only_the_requested_split_is_read(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    write_parquet(folder / "train.parquet", 12, seed=0)
    write_parquet(folder / "test.parquet", 5, seed=1, first_label=100)
    split_globs = f"parquet:train={folder / 'train.parquet'},test={folder / 'test.parquet'}"
    expected = load_images(DataConfig(source=split_globs, resolution=16), "test")
    assert expected.images.shape == (5, 3, 16, 16) and expected.labels.tolist() == [100, 101, 102, 103, 104]

    (folder / "train.parquet").write_bytes(b"not a parquet file")  # any read of 'train' now fails
    for source in (split_globs, f"hf:{folder}"):  # a new file, so a new `datasets` cache entry
        test = load_images(DataConfig(source=source, resolution=16), "test")
        assert torch.equal(test.images, expected.images) and torch.equal(test.labels, expected.labels)
        with pytest.raises(UserError, match="data.source: cannot load"):
            load_images(DataConfig(source=source, resolution=16), "train")


def test_a_hub_dataset_loads_offline_from_the_datasets_cache(tmp_path, monkeypatch):
    import datasets

    write_parquet(tmp_path / "train.parquet", 6, seed=6)
    write_parquet(tmp_path / "test.parquet", 3, seed=7, first_label=30)
    files = {split: str(tmp_path / f"{split}.parquet") for split in ("train", "test")}
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "build"))
    # where `datasets` keeps a downloaded hub set someone/tiny-set: <cache>/someone___tiny-set/<config>/<version>/
    # <hash>/tiny-set-<split>.arrow
    prepared = next(path.parent for path in (tmp_path / "build").rglob("dataset_info.json"))
    cached = tmp_path / "cache" / "someone___tiny-set" / "default" / prepared.parent.name / prepared.name
    cached.parent.mkdir(parents=True)
    prepared.rename(cached)
    for arrow in cached.glob("parquet-*.arrow"):
        arrow.rename(cached / arrow.name.replace("parquet-", "tiny-set-"))
    (cached / "tiny-set-train.arrow").unlink()  # reading 'train' now fails
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for streaming in (False, True):
        test = load_images(DataConfig(source="hf:someone/tiny-set", resolution=16, streaming=streaming), "test")
        assert test.images.shape == (3, 3, 16, 16) and test.labels.tolist() == [30, 31, 32]
    with pytest.raises(UserError, match="tiny-set-train.arrow"):
        load_images(DataConfig(source="hf:someone/tiny-set", resolution=16), "train")
    with pytest.raises(UserError, match="data.source: cannot load 'someone/absent'"):
        load_images(DataConfig(source="hf:someone/absent", resolution=16), "test")


def test_a_source_without_eval_split_holds_out_a_seeded_slice_of_train(tmp_path):
    write_parquet(tmp_path / "only.parquet", 12, seed=2)
    cfg = DataConfig(source=f"parquet:{tmp_path / 'only.parquet'}", resolution=16, eval_images=4)
    held_out, train = load_images(cfg, "test", seed=3), load_images(cfg, "train", seed=3)
    assert len(held_out.labels) == 4 and len(train.labels) == 8
    assert sorted(held_out.labels.tolist() + train.labels.tolist()) == list(range(12))  # disjoint, complete
    assert torch.equal(load_images(cfg, "test", seed=3).labels, held_out.labels)
    assert not torch.equal(load_images(cfg, "test", seed=4).labels, held_out.labels)
    with pytest.raises(UserError, match="split 'validation' not in"):
        load_images(cfg, "validation")


def test_image_folder_labels_are_numbered_across_all_splits(tmp_path):
    rng = np.random.default_rng(0)
    layout = {"train": ["ant", "cat", "dog"], "test": ["cat", "dog"], "validation": ["dog"]}
    for split, classes in layout.items():
        for name in classes:
            for i in range(2):
                save_random_png(tmp_path / split / name / f"{i}.png", rng)
    cfg = DataConfig(source=f"imagefolder:{tmp_path}", resolution=16)
    # 'test' alone would number cat 0 and dog 1, and 'validation' alone would have no label at all
    assert load_images(cfg, "test").labels.tolist() == [1, 1, 2, 2]
    assert load_images(cfg, "validation").labels.tolist() == [2, 2]
    assert load_images(cfg, "train").labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_streaming_a_local_folder_resumes_exactly(tmp_path):
    # an image folder with one class per image, so that labels name images (a parquet stream would do as well,
    # but `datasets` 5 sleeps 5 s after each pass over a parquet stream)
    rng = np.random.default_rng(4)
    for split, n in (("train", 10), ("test", 3)):
        for i in range(n):
            save_random_png(tmp_path / split / f"c{i}" / "x.png", rng)
    cfg = DataConfig(source=f"imagefolder:{tmp_path}", resolution=16, streaming=True)
    loader, full = train_loader(cfg, batch_size=4, seed=0, start_step=0, end_step=5), []
    for batch in loader:
        full.append(batch)
        if len(full) == 4:  # like a run interrupted while training step 3: its batch is read, not trained on
            saved = checkpointed(loader_state(loader, step=3))
    assert [b.images.shape for b in full] == [(4, 3, 16, 16)] * 5
    epoch_0 = torch.cat([full[0].labels, full[1].labels, full[2].labels[:2]])  # 10 images: 2.5 batches
    assert sorted(epoch_0.tolist()) == list(range(10))
    resumed = list(train_loader(cfg, batch_size=4, seed=0, start_step=3, end_step=5, data_state=saved))
    assert len(resumed) == 2  # step 3 is in epoch 1
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)

    streamed = load_images(cfg, "test", limit=2)
    mapped = load_images(DataConfig(source=f"imagefolder:{tmp_path}", resolution=16), "test", limit=2)
    assert torch.equal(streamed.images, mapped.images) and streamed.labels.tolist() == [0, 1]


def checkpointed(value):
    """`value` after a round trip through a checkpoint file as the trainers write and load them."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def counting_stream(shards: int, per_shard: int, reads: list[int]):
    """A streamed source of `shards` shards of `per_shard` PNG images labelled 0, 1, ...; every row the
    source yields (what a hub stream downloads) is counted in `reads`."""
    import datasets

    rng = np.random.default_rng(5)
    pngs = []
    for _ in range(shards * per_shard):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(out, format="PNG")
        pngs.append(out.getvalue())

    def rows(shard_ids):
        for shard in shard_ids:
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                reads[0] += 1
                yield {"image": pngs[i], "label": i}

    features = datasets.Features({"image": datasets.Value("binary"), "label": datasets.Value("int64")})
    return datasets.IterableDataset.from_generator(rows, features=features,
                                                   gen_kwargs={"shard_ids": list(range(shards))})


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resumed_stream_reads_again_at_most_one_block(monkeypatch, world_size):
    import base.data

    reads = [0]
    monkeypatch.setattr(base.data, "load_source", lambda *args: counting_stream(10, 10, reads))
    monkeypatch.setattr(base.data, "STREAM_SHUFFLE_BLOCK", 16)
    cfg = DataConfig(resolution=16, streaming=True)
    args = dict(batch_size=4 * world_size, seed=1, world_size=world_size)

    def run(start, end, saved=None, keep=()):
        """Every rank's batches of steps [start, end), and every rank's stream position at the steps `keep`."""
        loaders = [train_loader(cfg, start_step=start, end_step=end, rank=r, data_state=saved, **args)
                   for r in range(world_size)]
        batch_iters, batches, kept = [iter(loader) for loader in loaders], [[] for _ in loaders], {}
        for step in range(start, end):
            for rank, batch_iter in enumerate(batch_iters):
                batches[rank].append(next(batch_iter))
            if step + 1 in keep:
                kept[step + 1] = checkpointed([loader.position(step + 1) for loader in loaders])
        return batches, kept

    full, kept = run(0, 40, keep=(22, 30))  # 100 images (50 per rank when two): the run passes epochs
    for step in (22, 30):
        reads[0] = 0
        run(step, step + 1, kept[step])
        # what earlier blocks consumed (88 or 120 images per rank) is not read again: only the current block
        # of 16, and the part of the shard before it, up to a whole shard of 10 (`datasets` reopens a shard by
        # reading it up to the saved row, and a state saved at a shard's end points past its last row)
        assert reads[0] <= world_size * (16 + 10)
        resumed = run(step, 40, kept[step])[0]
        for rank in range(world_size):
            for a, b in zip(full[rank][step:], resumed[rank], strict=True):
                assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    labels = torch.cat([b.labels for rank in full for b in rank[:12]])  # 48 images per rank
    assert len(set(labels.tolist())) == 48 * world_size  # no image twice within an epoch, none shared by ranks

    with pytest.raises(UserError, match="no stream position"):
        train_loader(cfg, start_step=22, end_step=40, **args)
    with pytest.raises(UserError, match=f"saved by {world_size} rank"):
        train_loader(cfg, batch_size=12, seed=1, start_step=22, end_step=40, world_size=3, data_state=kept[22])
