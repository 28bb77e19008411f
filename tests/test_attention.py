"""The attention switch: every kernel against the dense XLA path on CPU.

Splash runs in Pallas interpret mode here. cuDNN cannot run on CPU: its arguments
(causal + lengths + left window) go through JAX's XLA implementation of the same call,
which must equal the dense mask at every real query.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign as ja
from jaxalign.config import load_config
from jaxalign.errors import ConfigError
from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import hidden_states, init_params
from jaxalign.nn.attention import (IMPLEMENTATIONS, attention_mask, cudnn_attention, cudnn_form,
                                   dot_product_attention, resolve_impl, splash_attention)
from jaxalign.sampling import generate

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart")

HQ, HKV, HD = 4, 2, 16  # grouped-query attention: 2 query heads per KV head


def positions_of(seg):
    """Positions counting from 0 within each segment (padding: 0)."""
    pos = np.zeros_like(seg)
    for b, row in enumerate(seg):
        for t in range(1, len(row)):
            pos[b, t] = pos[b, t - 1] + 1 if row[t] == row[t - 1] and row[t] > 0 else 0
    return pos


def mixed_batch(t=40):
    """Rows: left padding, packed (3 examples + tail padding), all padding (fully masked), full."""
    seg = np.ones((4, t), np.int32)
    seg[0, :7] = 0
    seg[1, 12:25], seg[1, 25:33], seg[1, 33:] = 2, 3, 0
    seg[2] = 0
    return seg, positions_of(seg)


def right_padded_batch(t=40):
    """Rows of one example from slot 0, then padding (the layout of unpacked training batches)."""
    seg = (np.arange(t)[None] < np.array([[t], [29], [1], [0]])).astype(np.int32)
    return seg, positions_of(seg)


def qkv(b, t, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=(b, t, h, HD)), dtype) for h in (HQ, HKV, HKV))


def dense(q, k, v, seg, pos, window):
    return dot_product_attention(q, k, v, attention_mask(jnp.asarray(seg), jnp.asarray(pos), window))


def real_rows_loss(fn, seg):
    """Sum of squares of the output at real queries (padding outputs are never read)."""
    real = jnp.asarray(seg > 0)[:, :, None, None]
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) ** 2)


def test_auto_picks_the_platform_kernel():
    assert resolve_impl("auto", "bfloat16", 64, on="cuda") == "cudnn"
    assert resolve_impl("auto", "float32", 64, on="cuda") == "xla"  # cuDNN flash attention is bf16/fp16 only
    assert resolve_impl("auto", "bfloat16", 256, on="cuda") == "xla"
    assert resolve_impl("auto", "float32", 64, on="tpu") == "splash"
    assert resolve_impl("auto", "bfloat16", 64, on="gpu") == "xla"  # a GPU that is not NVIDIA
    assert resolve_impl(None, "bfloat16", 64, on="cpu") == resolve_impl("auto", "bfloat16", 64, on="cpu") == "xla"
    assert resolve_impl("auto", "bfloat16", 64) == "xla"  # this machine: CPU
    assert resolve_impl("splash", "float32", 64, on="cpu") == "splash"  # explicit: honoured (interpret mode)


def test_unknown_or_impossible_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of: auto, xla, cudnn, splash"):
        resolve_impl("flash", "float32", 64)
    with pytest.raises(ValueError, match="cudnn needs compute dtype bfloat16 or float16"):
        resolve_impl("cudnn", "float32", 64, on="cuda")
    with pytest.raises(ValueError, match="cudnn needs an NVIDIA GPU"):
        resolve_impl("cudnn", "bfloat16", 64)  # this machine: CPU
    assert resolve_impl("cudnn", "bfloat16", 64, on="cuda") == "cudnn"
    with pytest.raises(ConfigError, match="model.attention_impl='flash' is not valid; choose one of: "
                                          "auto, xla, cudnn, splash"):
        load_config(QUICKSTART + "/sft.yaml", ["model.attention_impl=flash"])
    assert set(IMPLEMENTATIONS) == {"auto", "xla", "cudnn", "splash"}


def test_training_with_a_kernel_this_machine_cannot_run_fails_before_the_run(tmp_path):
    from jaxalign.train.loop import train

    cfg = load_config(QUICKSTART + "/sft.yaml", ["model.attention_impl=cudnn", "model.compute_dtype=bfloat16",
                                                 f"output_dir={tmp_path / 'run'}", "train.steps=2"])
    with pytest.raises(ConfigError, match="attention_impl=cudnn needs an NVIDIA GPU"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("window", [None, 5])
def test_splash_matches_xla(window):
    """GQA, left padding, packed segments, a fully masked row, T not a multiple of 128; grads."""
    seg, pos = mixed_batch()
    q, k, v = qkv(*seg.shape)
    ref = dense(q, k, v, seg, pos, window)
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, jnp.asarray(seg), window))(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)

    g_ref = jax.grad(real_rows_loss(lambda *a: dense(*a, seg, pos, window), seg), argnums=(0, 1, 2))(q, k, v)
    g = jax.jit(jax.grad(real_rows_loss(lambda *a: splash_attention(*a, jnp.asarray(seg), window), seg),
                         argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_cudnn_form_fits_only_one_example_from_slot_zero():
    seg, pos = right_padded_batch()
    lengths, fits = cudnn_form(jnp.asarray(seg), jnp.asarray(pos), sliding_window=5)
    np.testing.assert_array_equal(np.asarray(lengths), [40, 29, 1, 0])
    assert bool(fits)
    seg, pos = mixed_batch()
    assert not bool(cudnn_form(jnp.asarray(seg), jnp.asarray(pos))[1])  # left padding and packing
    left = np.ones_like(seg)
    left[:, :3] = 0
    assert not bool(cudnn_form(jnp.asarray(left), jnp.asarray(positions_of(left)))[1])
    seg, pos = right_padded_batch()
    shifted = pos + (seg > 0)  # positions not counting from 0: a window by slots would differ
    assert bool(cudnn_form(jnp.asarray(seg), jnp.asarray(shifted))[1])
    assert not bool(cudnn_form(jnp.asarray(seg), jnp.asarray(shifted), sliding_window=5)[1])


@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_arguments_equal_the_dense_mask(window):
    """Right-padded rows take the fused call (checked through XLA); its causal + lengths +
    window arguments give the dense mask's output and gradients at real queries, and 0 at
    padding queries (a fully masked row included)."""
    seg, pos = right_padded_batch()
    q, k, v = qkv(*seg.shape)
    fn = jax.jit(lambda q, k, v: cudnn_attention(q, k, v, jnp.asarray(seg), jnp.asarray(pos), window,
                                                implementation="xla"))
    out, ref = np.asarray(fn(q, k, v)), np.asarray(dense(q, k, v, seg, pos, window))
    real = seg > 0
    np.testing.assert_allclose(out[real], ref[real], atol=2e-6)
    assert (out[~real] == 0).all()
    g_ref = jax.grad(real_rows_loss(lambda *a: dense(*a, seg, pos, window), seg), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(real_rows_loss(fn, seg), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_cudnn_falls_back_to_xla_for_layouts_it_cannot_express():
    seg, pos = mixed_batch()
    q, k, v = qkv(*seg.shape)
    out = np.asarray(cudnn_attention(q, k, v, jnp.asarray(seg), jnp.asarray(pos), 5, implementation="xla"))
    ref = np.asarray(dense(q, k, v, seg, pos, 5))
    assert np.abs(ref[seg == 0]).max() > 0.01  # the fused call would give 0 at these padding queries
    np.testing.assert_allclose(out, ref, atol=1e-6)  # padding queries included: the dense path ran


def tiny_config(**kw):
    return ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=HD, **kw)


def test_model_forward_and_grads_through_splash_match_xla():
    """Training and scoring go through the switch: the decoder's hidden states and param
    gradients with splash equal XLA's (packed + padded rows, sliding window)."""
    seg, pos = mixed_batch()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, seg.shape), jnp.int32)
    xla = tiny_config(sliding_window=6, attention_impl="xla")
    params = init_params(xla, jax.random.key(0))

    def loss(params, config):
        h = hidden_states(params, config, ids, jnp.asarray(pos), jnp.asarray(seg))
        return jnp.sum(jnp.where(jnp.asarray(seg > 0)[..., None], h, 0.0) ** 2), h

    (l_ref, h_ref), g_ref = jax.value_and_grad(loss, has_aux=True)(params, xla)
    splash = dataclasses.replace(xla, attention_impl="splash")
    (l_sp, h_sp), g_sp = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, splash)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(h_sp)[real], np.asarray(h_ref)[real], atol=1e-4)
    np.testing.assert_allclose(float(l_sp), float(l_ref), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_sp), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_generate_with_splash_prefill_matches_xla():
    """The sampler's prefill (left-padded prompts) runs the configured kernel; decode runs XLA."""
    config = tiny_config(sliding_window=4, attention_impl="xla")
    params = init_params(config, jax.random.key(2))
    ids = np.random.default_rng(3).integers(3, 64, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :3] = mask[2, :1] = 0
    outs = [generate(ja.Model(dataclasses.replace(config, attention_impl=impl), params), ids * mask, mask,
                     jax.random.key(0), max_new_tokens=5, greedy=True, eos_token_ids=(), pad_token_id=0)
            for impl in ("xla", "splash")]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-4)
