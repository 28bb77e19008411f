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


def cache_attention_mask(q_valid, q_positions, q_slots, kv_valid, kv_positions, sliding_window=None):
    """Boolean mask [B, 1, T, S] of T new tokens against the S slots of a KV cache.

    q_valid/q_positions [B, T]: the new tokens (real?, position); q_slots [T]: the cache slot
    each new token was written to. kv_valid/kv_positions [B, S]: every slot (new tokens
    included). A query sees valid slots at or before its own slot (causal by slot), within
    the sliding window measured in positions.
    """
    s = kv_valid.shape[1]
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
    mask = causal[None] & kv_valid[:, None, :].astype(bool) & q_valid[:, :, None].astype(bool)
    if sliding_window is not None:
        mask &= (q_positions[:, :, None] - kv_positions[:, None, :]) < sliding_window
    return mask[:, None]


def write_kv_cache(cache_k, cache_v, k, v, layer, start):
    """Write one layer's new k/v [B, T, Hkv, hd] into caches [L, B, S, Hkv, hd] at
    (layer, slots start..start+T); returns (cache_k, cache_v, k_layer, v_layer), the
    updated caches and the layer's full [B, S, Hkv, hd] keys/values. In place under jit."""
    zero = jnp.zeros((), jnp.int32)
    idx = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(start, jnp.int32), zero, zero)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), idx)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), idx)
    k_layer = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
    v_layer = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
    return cache_k, cache_v, k_layer, v_layer
