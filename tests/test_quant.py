"""Weight quantization (jaxalign.peft.quant): accuracy, packing, NF4 constants, scan slicing."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.peft import quant
from jaxalign.peft.quant import NF4_CODEBOOK, QuantizedWeight, quantize, quantize_array

L, D, F, V = 2, 32, 64, 128


def tiny_params(key=0):
    """A Llama-shaped tree: stacked [L, in, out] kernels, embeddings, norms, lm_head."""
    ks = iter(jax.random.split(jax.random.key(key), 16))
    n = lambda *s: jax.random.normal(next(ks), s) * 0.05  # noqa: E731
    return {
        "model": {
            "embed_tokens": {"embedding": n(V, D)},
            "layers": {
                "self_attn": {"q_proj": {"kernel": n(L, D, D)}, "k_proj": {"kernel": n(L, D, 16)},
                              "v_proj": {"kernel": n(L, D, 16)}, "o_proj": {"kernel": n(L, D, D)}},
                "mlp": {"gate_proj": {"kernel": n(L, D, F)}, "up_proj": {"kernel": n(L, D, F)},
                        "down_proj": {"kernel": n(L, F, D)}},
                "input_layernorm": {"scale": jnp.ones((L, D))},
            },
            "norm": {"scale": jnp.ones((D,))},
        },
        "lm_head": {"kernel": n(D, V)},
    }


def block_absmax(w, block):
    """absmax of each block of `block` rows, broadcast back to w's shape."""
    *lead, rows, out = w.shape
    m = jnp.abs(w.reshape(*lead, rows // block, block, out)).max(-2, keepdims=True)
    return jnp.broadcast_to(m, (*lead, rows // block, block, out)).reshape(w.shape)


@pytest.mark.parametrize("method,block,max_step,max_rel", [
    ("int8", None, 1 / 127, 0.01),                              # per output channel
    ("int8", 32, 1 / 127, 0.01),
    ("int4", 32, 1 / 7, 0.12),
    ("nf4", 64, float(np.diff(NF4_CODEBOOK).max()), 0.10),
])
def test_roundtrip_error_bounds(method, block, max_step, max_rel):
    w = jax.random.normal(jax.random.key(1), (L, 64, 48))
    qw = quantize_array(w, method, block)
    deq = qw.dense()
    assert deq.shape == w.shape and deq.dtype == w.dtype and qw.dense_shape == w.shape
    # every element is within half a quantization step of its block's scale
    bound = block_absmax(w, block or 64) * max_step / 2 * (1 + 1e-5)
    assert bool(jnp.all(jnp.abs(deq - w) <= bound))
    assert float(jnp.linalg.norm(deq - w) / jnp.linalg.norm(w)) < max_rel


def test_storage_layout():
    w = jnp.ones((L, 64, 48))
    i8 = quantize_array(w, "int8")
    assert (i8.q.dtype, i8.q.shape, i8.scales.shape) == (jnp.int8, (L, 64, 48), (L, 1, 48))
    i4 = quantize_array(w, "int4", 32)
    assert (i4.q.dtype, i4.q.shape, i4.scales.shape) == (jnp.uint8, (L, 32, 48), (L, 2, 48))
    nf = quantize_array(w, "nf4", 64, double_quant=True)
    assert (nf.q.shape, nf.scales.dtype, nf.scales2.shape, nf.offset.shape) == \
        ((L, 32, 48), jnp.int8, (L, 1), (L,))


def test_pack_unpack_exact():
    codes = jax.random.randint(jax.random.key(2), (3, 8, 5), 0, 16).astype(jnp.uint8)
    packed = quant._pack4(codes)
    assert packed.shape == (3, 4, 5)
    np.testing.assert_array_equal(quant._unpack4(packed), codes)


@pytest.mark.parametrize("method,levels,scale", [
    ("int8", np.arange(-127, 128, dtype=np.float32), 2.0 ** -7),
    ("int4", np.arange(-7, 8, dtype=np.float32), 0.25),
    ("nf4", NF4_CODEBOOK, 0.5),
])
def test_exact_on_codebook_values(method, levels, scale):
    """Weights that are exactly representable come back bit-for-bit."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(levels), size=(2, 32, 6))
    idx[:, 0, :] = len(levels) - 1            # each block holds the max level: scale is exact
    w = jnp.asarray(levels[idx] * scale)
    np.testing.assert_array_equal(quantize_array(w, method, 32).dense(), w)


def test_nf4_codebook_matches_qlora():
    published = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
    np.testing.assert_array_equal(NF4_CODEBOOK, np.float32(published))
    # and their construction (QLoRA / bitsandbytes create_normal_map, offset 0.9677083):
    ppf, offset = NormalDist().inv_cdf, 0.9677083
    pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    derived = np.sort(pos + [0.0] + neg) / max(pos)
    np.testing.assert_allclose(NF4_CODEBOOK, derived, atol=1e-6)


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_stacked_leaf_under_scan(method):
    """lax.scan slices every child along the layers axis; each slice is one layer's weight."""
    w = jax.random.normal(jax.random.key(3), (3, D, D)) * 0.2
    qw = quantize_array(w, method, 32 if method != "int8" else None, double_quant=True)
    x0 = jax.random.normal(jax.random.key(4), (2, D))

    def step(x, layer):
        assert isinstance(layer, QuantizedWeight) and layer.dense_shape == (D, D)
        return jnp.tanh(layer.linear(x)), None

    out, _ = jax.jit(lambda x, q: jax.lax.scan(step, x, q))(x0, qw)
    ref, dense = x0, qw.dense()
    for i in range(3):
        ref = jnp.tanh(ref @ dense[i])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_double_quant_close_to_single():
    w = jax.random.normal(jax.random.key(5), (L, 256, 64))
    single = quantize_array(w, "nf4", 64)
    double = quantize_array(w, "nf4", 64, double_quant=True)
    np.testing.assert_allclose(double._scales(), single.scales, rtol=0.02)
    err_single = jnp.linalg.norm(single.dense() - w)
    err_double = jnp.linalg.norm(double.dense() - w)
    assert float(err_double) < 1.05 * float(err_single)


def test_linear_in_compute_dtype_matches_dense():
    w = jax.random.normal(jax.random.key(6), (D, F))
    qw = quantize_array(w, "int4", 32)
    x = jax.random.normal(jax.random.key(7), (2, 3, D))
    np.testing.assert_allclose(jax.jit(lambda x, q: q.linear(x))(x, qw), x @ qw.dense(),
                               rtol=1e-5, atol=1e-5)
    y16 = qw.linear(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and y16.shape == (2, 3, F)


def test_backward_recomputes_dequantized_weight():
    """The dequantized [in, out] weight is not kept as a residual for the backward pass."""
    qw = quantize_array(jax.random.normal(jax.random.key(8), (D, F)), "nf4", 32)
    _, vjp = jax.vjp(lambda x: qw.linear(x), jnp.ones((4, D)))
    assert not [r for r in jax.tree.leaves(vjp) if r.shape == (D, F)]


def test_quantize_tree_default_targets():
    params = tiny_params()
    q = quantize(params, "nf4", block_size=32)
    layers = q["model"]["layers"]
    for module in [*layers["self_attn"].values(), *layers["mlp"].values()]:
        assert isinstance(module["kernel"], QuantizedWeight)
    assert q["lm_head"]["kernel"] is params["lm_head"]["kernel"]
    assert q["model"]["embed_tokens"]["embedding"] is params["model"]["embed_tokens"]["embedding"]
    assert q["model"]["norm"]["scale"] is params["model"]["norm"]["scale"]
    deq = quant.dequantize(q)
    assert jax.tree.structure(deq) == jax.tree.structure(params)

    only_q = quantize(params, "int8", targets=["q_proj"])
    assert isinstance(only_q["model"]["layers"]["self_attn"]["q_proj"]["kernel"], QuantizedWeight)
    assert not isinstance(only_q["model"]["layers"]["self_attn"]["k_proj"]["kernel"],
                          QuantizedWeight)
    by_regex = quantize(params, "int8", targets="mlp.*_proj$")
    quantized = {path for path, leaf in quant.leaves_by_path(by_regex).items()
                 if isinstance(leaf, QuantizedWeight)}
    assert quantized == {f"model.layers.mlp.{m}.kernel" for m in ("gate_proj", "up_proj", "down_proj")}


def test_errors_name_the_problem():
    params = tiny_params()
    with pytest.raises(ValueError, match=r"model\.layers\.mlp\.down_proj\.kernel.*\(2, 64, 32\).*48"):
        quantize(params, "int4", block_size=48)
    with pytest.raises(ValueError, match="unknown quantization method 'fp3'"):
        quantize(params, "fp3")
    with pytest.raises(ValueError, match=r"\['qproj'\].*q_proj"):
        quantize(params, "int8", targets=["qproj"])


def test_logical_axes_for():
    qw = quantize_array(jnp.ones((L, D, F)), "nf4", 32, double_quant=True)
    axes = quant.logical_axes_for(qw, ("layers", "embed", "mlp"))
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    pairs = jax.tree.map(lambda a, x: (a, x.shape), axes, qw, is_leaf=is_axes)
    flat = jax.tree.leaves(pairs, is_leaf=is_axes)
    assert flat == [(("layers", "embed", "mlp"), (L, D // 2, F)),
                    (("layers", None, "mlp"), (L, 1, F)),
                    (("layers", None), (L, 1)),
                    (("layers",), (L,))]


def test_load_model_quantizes_while_loading(hf_model):
    """`load_model(quantize=...)` gives the same tree and logits as quantizing after loading,
    sharded or not."""
    import dataclasses

    import jaxalign as ja

    _, path = hf_model("llama", hidden_size=64, intermediate_size=128)
    ids = np.random.RandomState(0).randint(0, 128, (8, 9))
    base = ja.load_model(path)
    for method, block in (("int8", None), ("nf4", 32)):
        loaded = ja.load_model(path, quantize=method, quant_block_size=block, double_quant=method == "nf4")
        after = dataclasses.replace(base, params=ja.quant.quantize(base.params, method, block_size=block,
                                                                   double_quant=method == "nf4"))
        kernel = loaded.params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
        assert isinstance(kernel, ja.quant.QuantizedWeight) and kernel.method == method
        assert not isinstance(loaded.params["lm_head"]["kernel"], ja.quant.QuantizedWeight)
        np.testing.assert_array_equal(loaded.logits(ids), after.logits(ids))
        sharded = ja.load_model(path, quantize=method, quant_block_size=block, double_quant=method == "nf4",
                                mesh=ja.make_mesh((2, 2, 2)))
        ref = np.asarray(loaded.logits(ids))
        assert np.abs(np.asarray(sharded.logits(ids)) - ref).max() <= 1e-5 * np.abs(ref).max()
