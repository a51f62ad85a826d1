"""Incremental decoding of a `DiscretePrior` with a preallocated KV cache, one position per call.

At sampling batch sizes the cost is per-op overhead, not FLOPs. x-transformers' own cache path
concatenates the keys and values and re-applies rotary embeddings to the whole past at every step, behind
many Python layers. This decoder reads the same weights and runs each layer as ~10 tensor ops: one
fused q/k/v matmul, rotary on the new position only (an in-place complex multiply), a write into the
cache, attention over the filled part of the cache, the output projection and the MLP. It matches the
full x-transformers forward to float rounding (see tests/test_prior_sampling.py), and refuses a decoder
whose structure it does not know.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from x_transformers.x_transformers import Attention, FeedForward, LayerNorm, Residual

from .discrete import DiscretePrior

__all__ = ["KVCacheDecoder"]


class KVCacheDecoder:
    """Feed ids for position 0, 1, 2, … of a fixed batch; each `step` returns the next-token logits."""

    def __init__(self, prior: DiscretePrior, batch_size: int, max_positions: int):
        net = prior.net
        layers = net.attn_layers
        _check_structure(net)
        weight = net.token_emb.emb.weight
        self.dim = weight.shape[1]
        self.heads = layers.layers[0][1].heads
        self.dim_head = self.dim // self.heads
        self.eps = layers.final_norm.ln.eps
        self.embedding = weight.detach()
        self.blocks = []
        for index in range(0, len(layers.layers), 2):
            (attn_norm, _, _), attn, _ = layers.layers[index]
            (ff_norm, _, _), ff, _ = layers.layers[index + 1]
            up, down = ff.ff[0][0], ff.ff[2]
            self.blocks.append((
                _norm_weight(attn_norm),
                torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach(),
                attn.to_out.weight.detach().t(),  # for addmm: the residual add comes free with the matmul
                _norm_weight(ff_norm),
                up.weight.detach(), up.bias.detach(), down.weight.detach(), down.bias.detach(),
            ))
        self.final_norm = _norm_weight(layers.final_norm)
        self.head = net.to_logits.weight.detach()
        inv_freq = layers.rotary_pos_emb.inv_freq.float()
        self.rotary_pairs = inv_freq.numel()  # rotary covers the first 2 * pairs dims of each head
        angles = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq
        self.rotation = torch.polar(torch.ones_like(angles), angles)  # [T, pairs] complex
        # keys and values side by side, so one copy per layer writes both
        self.cache = weight.new_empty((len(self.blocks), batch_size, 2, self.heads, max_positions, self.dim_head))
        self.batch_size, self.max_positions, self.position = batch_size, max_positions, 0

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids [B] at the next position -> logits [B, V] for the position after it."""
        t = self.position
        if t >= self.max_positions:
            raise IndexError(f"the cache holds {self.max_positions} positions")
        b, h, d = self.batch_size, self.heads, self.dim_head
        x = F.embedding(ids, self.embedding)
        rotation = self.rotation[t]
        pairs = self.rotary_pairs
        for cache, block in zip(self.cache, self.blocks):
            norm1, qkv_weight, out_weight_t, norm2, up_w, up_b, down_w, down_b = block
            qkv = F.linear(F.layer_norm(x, (self.dim,), norm1, None, self.eps), qkv_weight).view(b, 3, h, d)
            torch.view_as_complex(qkv[:, :2, :, : 2 * pairs].unflatten(-1, (pairs, 2))).mul_(rotation)
            cache[:, :, :, t] = qkv[:, 1:]
            past = cache[:, :, :, : t + 1]
            attended = F.scaled_dot_product_attention(qkv[:, 0, :, None], past[:, 0], past[:, 1])
            x = torch.addmm(x, attended.view(b, self.dim), out_weight_t)
            hidden = F.gelu(F.linear(F.layer_norm(x, (self.dim,), norm2, None, self.eps), up_w, up_b))
            x = x + F.linear(hidden, down_w, down_b)
        self.position = t + 1
        return F.linear(F.layer_norm(x, (self.dim,), self.final_norm, None, self.eps), self.head)


def _norm_weight(norm: LayerNorm) -> torch.Tensor:
    return (norm.gamma + float(norm.unit_offset)).detach()


def _check_structure(net) -> None:
    """The decoder above hard-codes DiscretePrior's x-transformers layout; fail loudly on anything else."""
    layers = net.attn_layers
    problems = []
    if tuple(layers.layer_types) != ("a", "f") * (len(layers.layers) // 2):
        problems.append(f"layer types {layers.layer_types}")
    if layers.rotary_pos_emb is None or layers.rotary_pos_emb.scale is not None:
        problems.append("plain rotary embeddings")
    if layers.rotary_pos_emb is not None and layers.rotary_pos_emb.interpolation_factor != 1:
        problems.append("rotary interpolation")
    for (pre, post_branch, post_main), block, residual in layers.layers:
        if not isinstance(pre, LayerNorm) or post_branch is not None or post_main is not None:
            problems.append("pre-norm LayerNorm only")
        if type(residual) is not Residual or residual.residual_scale is not None:
            problems.append("plain residuals")
        if isinstance(block, Attention) and (block.to_q.bias is not None or block.kv_heads != block.heads):
            problems.append("bias-free multi-head attention")
        if isinstance(block, FeedForward) and not isinstance(block.ff[0][1], torch.nn.GELU):
            problems.append("GELU feed-forward")
    if not isinstance(layers.final_norm, LayerNorm) or not isinstance(net.to_logits, torch.nn.Linear):
        problems.append("final LayerNorm and linear head")
    if problems:
        raise TypeError(f"KVCacheDecoder does not support this decoder: needs {', '.join(problems)}")
