"""Grid autoencoders: 2D latents through a KL (continuous) or quantized (VQ/FSQ/LFQ) bottleneck, the
baselines of every study and the 1D tokenizer's latent space (importing the package registers them for
`base.hub.load_model`)."""

from __future__ import annotations

from .autoencoder import GridAutoencoder

__all__ = ["GridAutoencoder"]
