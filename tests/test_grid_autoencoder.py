import pytest
import torch
from helpers import fit

from base.metrics import psnr
from flextok import load_tokenizer
from grid.autoencoder import GridAutoencoder
from grid.objectives import GridObjective
from grid.schema import GridConfig, LossConfig, QuantizerConfig

TINY = dict(downsample=4, latent_channels=4, channels=16, num_res_blocks=1)


def overfit(cfg: GridConfig, images: torch.Tensor, steps: int) -> GridAutoencoder:
    model = GridAutoencoder(cfg, resolution=images.shape[-1])
    fit(GridObjective(model, LossConfig(l1=1.0, l2=1.0)), images, steps, lr=3e-3)
    return model.eval()


@pytest.mark.parametrize(
    "bottleneck, quantizer, bar",
    [("kl", "fsq", 20.0), ("quantized", "fsq", 18.0), ("quantized", "vq", 17.0), ("quantized", "lfq", 16.0)],
)
def test_autoencoders_overfit_eight_images(eight_images, bottleneck, quantizer, bar):
    cfg = GridConfig(**TINY, bottleneck=bottleneck, quantizer=QuantizerConfig(kind=quantizer, codebook_size=256))
    model = overfit(cfg, eight_images, steps=150)
    recon = model.detokenize(model.tokenize(eight_images))
    assert psnr(recon, eight_images).mean() > bar


def test_tokenize_shapes_and_bad_tokens(eight_images):
    model = GridAutoencoder(GridConfig(**TINY, bottleneck="quantized"), resolution=16).eval()
    tokens = model.tokenize(eight_images)
    assert len(tokens) == 8 and tokens[0].shape == (16,) and tokens[0].dtype == torch.long
    assert model.detokenize(tokens).shape == eight_images.shape
    bad = [t.clone() for t in tokens]
    bad[3][0] = model.vocab_size
    with pytest.raises(ValueError, match="image 3"):
        model.detokenize(bad)
    with pytest.raises(ValueError, match="image 0"):
        model.detokenize([tokens[0][:5]])
    kl = GridAutoencoder(GridConfig(**TINY), resolution=16).eval()
    assert kl.tokenize(eight_images)[0].shape == (16, 4)


@pytest.mark.parametrize("bottleneck", ["kl", "quantized"])
def test_save_load_round_trip_is_bit_identical(tmp_path, eight_images, bottleneck):
    vq = QuantizerConfig(kind="vq", codebook_size=64)
    model = overfit(GridConfig(**TINY, bottleneck=bottleneck, quantizer=vq), eight_images, 3)
    model.save_pretrained(tmp_path / "ae")
    loaded = load_tokenizer(tmp_path / "ae")
    assert type(loaded) is GridAutoencoder
    a, b = model.detokenize(model.tokenize(eight_images)), loaded.detokenize(loaded.tokenize(eight_images))
    assert torch.equal(a, b)


def test_load_errors(tmp_path):
    from base.errors import UserError

    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    model = GridAutoencoder(GridConfig(**TINY), resolution=16)
    model.save_pretrained(tmp_path / "ae")
    (tmp_path / "ae" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing model.safetensors"):
        load_tokenizer(tmp_path / "ae")
    other = GridAutoencoder(GridConfig(**{**TINY, "channels": 32}), resolution=16)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "ae" / "config.json").read_text())
    with pytest.raises(UserError, match="has shape .*, config.json implies"):
        load_tokenizer(tmp_path / "other")
