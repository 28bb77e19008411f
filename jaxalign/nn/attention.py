"""Masked multi-head attention with grouped KV heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(segment_ids, positions, sliding_window=None):
    """Boolean mask [B, 1, T, T]: causal, same segment, both tokens real.

    segment_ids [B, T]: 0 marks padding, equal non-zero ids mark tokens of one example
    (a plain padded batch has ids in {0, 1}; packed rows use 1, 2, ...).
    positions [B, T]: position of each token within its example (for sliding windows).
    """
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, None, :]
    mask = causal[None] & same & real
    if sliding_window is not None:
        mask &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
    return mask[:, None]


def dot_product_attention(q, k, v, mask, implementation=None):
    """q [B, T, Hq, hd], k/v [B, S, Hkv, hd], mask [B, 1, T, S] -> [B, T, Hq, hd].

    Softmax in f32; fully masked rows (padding queries) give finite outputs.
    """
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation=implementation
    )
