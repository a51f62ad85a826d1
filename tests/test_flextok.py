
import pytest
import torch
from helpers import fit

from base.guidance import Guidance
from base.metrics import psnr
from base.schema import SamplingConfig
from flextok import FlexTok, load_tokenizer
from flextok.decoders import guided
from flextok.model import FlexTokObjective
from flextok.nested_dropout import (
    apply_nested_dropout,
    powers_of_two_upto,
    sample_keep_counts,
)
from flextok.schema import FlexTokConfig
from grid.schema import QuantizerConfig

SMALL = dict(input="pixels", patch_size=4, num_registers=8, dim=64, depth=2, heads=4, decoder_dim=64,
             decoder_depth=2, decoder_heads=4, sampling=SamplingConfig(steps=6))


def train(cfg: FlexTokConfig, images: torch.Tensor, steps: int, lr: float = 2e-3) -> FlexTok:
    model = FlexTok.from_config(cfg, images.shape[-1])
    fit(FlexTokObjective(model), images, steps, lr)
    return model.eval()


@pytest.fixture(scope="module")
def sixteen_images():
    from base.data import load_images
    from base.schema import DataConfig

    return load_images(DataConfig(resolution=16, crops_per_photo=3), "train", seed=0).images[:16]


@pytest.fixture(scope="module", params=["rectified_flow", "diffusion"])
def trained(request, sixteen_images):
    torch.manual_seed(0)
    # 15 codes per token, so one token cannot single out each of 16 images: more tokens must help
    cfg = FlexTokConfig(**SMALL, quantizer=QuantizerConfig(fsq_levels=[5, 3]), decoder=request.param,
                        nested_dropout="uniform",
                        cond_dropout=0.1, time_logit_mean=1.0)
    return train(cfg, sixteen_images, steps=500)


def test_psnr_rises_with_prefix_length(trained, sixteen_images):
    tokens = trained.tokenize(sixteen_images)
    scores = [psnr(trained.detokenize([t[:k] for t in tokens], seed=0), sixteen_images).mean().item()
              for k in powers_of_two_upto(8)]
    assert all(b >= a - 0.3 for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] > scores[0] + 0.5, scores


def test_adaptive_length_meets_target(trained, sixteen_images):
    full = trained.detokenize(trained.tokenize(sixteen_images), seed=0)
    target = psnr(full, sixteen_images).median().item() - 1.0
    tokens = trained.tokenize(sixteen_images, target_psnr=target)
    lengths = [len(t) for t in tokens]
    recon = trained.detokenize(tokens, seed=0)
    met = psnr(recon, sixteen_images) >= target
    assert all(m or n == 8 for m, n in zip(met.tolist(), lengths))  # met, or fell back to all R tokens
    assert min(lengths) < 8 and met.float().mean() >= 0.5
    # latent/pixel-space MSE targets: a loose one is met by one token, an impossible one needs all R
    assert {len(t) for t in trained.tokenize(sixteen_images, target_mse=1e9)} == {1}
    assert {len(t) for t in trained.tokenize(sixteen_images, target_mse=0.0)} == {8}


def test_variable_lengths_in_one_call_match_uniform_batches(trained, sixteen_images):
    tokens = trained.tokenize(sixteen_images[:3])
    mixed = [tokens[0][:1], tokens[1][:4], tokens[2]]
    together = trained.detokenize(mixed, seed=5)
    # image i keeps noise row i, so each row equals the same row of a batch where every image has its length
    for i, k in enumerate([1, 4, 8]):
        uniform = trained.detokenize([t[:k] for t in tokens], seed=5)
        assert torch.allclose(together[i], uniform[i], atol=1e-5)
    assert torch.equal(trained.detokenize(mixed, seed=5), together)
    assert not torch.equal(trained.detokenize(mixed, seed=6), together)


def test_causality_of_register_codes():
    model = FlexTok.from_config(FlexTokConfig(**SMALL), 16).eval()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    x0 = model.to_target(images)
    before = model.to_code(model.encoder(x0))
    j = 5
    with torch.no_grad():
        model.encoder.registers[j] += torch.randn_like(model.encoder.registers[j])
    after = model.to_code(model.encoder(x0))
    assert torch.allclose(before[:, :j], after[:, :j], atol=1e-6)
    assert not torch.allclose(before[:, j], after[:, j])


def test_nested_dropout_masking_is_exact():
    regs = torch.randn(3, 8, 5)
    mask_token = torch.randn(5)
    keep = torch.tensor([1, 4, 8])
    out = apply_nested_dropout(regs, keep, mask_token)
    for b, k in enumerate(keep.tolist()):
        assert torch.equal(out[b, :k], regs[b, :k])
        assert torch.equal(out[b, k:], mask_token.expand(8 - k, 5))
    counts = sample_keep_counts(1000, 32, "pow2")
    assert set(counts.tolist()) <= {1, 2, 4, 8, 16, 32}
    uniform = sample_keep_counts(5000, 32, "uniform")
    assert uniform.min() == 1 and uniform.max() == 32


