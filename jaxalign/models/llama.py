"""The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3) as Flax linen modules.

Param names mirror the HF modules (see docs/architecture.md); layers are stacked on a
leading axis and run with `nn.scan`. Weights are used only through `jaxalign.nn.linear`
and `jaxalign.nn.embed`, so LoRA / quantized leaves pass through unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.config import ModelConfig
from jaxalign.nn import apply_rope, attention_mask, cos_sin, dot_product_attention, embed, linear, rms_norm
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
    def __call__(self, x, cos, sin, mask):
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
        out = dot_product_attention(q, k, v, mask, c.attention_impl).reshape(b, t, hq * hd)
        return Linear(hq * hd, d, c.o_bias, c, name="o_proj")(out)


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
        mask = attention_mask(segment_ids, positions, c.sliding_window)
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
