"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3) as Flax linen modules.

Param names mirror the HF modules (see docs/architecture.md); layers are stacked on a
leading axis and run with `nn.scan`. Weights are used only through `jaxalign.nn.linear`
and `jaxalign.nn.embed`, so LoRA / quantized leaves pass through unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxalign.models.config import ModelConfig
from jaxalign.nn import apply_rope, attention, cos_sin, dot_product_attention, embed, linear, make_mask, rms_norm
from jaxalign.nn.attention import cache_attention_mask, resolve_impl, write_kv_cache
from jaxalign.nn.seams import dense

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _leaf(module: nn.Module, name: str, init, shape, dtype):
    """A param leaf, returned as stored (arrays or weight types; no shape check on apply)."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init, shape, dtype)


def self_attention_mask(config: ModelConfig, segment_ids, positions):
    """The decoder's `AttentionMask` for the kernel `config.attention_impl` resolves to on this platform."""
    impl = resolve_impl(config.attention_impl, config.dtype, config.head_dim)
    return make_mask(segment_ids, positions, config.sliding_window, impl)


class Linear(nn.Module):
    """`x @ kernel (+ bias)` through the seam; kernel [in, out]."""

    features_in: int
    features_out: int
    use_bias: bool
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        pd = jnp.dtype(self.config.param_dtype)
        init = nn.initializers.normal(self.config.initializer_range)
        kernel = _leaf(self, "kernel", init, (self.features_in, self.features_out), pd)
        bias = _leaf(self, "bias", nn.initializers.zeros, (self.features_out,), pd) if self.use_bias else None
        return linear(x, kernel, bias)