def test_guidance_scales_one_and_zero_run_one_branch_and_batched_guidance_is_exact():
    model = FlexTok.from_config(FlexTokConfig(**SMALL), 16).eval()
    trunk = model.decoder.trunk
    torch.nn.init.normal_(trunk.proj_out.weight, std=0.1)  # zero-init output would make this trivial
    x, t = torch.randn(2, 16, 48), torch.rand(2)
    cond, null = torch.randn(2, 8, 64), model.null_condition(2)
    with torch.no_grad():
        assert torch.equal(guided(trunk, x, t, cond, null, Guidance(1.0)), trunk(x, t, cond))
        assert torch.equal(guided(trunk, x, t, cond, null, Guidance(0.0)), trunk(x, t, null))
        separate = trunk(x, t, null) + 3.0 * (trunk(x, t, cond) - trunk(x, t, null))
        assert torch.allclose(guided(trunk, x, t, cond, null, Guidance(3.0)), separate, atol=1e-5)


def test_token_set_decode_ignores_order():
    model = FlexTok.from_config(FlexTokConfig(**SMALL, token_set=True), 16).eval()
    torch.nn.init.normal_(model.decoder.trunk.proj_out.weight, std=0.1)
    tokens = model.tokenize(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert all(torch.equal(t, t.sort().values) for t in tokens)
    shuffled = [t[torch.randperm(len(t))] for t in tokens]
    assert torch.allclose(model.detokenize(tokens, seed=1), model.detokenize(shuffled, seed=1), atol=1e-5)
    with pytest.raises(ValueError, match="image 0"):
        model.detokenize([tokens[0][:3]])


def test_save_load_round_trip_and_bad_tokens(tmp_path, trained, sixteen_images):
    trained.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is FlexTok
    tokens = trained.tokenize(sixteen_images[:4])
    assert all(torch.equal(a, b) for a, b in zip(tokens, loaded.tokenize(sixteen_images[:4])))
    assert torch.equal(trained.detokenize(tokens, seed=3), loaded.detokenize(tokens, seed=3))
    with pytest.raises(ValueError, match="image 1"):
        trained.detokenize([tokens[0], torch.tensor([0, trained.vocab_size])])
    with pytest.raises(ValueError, match="image 0"):
        trained.detokenize([torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="image 0"):
        trained.detokenize([torch.zeros(9, dtype=torch.long)])
    with pytest.raises(ValueError, match="image 0"):
        trained.detokenize([torch.tensor([-1])])
    with pytest.warns(UserWarning, match="resizing"):
        assert len(trained.tokenize(torch.zeros(1, 3, 20, 20))) == 1


def test_latent_input_embeds_the_frozen_autoencoder(tmp_path):
    from grid.autoencoder import GridAutoencoder
    from grid.schema import GridConfig

    ae = GridAutoencoder(GridConfig(channels=16, latent_channels=4), resolution=16)
    ae.save_pretrained(tmp_path / "ae")
    cfg = FlexTokConfig(**{**SMALL, "input": "latents", "patch_size": 1}, autoencoder=str(tmp_path / "ae"))
    model = FlexTok.from_config(cfg, 16)
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    model.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(model.eval().detokenize(model.tokenize(images)), loaded.detokenize(loaded.tokenize(images)))


def test_fingerprint_ignores_default_sampling_settings():
    """Decoding defaults change no weight: a tokenizer keeps its identity (and its priors) when they change."""
    from base.fingerprint import fingerprint_model

    model = FlexTok.from_config(FlexTokConfig(**SMALL), 16).eval()
    decoding = SamplingConfig(steps=2, guidance_scale=3.0)
    other = FlexTok.from_config(FlexTokConfig(**{**SMALL, "sampling": decoding}), 16)
    other.load_state_dict(model.state_dict())
    assert fingerprint_model(other) == fingerprint_model(model)
    with torch.no_grad():
        other.mask_token.add_(1.0)
    assert fingerprint_model(other) != fingerprint_model(model)


def test_all_prefixes_decode_in_one_pass_like_one_pass_per_k(eight_images):
    from flextok import FlexTok
    from flextok.schema import FlexTokConfig
    from grid.schema import QuantizerConfig

    torch.manual_seed(0)
    model = FlexTok.from_config(FlexTokConfig(input="pixels", patch_size=4, num_registers=8, dim=32, depth=1, heads=2,
                                              decoder_dim=32, decoder_depth=1, decoder_heads=2,
                                              quantizer=QuantizerConfig(fsq_levels=[5, 5])), resolution=16).eval()
    torch.nn.init.normal_(model.decoder.trunk.proj_out.weight, std=0.1)  # zero-initialized: would ignore tokens
    tokens = model.tokenize(eight_images)
    together = model.detokenize_prefixes(tokens, [1, 2, 8], seed=3, steps=3, guidance_scale=2.0)
    for k, images in together.items():
        alone = model.detokenize([t[:k] for t in tokens], seed=3, steps=3, guidance_scale=2.0)
        torch.testing.assert_close(images, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[1], together[8])
