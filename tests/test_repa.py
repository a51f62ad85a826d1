"""Representation alignment (`repa`): a frozen teacher's patch features (`base.teachers`) pulled into the 1D
tokenizer's decoder (and encoder) and into a grid autoencoder's latents, with teachers made in the test."""

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import fit
from torch import nn

from base.classifier import ClassifierConfig, DatasetClassifier
from base.config import load_config
from base.errors import ConfigError, UserError
from base.schema import SamplingConfig
from base.teachers import Teacher, alignment_loss, load_teacher, resize_features
from flextok import FlexTok
from flextok.model import FlexTokObjective
from flextok.schema import FlexTokConfig, TokenizerRunConfig
from grid.autoencoder import GridAutoencoder
from grid.objectives import GridObjective
from grid.schema import GridConfig, LossConfig, QuantizerConfig, RepaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the entry scripts, for their main([...])

import train_tokenizer  # noqa: E402

# 16x16 pixels in 4x4 patches: a 4x4 patch grid, like a teacher at f4; three decoder blocks (REPA: block 1)
SMALL = dict(input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2, decoder_dim=32,
             decoder_depth=3, decoder_heads=2, quantizer=QuantizerConfig(fsq_levels=[5, 3]), nested_dropout="uniform",
             prefixes_per_example=1,
             sampling=SamplingConfig(steps=2))


def grid_autoencoder(downsample: int = 4, resolution: int = 16) -> GridAutoencoder:
    torch.manual_seed(0)
    cfg = GridConfig(downsample=downsample, latent_channels=4, channels=8, num_res_blocks=0)
    return GridAutoencoder(cfg, resolution=resolution)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[int, str]:
    """Saved grid autoencoders (Hub format) by downsampling factor: f4 gives a 4x4 feature map of a 16x16
    image, f8 a 2x2 one."""
    root = tmp_path_factory.mktemp("teachers")
    return {f: str(grid_autoencoder(f).save_pretrained(root / f"f{f}")) for f in (4, 8)}


def tokenizer(**fields) -> FlexTok:
    torch.manual_seed(0)
    return FlexTok.from_config(FlexTokConfig(**{**SMALL, **fields}), 16)


