"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3) as Flax linen modules.

Param names mirror the HF modules (see docs/architecture.md); layers are stacked on a
leading axis and run with `nn.scan`. Weights are used only through `jaxalign.nn.linear`
and `jaxalign.nn.embed`, so LoRA / quantized leaves pass through unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxalign.models.config import ModelConfig
from jaxalign.nn import apply_rope, attention, cos_sin, dot_product_attention, embed, linear, make_mask, rms_norm
from jaxalign.nn.attention import (cache_attention_mask, layer_cache_attention, resolve_impl, write_kv_cache,
                                    write_layer_cache)
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
    def __call__(self, x, cos, sin, mask, attend=None):
        """x [B, T, D] -> [B, T, D].

        mask: an `AttentionMask` (self-attention among the T tokens, with the configured
        kernel). attend: optional `(q, k, v, mask) -> (out [B, T, Hq, hd], extra)` that takes
        the place of that self-attention (the KV-cache layers below; q/k after rope); the call
        then returns `(out [B, T, D], extra)`.
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
        if attend is None:
            return o_proj(attention(q, k, v, mask).reshape(b, t, hq * hd))
        out, extra = attend(q, k, v, mask)
        return o_proj(out.reshape(b, t, hq * hd)), extra


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


def _cached_block(c: ModelConfig, x, cos, sin, mask, attend):
    """The body of `DecoderLayer` with its attention replaced by `attend` -> (out, attend's extra)."""
    a, extra = Attention(c, name="self_attn")(RMSNorm(c.hidden_size, c, name="input_layernorm")(x), cos, sin, mask,
                                              attend)
    h = x + a
    return h + MLP(c, name="mlp")(RMSNorm(c.hidden_size, c, name="post_attention_layernorm")(h)), extra


def _prefill_attend(q, k, v, mask):
    return attention(q, k, v, mask), (k, v)


class PrefillLayer(nn.Module):
    """DecoderLayer (same params) that also returns its new keys/values (after rope) as the
    scan's output: `x -> (out, (k, v))`, k/v [B, T, Hkv, hd]; the T tokens attend to each other only."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        return _cached_block(self.config, x, cos, sin, mask, _prefill_attend)


class StackedCacheLayer(nn.Module):
    """DecoderLayer (same params) decoding against stacked caches [L, B, S, Hkv, hd]: the scan
    carry is `(x, cache_k, cache_v)` and the scanned input is the layer index."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, layer, cos, sin, mask, start):
        x, cache_k, cache_v = carry

        def attend(q, k, v, mask):
            ck, cv, k_all, v_all = write_kv_cache(cache_k, cache_v, k, v, layer, start)
            # XLA: one query row against a cache whose valid slots are scattered (left padding,
            # stopped rows) fits neither cuDNN's lengths nor splash's query tiles.
            return dot_product_attention(q, k_all, v_all, mask), (ck, cv)

        out, (cache_k, cache_v) = _cached_block(self.config, x, cos, sin, mask, attend)
        return (out, cache_k, cache_v), None


class LayerCacheLayer(nn.Module):
    """DecoderLayer (same params) decoding against its own caches (keys [B, Hkv, hd, S], values
    [B, Hkv, S, hd]): `(x, cache_k, cache_v) -> (out, cache_k, cache_v)`; one call per layer (see
    `decode_per_layer`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_k, cache_v, start):
        def attend(q, k, v, mask):
            ck, cv = write_layer_cache(cache_k, k, start, keys=True), write_layer_cache(cache_v, v, start, keys=False)
            return layer_cache_attention(q, ck, cv, mask), (ck, cv)

        out, (cache_k, cache_v) = _cached_block(self.config, x, cos, sin, mask, attend)
        return out, cache_k, cache_v


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


def decode_per_layer() -> bool:
    """Whether KV-cache decoding runs layer by layer over per-layer buffers (XLA:CPU) instead
    of scanning the stacked [L, ...] weights and caches. Decided at trace time.

    XLA:CPU copies a layer's slice out of a stacked array before a matmul reads it, whether
    the index is dynamic (scan) or static: per decode step it copied every layer weight and
    both caches of every layer (on SmolLM2-135M, batch 1, the weight copies alone took more
    time than the matmuls that read them). Per-layer buffers are read in place: the caches
    are kept per layer, the weights split once per `generate` call (`split_layers_shared`:
    views of the stacked buffers, no copy) and the layer loop unrolled (the cost: a decode
    step compiles ~L times as many kernels, a few seconds more on the first call). Elsewhere
    the scan over stacked buffers stays: not measured there, and a split would copy the weights.
    """
    return jax.default_backend() == "cpu"


@struct.dataclass
class KVCache:
    """Keys/values of every layer for B rows and S slots, plus per-slot bookkeeping.

    k, v: stacked [L, B, S, Hkv, hd] arrays, or (`decode_per_layer`) tuples of L per-layer
    arrays, keys [B, Hkv, hd, S] and values [B, Hkv, S, hd]; compute dtype, keys after rope.
    valid [B, S] bool (slot holds a real token); positions [B, S] int32 (rope position of the
    slot's token); length: int32 scalar, slots written so far (all rows share slot indices).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array
    positions: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)


def init_cache(config: ModelConfig, batch: int, max_length: int, per_layer: bool | None = None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens (prompt + generation), with
    per-layer k/v when `per_layer` (default: `decode_per_layer()`)."""
    per_layer = decode_per_layer() if per_layer is None else per_layer
    n, hkv, hd, dtype = config.num_hidden_layers, config.num_key_value_heads, config.head_dim, jnp.dtype(config.dtype)
    if per_layer:
        k = tuple(jnp.zeros((batch, hkv, hd, max_length), dtype) for _ in range(n))
        v = tuple(jnp.zeros((batch, hkv, max_length, hd), dtype) for _ in range(n))
    else:
        k = v = jnp.zeros((n, batch, max_length, hkv, hd), dtype)
    return KVCache(k=k, v=v, valid=jnp.zeros((batch, max_length), bool),
                   positions=jnp.zeros((batch, max_length), jnp.int32), length=jnp.zeros((), jnp.int32))


def split_layers(params):
    """`params` with the stacked layer tree `params["model"]["layers"]` (leaves [L, ...], weight
    types included) replaced by a tuple of the L per-layer trees: what the per-layer decode reads."""
    layers = params["model"]["layers"]
    if isinstance(layers, tuple):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    split = tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))
    return {**params, "model": {**params["model"], "layers": split}}


_split_layers_jit = jax.jit(split_layers)


def split_layers_shared(params):
    """`split_layers(params)` without a copy where the params live on one CPU device: each
    per-layer leaf is put back from a NumPy view of the stacked leaf's host buffer with
    `may_alias`, so it shares that memory (no time, no second copy of the weights). Leaves on
    other devices, or several, are split by a jitted (copying) `split_layers`."""
    layers = params["model"]["layers"]
    leaves, treedef = jax.tree.flatten(layers)

    def on_one_cpu(x):
        return isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 and x.is_fully_addressable and \
            next(iter(x.sharding.device_set)).platform == "cpu"

    if isinstance(layers, tuple) or not all(on_one_cpu(x) for x in leaves):
        return _split_layers_jit(params)
    views = [[jax.device_put(host[i], x.sharding, may_alias=True) for i in range(x.shape[0])]
             for x, host in ((x, np.asarray(x)) for x in leaves)]  # np.asarray: the buffer itself on CPU
    split = tuple(treedef.unflatten([v[i] for v in views]) for i in range(len(views[0])))
    return {**params, "model": {**params["model"], "layers": split}}


def _scanned(layer, config: ModelConfig, in_axes):
    return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=config.num_hidden_layers)(config)


def hidden_states_cached(params, config: ModelConfig, input_ids, valid, positions, cache: KVCache,
                         prefill: bool = False):
    """Run T new tokens (ids/valid/positions [B, T]) through the decoder, writing their k/v to
    cache slots `cache.length ..+T`. Returns (final-norm hidden [B, T, D], updated cache).

    prefill=True for the first call on an empty cache: the T tokens attend only to each other,
    exactly as `Decoder`. Otherwise they attend to every valid slot (causal by slot, within the
    sliding window), layer by layer for a per-layer cache. `params` as stored (stacked layers),
    or for the decode, `split_layers(params)`.
    """
    c = config
    m = params["model"]
    t = input_ids.shape[1]
    x = embed(input_ids, m["embed_tokens"]["embedding"], jnp.dtype(c.dtype))
    cos, sin = cos_sin(positions, c.head_dim, c.rope)
    start = cache.length
    zero = jnp.zeros((), jnp.int32)
    kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool), (zero, start))
    kv_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (zero, start))
    layers = m["layers"]
    if prefill:
        mask = self_attention_mask(c, valid.astype(jnp.int32), positions)
        stack = _scanned(PrefillLayer, c, (nn.broadcast,) * 3)
        x, (ks, vs) = stack.apply({"params": layers}, x, cos, sin, mask)  # ks/vs [L, B, T, Hkv, hd]
        if cache.per_layer:
            k = tuple(write_layer_cache(ck, ks[i], start, keys=True) for i, ck in enumerate(cache.k))
            v = tuple(write_layer_cache(cv, vs[i], start, keys=False) for i, cv in enumerate(cache.v))
        else:
            idx = (zero, zero, start, zero, zero)
            k = jax.lax.dynamic_update_slice(cache.k, ks.astype(cache.k.dtype), idx)
            v = jax.lax.dynamic_update_slice(cache.v, vs.astype(cache.v.dtype), idx)
    else:
        mask = cache_attention_mask(valid, positions, start + jnp.arange(t), kv_valid, kv_pos, c.sliding_window)
        if cache.per_layer:
            if not isinstance(layers, tuple):
                layers = split_layers(params)["model"]["layers"]
            layer = LayerCacheLayer(c)
            k, v = list(cache.k), list(cache.v)
            for i, lp in enumerate(layers):
                x, k[i], v[i] = layer.apply({"params": lp}, x, cos, sin, mask, k[i], v[i], start)
            k, v = tuple(k), tuple(v)
        else:
            stack = _scanned(StackedCacheLayer, c, (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))
            ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
            (x, k, v), _ = stack.apply({"params": layers}, (x, cache.k, cache.v), ids, cos, sin, mask, start)
    cache = KVCache(k=k, v=v, valid=kv_valid, positions=kv_pos, length=start + t)
    return rms_norm(x, m["norm"]["scale"], c.rms_norm_eps), cache


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