class RMSNorm(nn.Module):
    features: int
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = _leaf(self, "scale", nn.initializers.ones, (self.features,), jnp.dtype(self.config.param_dtype))
        return rms_norm(x, scale, self.config.rms_norm_eps)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None):
        """x [B, T, D] -> [B, T, D].

        mask: an `AttentionMask` (self-attention among the T tokens, with the configured
        kernel). cache: optional `(cache_k, cache_v, layer, start, attend_cache)`: the new
        k/v are written to slots start..start+T of `layer`; with `attend_cache` the queries
        attend to the layer's whole cache (mask: dense bool [B, 1, T, S], XLA), else to the
        new k/v only (prefill, `AttentionMask`). Then returns `(out, cache_k, cache_v)`.
        """
        c = self.config
        b, t, d = x.shape
        hq, hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = Linear(d, hq * hd, c.qkv_bias, c, name="q_proj")(x).reshape(b, t, hq, hd)
        k = Linear(d, hkv * hd, c.qkv_bias, c, name="k_proj")(x).reshape(b, t, hkv, hd)
        v = Linear(d, hkv * hd, c.qkv_bias, c, name="v_proj")(x).reshape(b, t, hkv, hd)
        if c.qk_norm:
            q = RMSNorm(hd, c, name="q_norm")(q)
            k = RMSNorm(hd, c, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o_proj = Linear(hq * hd, d, c.o_bias, c, name="o_proj")
        if cache is None:
            return o_proj(attention(q, k, v, mask).reshape(b, t, hq * hd))
        cache_k, cache_v, layer, start, attend_cache = cache
        cache_k, cache_v, k_all, v_all = write_kv_cache(cache_k, cache_v, k, v, layer, start)
        if attend_cache:
            # Decode: XLA. One query row against a cache whose valid slots are scattered (left
            # padding, stopped rows) fits neither cuDNN's lengths nor splash's query tiles.
            out = dot_product_attention(q, k_all, v_all, mask)
        else:
            out = attention(q, k, v, mask)
        return o_proj(out.reshape(b, t, hq * hd)), cache_k, cache_v


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        gate = Linear(d, f, c.mlp_bias, c, name="gate_proj")(x)
        up = Linear(d, f, c.mlp_bias, c, name="up_proj")(x)
        return Linear(f, d, c.mlp_bias, c, name="down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        c = self.config
        h = x + Attention(c, name="self_attn")(RMSNorm(c.hidden_size, c, name="input_layernorm")(x), cos, sin, mask)
        out = h + MLP(c, name="mlp")(RMSNorm(c.hidden_size, c, name="post_attention_layernorm")(h))
        return out, None


class CachedDecoderLayer(nn.Module):
    """DecoderLayer (same params) that also writes/reads the KV cache; the scan carry is
    `(x, cache_k, cache_v)` and the scanned input is the layer index."""

    config: ModelConfig
    attend_cache: bool

    @nn.compact
    def __call__(self, carry, layer, cos, sin, mask, start):
        c = self.config
        x, cache_k, cache_v = carry
        attn = Attention(c, name="self_attn")
        a, cache_k, cache_v = attn(RMSNorm(c.hidden_size, c, name="input_layernorm")(x), cos, sin, mask,
                                   (cache_k, cache_v, layer, start, self.attend_cache))
        h = x + a
        out = h + MLP(c, name="mlp")(RMSNorm(c.hidden_size, c, name="post_attention_layernorm")(h))
        return (out, cache_k, cache_v), None


class Embed(nn.Module):
    num_embeddings: int
    features: int
    config: ModelConfig

    @nn.compact
    def __call__(self, ids):
        init = nn.initializers.normal(self.config.initializer_range)
        table = _leaf(self, "embedding", init, (self.num_embeddings, self.features), jnp.dtype(self.config.param_dtype))
        return embed(ids, table, jnp.dtype(self.config.dtype))


class Decoder(nn.Module):
    """Embeddings, the scanned layer stack and the final norm: ids -> hidden [B, T, D].

    Its params live under `params["model"]`; the LM head is applied by `unembed`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions, segment_ids):
        c = self.config
        x = Embed(c.vocab_size, c.hidden_size, c, name="embed_tokens")(input_ids)
        cos, sin = cos_sin(positions, c.head_dim, c.rope)
        mask = self_attention_mask(c, segment_ids, positions)
        layer = DecoderLayer
        if c.remat != "none":
            if c.remat not in _REMAT_POLICIES:
                raise ValueError(f"remat policy {c.remat!r} unknown; use one of none, {', '.join(_REMAT_POLICIES)}")
            layer = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
        )
        x, _ = stack(c, name="layers")(x, cos, sin, mask)
        return RMSNorm(c.hidden_size, c, name="norm")(x)


@struct.dataclass
class KVCache:
    """Keys/values of every layer for B rows and S slots, plus per-slot bookkeeping.

    k, v [L, B, S, Hkv, hd] in the compute dtype (keys after rope); valid [B, S] bool
    (slot holds a real token); positions [B, S] int32 (rope position of the slot's
    token); length: int32 scalar, slots written so far (all rows share slot indices).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    positions: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, max_length: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens (prompt + generation)."""
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
    return KVCache(k=zeros, v=zeros, valid=jnp.zeros((batch, max_length), bool),
                   positions=jnp.zeros((batch, max_length), jnp.int32), length=jnp.zeros((), jnp.int32))


class CachedDecoder(nn.Module):
    """Decoder (same params, under `params["model"]`) running T new tokens against a KVCache.

    `prefill=True`: the new tokens attend only to each other (the cache is assumed empty
    before them), exactly as `Decoder`; `prefill=False`: they attend to every valid slot.
    """

    config: ModelConfig
    prefill: bool

    @nn.compact
    def __call__(self, input_ids, valid, positions, cache: KVCache):
        c = self.config
        t = input_ids.shape[1]
        x = Embed(c.vocab_size, c.hidden_size, c, name="embed_tokens")(input_ids)
        cos, sin = cos_sin(positions, c.head_dim, c.rope)
        start = cache.length
        zero = jnp.zeros((), jnp.int32)
        kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool), (zero, start))
        kv_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (zero, start))
        if self.prefill:
            mask = self_attention_mask(c, valid.astype(jnp.int32), positions)
        else:
            mask = cache_attention_mask(valid, positions, start + jnp.arange(t), kv_valid, kv_pos, c.sliding_window)
        stack = nn.scan(
            CachedDecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
        )
        layers = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        (x, k, v), _ = stack(c, not self.prefill, name="layers")((x, cache.k, cache.v), layers, cos, sin, mask, start)
        cache = KVCache(k=k, v=v, valid=kv_valid, positions=kv_pos, length=start + t)
        return RMSNorm(c.hidden_size, c, name="norm")(x), cache


def hidden_states_cached(params, config: ModelConfig, input_ids, valid, positions, cache: KVCache,
                         prefill: bool = False):
    """Run T new tokens (ids/valid/positions [B, T]) through the decoder, writing their k/v to
    cache slots `cache.length ..+T`. Returns (final-norm hidden [B, T, D], updated cache).

    prefill=True for the first call on an empty cache (attention among the T tokens only).
    """
    return CachedDecoder(config, prefill).apply({"params": params["model"]}, input_ids, valid, positions, cache)


def unembed(params, hidden, config: ModelConfig):
    """Logits [..., V] from hidden states [..., D] (tied: the embedding table transposed)."""
    if config.tie_word_embeddings:
        table = dense(params["model"]["embed_tokens"]["embedding"])
        return linear(hidden, table.T)
    return linear(hidden, params["lm_head"]["kernel"])


def hidden_states(params, config: ModelConfig, input_ids, positions, segment_ids):
    """Final-norm hidden states [B, T, D] for ids/positions/segment_ids [B, T]."""
    return Decoder(config).apply({"params": params["model"]}, input_ids, positions, segment_ids)


def init_params(config: ModelConfig, rng) -> dict:
    """Random params (normal(initializer_range) weights, unit norms, zero biases)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    k_model, k_head = jax.random.split(rng)
    params = {"model": Decoder(config).init(k_model, ids, ids, ids + 1)["params"]}
    if not config.tie_word_embeddings:
        init = nn.initializers.normal(config.initializer_range)
        kernel = init(k_head, (config.hidden_size, config.vocab_size), jnp.dtype(config.param_dtype))
        params["lm_head"] = {"kernel": kernel}
    return params