def images16(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def grads(module: nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


# --- the teacher and the loss ------------------------------------------------------------------------------

def test_a_grid_autoencoder_is_a_teacher_of_its_pre_bottleneck_features(teachers):
    teacher = load_teacher(teachers[4])
    assert isinstance(teacher, Teacher) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    features = teacher.patch_features(images16())
    assert features.shape == (4, 32, 4, 4)  # 4 x channels, at the latent grid's resolution
    head = teacher.encoder.net[-3:]  # the GroupNorm, SiLU and 1x1 conv to the posterior's moments
    assert torch.equal(head(features), teacher.encoder(images16()))


def test_a_saved_dataset_classifier_is_a_teacher(tmp_path):
    torch.manual_seed(0)
    classifier = DatasetClassifier(ClassifierConfig(num_classes=3, width=8, feature_dim=16))
    teacher = load_teacher(str(classifier.save_pretrained(tmp_path / "classifier")))
    assert isinstance(teacher, DatasetClassifier) and not any(p.requires_grad for p in teacher.parameters())
    features = teacher.patch_features(images16())
    assert features.shape == (4, 32, 2, 2)  # its last stage, 4 x width channels at 1/8 of the side
    assert torch.allclose(teacher.features(images16()), teacher.trunk[-3:](features))  # then pooled
    objective = FlexTokObjective(tokenizer(), repa=RepaConfig(weight=1.0, teacher=str(tmp_path / "classifier")))
    torch.manual_seed(0)
    assert 0 < objective(images16(), 0)[1]["repa_loss"] < 2


def test_features_are_resized_to_the_patch_grid():
    fine = torch.arange(32.0).reshape(1, 2, 4, 4)
    pooled = resize_features(fine, 2)  # each patch: the mean of the 2x2 teacher cells it covers
    assert torch.equal(pooled[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    coarse = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    up = resize_features(coarse, 4)
    assert up.shape == (1, 1, 4, 4) and up[0, 0, 0, 0] == 0.0 and up[0, 0, -1, -1] == 3.0
    assert torch.equal(resize_features(fine, 4), fine)


def test_alignment_loss_is_one_minus_the_cosine_per_patch():
    teacher = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    student = teacher.flatten(2).transpose(1, 2)  # [B, 16, 5], raster order
    assert alignment_loss(3 * student, teacher).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert alignment_loss(-student, teacher).item() == pytest.approx(2.0, abs=1e-6)
    # a coarser student grid is compared with the pooled teacher map
    pooled = torch.nn.functional.avg_pool2d(teacher, 2).flatten(2).transpose(1, 2)
    assert alignment_loss(pooled, teacher).item() == pytest.approx(0.0, abs=1e-6)
    shuffled = student[:, torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    assert alignment_loss(shuffled, teacher).item() > 0.5  # patch by patch, in raster order


# --- the 1D tokenizer ---------------------------------------------------------------------------------------

def test_the_decoder_hidden_state_is_the_stream_after_the_chosen_block():
    trunk = tokenizer().decoder.trunk
    g = torch.Generator().manual_seed(0)
    x_t, t, cond = torch.randn(2, 16, 48, generator=g), torch.rand(2, generator=g), torch.randn(2, 8, 32, generator=g)
    streams = []  # the residual adds closing each block (its feed-forward's), in order
    for i in (1, 3, 5):
        trunk.trunk.layers[i][2].register_forward_hook(lambda module, args, out: streams.append(out))
    plain = trunk(x_t, t, cond)
    for layer in (1, 2, 3):
        streams.clear()
        prediction, hidden = trunk(x_t, t, cond, hidden_layer=layer)
        assert torch.equal(prediction, plain)
        assert torch.equal(hidden, streams[layer - 1][:, :16])  # the 16 patch positions, not the 8 registers


def test_weight_zero_is_todays_loss():
    model, images = tokenizer(), images16()
    model.to_target(images)  # fit the target scale outside the compared calls
    results = []
    for repa in (None, RepaConfig(weight=0.0, teacher="/no/such/folder", layer=2, encoder=True)):
        objective = FlexTokObjective(model, repa=repa)
        assert objective.alignment is None  # off: no teacher is read
        torch.manual_seed(5)
        results.append(objective(images, 0))
    (default, logs), (off, off_logs) = results
    assert torch.equal(default, off) and logs == off_logs and "repa_loss" not in logs


def test_repa_adds_a_finite_term_without_changing_the_decoder_loss(teachers):
    model, images = tokenizer(), images16()
    model.to_target(images)
    torch.manual_seed(5)
    base, base_logs = FlexTokObjective(model)(images, 0)
    objective = FlexTokObjective(model, repa=RepaConfig(weight=0.5, teacher=teachers[4]))
    assert objective.repa_layer == 1  # decoder_depth 3 // 3
    torch.manual_seed(5)
    loss, logs = objective(images, 0)
    assert 0 < logs["repa_loss"] < 2 and math.isfinite(logs["repa_loss"])
    assert logs["decoder_loss"] == base_logs["decoder_loss"]  # the same noise, t and keep counts
    assert loss.item() == pytest.approx(base.item() + 0.5 * logs["repa_loss"], rel=1e-6)


def test_gradients_reach_the_aligned_blocks_and_projectors_never_the_teacher(teachers):
    # a fresh decoder's output layer is zero: the flow loss gives its blocks and the encoder no gradient yet,
    # so whatever reaches them here comes from the alignment terms
    model, images = tokenizer(), images16()
    objective = FlexTokObjective(model, repa=RepaConfig(weight=1.0, teacher=teachers[4], layer=2, encoder=True))
    torch.manual_seed(0)
    loss, _ = objective(images, 0)
    loss.backward()
    blocks = model.decoder.trunk.trunk.layers  # attention and feed-forward of each block, in turn
    assert grads(blocks[0]) > 0 and grads(blocks[3]) > 0  # blocks 1 and 2 (layer 2)
    assert grads(blocks[4]) == 0 and grads(blocks[5]) == 0  # block 3 lies past the aligned layer
    assert grads(model.encoder) > 0  # through the registers the aligned blocks attend to, and its patch tokens
    for name in ("decoder", "encoder"):
        assert grads(objective.alignment.projectors[name]) > 0
    teacher = objective.alignment.teacher
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # the trainer's optimizer takes the objective's trainable parameters: the projectors, never the teacher
    trainable = {id(p) for p in objective.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in objective.alignment.projectors.parameters()} <= trainable
    objective.train()
    assert not teacher.training  # frozen in training mode too


def test_the_exported_tokenizer_holds_neither_teacher_nor_projectors(teachers, tmp_path):
    model = tokenizer()
    keys = set(model.state_dict())
    objective = FlexTokObjective(model, repa=RepaConfig(weight=1.0, teacher=teachers[4], encoder=True))
    assert set(objective.model.state_dict()) == keys
    assert {k for k in objective.state_dict() if k.startswith("alignment.")}  # the checkpoint holds them
    folder = model.save_pretrained(tmp_path / "final")
    assert set(FlexTok.from_pretrained(folder).state_dict()) == keys


@pytest.mark.parametrize("teacher_f, patch_size", [(8, 4), (4, 8)])
def test_a_teacher_map_of_another_size_is_resized(teachers, teacher_f, patch_size):
    # a 2x2 teacher map under a 4x4 patch grid, then a 4x4 map under a 2x2 grid
    model = tokenizer(patch_size=patch_size)
    objective = FlexTokObjective(model, repa=RepaConfig(weight=1.0, teacher=teachers[teacher_f]))
    torch.manual_seed(0)
    _, logs = objective(images16(), 0)
    assert math.isfinite(logs["repa_loss"]) and logs["repa_loss"] > 0


@pytest.mark.parametrize("decoder, prediction", [("rectified_flow", "v"), ("diffusion", "eps")])
def test_a_few_steps_lower_the_repa_loss(teachers, decoder, prediction):
    model, images = tokenizer(decoder=decoder, prediction=prediction, prefixes_per_example=2), images16(8)
    objective = FlexTokObjective(model, repa=RepaConfig(weight=1.0, teacher=teachers[4]))

    def repa_loss() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return objective(images, 0)[1]["repa_loss"]

    before = repa_loss()
    torch.manual_seed(0)
    fit(objective, images, steps=30, lr=3e-3)
    assert repa_loss() < 0.7 * before, before  # measured: 1.00 -> 0.47 (flow), 1.00 -> 0.45 (diffusion)


# --- grid autoencoders (VA-VAE style: the latent grid) ----------------------------------------------------

@pytest.mark.parametrize("bottleneck", ["kl", "quantized"])
def test_grid_latents_align_through_a_linear_projector(teachers, bottleneck):
    cfg = dataclasses.replace(grid_autoencoder().config, bottleneck=bottleneck,
                              quantizer=QuantizerConfig(fsq_levels=[5, 5, 5, 5]))
    torch.manual_seed(0)
    model, images, loss_cfg = GridAutoencoder(cfg, resolution=16), images16(), LossConfig(l1=1.0)
    off = GridObjective(model, loss_cfg, repa=RepaConfig(weight=0.0, teacher="/no/such/folder"))
    on = GridObjective(model, loss_cfg, repa=RepaConfig(weight=0.5, teacher=teachers[8]))  # 2x2 vs 4x4 latents
    torch.manual_seed(1)
    base, base_logs = off(images, 0)
    torch.manual_seed(1)
    loss, logs = on(images, 0)
    assert off.alignment is None and "repa_loss" not in base_logs
    assert 0 < logs["repa_loss"] < 2
    assert loss.item() == pytest.approx(base.item() + 0.5 * logs["repa_loss"], rel=1e-6)
    latents = model.encode(images, sample=True)["latents"]  # quantized: straight through the quantizer
    on.repa_loss(images, latents).backward()
    assert grads(model.encoder) > 0 and grads(on.alignment.projectors) > 0
    assert all(p.grad is None for p in on.alignment.teacher.parameters())


# --- errors name the key on one line -------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["repa.weight=-1"], "'repa.weight'"),
    (["repa.weight=1"], "'repa.teacher'"),
    (["repa.layer=0"], "'repa.layer'"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, cls=TokenizerRunConfig)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_missing_teacher_a_non_teacher_and_a_wrong_layer_are_one_line_errors(teachers, tmp_path):
    model = tokenizer()
    with pytest.raises(UserError, match=r"^repa\.teacher: model not found: .*no_such") as err:
        FlexTokObjective(model, repa=RepaConfig(weight=1.0, teacher=str(tmp_path / "no_such")))
    not_a_teacher = str(model.save_pretrained(tmp_path / "tokenizer"))
    with pytest.raises(ConfigError, match=r"^repa\.teacher: .* holds a 'flextok' model, which has no patch_features"):
        FlexTokObjective(model, repa=RepaConfig(weight=1.0, teacher=not_a_teacher))
    with pytest.raises(ConfigError, match=r"^repa\.layer: 4 is not a decoder block \(flextok\.decoder_depth is 3"):
        FlexTokObjective(model, repa=RepaConfig(weight=1.0, teacher=teachers[4], layer=4))
    grid = grid_autoencoder()
    for field, value in (("layer", 1), ("encoder", True)):
        with pytest.raises(ConfigError, match=rf"^repa\.{field}: a grid autoencoder"):
            GridObjective(grid, LossConfig(), repa=RepaConfig(weight=1.0, teacher=teachers[4], **{field: value}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, key", [(["repa.teacher={missing}"], "repa.teacher"),
                                            (["repa.teacher={teacher}", "repa.layer=9"], "repa.layer")])
def test_the_script_exits_2_naming_the_key(teachers, tmp_path, monkeypatch, capsys, overrides, key):
    one_rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in one_rank.items():
        monkeypatch.setenv(name, value)  # a one-rank job, without touching this process's environment for good
    overrides = [o.format(missing=tmp_path / "missing", teacher=teachers[4]) for o in overrides]
    argv = ["--config", str(ROOT / "configs/1d_tiny.yaml"), f"out_dir={tmp_path}", "flextok.input=pixels",
            "flextok.patch_size=4", "train.threads=1", "repa.weight=1", *overrides]
    assert train_tokenizer.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key}:") and "\n" not in err


# --- the plan (train_tokenizer.py --plan) counts the teacher's forward and the projectors ----------------------

def planned(config: str, *overrides: str):
    from flextok.plan import planned_tokenizer, tokenizer_workloads

    cfg = load_config(ROOT / "configs" / config, ["data.resolution=16", *overrides], cls=TokenizerRunConfig)
    parts = planned_tokenizer(cfg)
    return parts, {w.name: w for w in tokenizer_workloads(cfg, parts)}


@pytest.mark.parametrize("config, overrides, rows", [
    ("1d_tiny.yaml", ["flextok.input=pixels", "flextok.patch_size=4", "flextok.prefixes_per_example=2",
                      "repa.encoder=true"], {"decoder": 2 * 16, "encoder": 16}),
    ("grid_kl.yaml", [], {"latents": 16}),
])
def test_the_plan_counts_the_teacher_and_the_projectors(teachers, config, overrides, rows):
    parts, work = planned(config, "repa.weight=1", f"repa.teacher={teachers[4]}", *overrides)
    _, off = planned(config, *overrides)
    teacher = load_teacher(teachers[4])
    real = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in parts.groups["REPA teacher (frozen, objective only)"].parameters()) == real
    assert not any(p.requires_grad for p in parts.groups["REPA teacher (frozen, objective only)"].parameters())
    # the teacher's forward: its convolutions' multiply-adds on one 16x16 image, once, nothing kept
    macs = sum(m.weight[0].numel() * math.prod(out.shape[1:]) for m, out in conv_outputs(teacher))
    assert work["REPA teacher (frozen)"].train_flops == 2 * macs and work["REPA teacher (frozen)"].activations == 0
    projectors = parts.groups["REPA projectors (objective only, not exported)"]
    assert set(projectors) == set(rows)
    for name, n in rows.items():
        weights = sum(m.weight.numel() for m in projectors[name].modules() if isinstance(m, nn.Linear))
        assert work[f"REPA projector ({name})"].forward_flops == 2 * weights * n
    assert set(work) - set(off) == {"REPA teacher (frozen)", *(f"REPA projector ({name})" for name in rows)}


def conv_outputs(teacher: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every Conv2d of the teacher's `patch_features` on one 16x16 image, with its output."""
    seen = []
    handles = [m.register_forward_hook(lambda m, args, out: seen.append((m, out)))
               for m in teacher.modules() if isinstance(m, nn.Conv2d)]
    teacher.patch_features(torch.zeros(1, 3, 16, 16))
    for handle in handles:
        handle.remove()
    return seen


def test_the_plan_names_a_missing_teacher(tmp_path):
    with pytest.raises(UserError, match=r"^repa\.teacher: model not found"):
        planned("1d_tiny.yaml", "flextok.input=pixels", "repa.weight=1", f"repa.teacher={tmp_path / 'none'}")
