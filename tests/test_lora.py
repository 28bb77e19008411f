"""LoRA (jaxalign.peft.lora): the leaf type, tree transforms, trainable split, QLoRA, PEFT format."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.peft import lora, quant
from jaxalign.peft.lora import LoraWeight
from jaxalign.peft.quant import QuantizedWeight
from tests.test_quant import D, L, tiny_params

KEY = jax.random.key(0)


def randomize(params, seed=1, std=0.1):
    """Give every adapter random a and b (fresh adapters have b = 0, i.e. no effect)."""
    leaves = iter(range(1000))

    def one(w):
        if not isinstance(w, LoraWeight):
            return w
        ka, kb = jax.random.split(jax.random.key(seed * 1000 + next(leaves)))
        return w.replace(a=jax.random.normal(ka, w.a.shape) * std,
                         b=jax.random.normal(kb, w.b.shape) * std)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, LoraWeight))


def run_layers(attn, x):
    """x [B, D] through the stacked q_proj kernels with lax.scan (as nn.scan slices them)."""
    def step(h, w):
        return jnp.tanh(w.linear(h) if isinstance(w, (LoraWeight, QuantizedWeight)) else h @ w), None

    return jax.lax.scan(step, x, attn["q_proj"]["kernel"])[0]


def q_params(params):
    return params["model"]["layers"]["self_attn"]


def test_linear_equals_merged_dense_under_scan():
    params = randomize(lora.apply(tiny_params(), 4, 8, ["q_proj"], KEY))
    x = jax.random.normal(jax.random.key(2), (3, D))
    out = jax.jit(run_layers)(q_params(params), x)
    ref = run_layers(q_params(lora.merge(params)), x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    w = q_params(params)["q_proj"]["kernel"]
    layer0 = jax.tree.map(lambda t: t[0], w)
    assert layer0.linear(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    np.testing.assert_allclose(w.dense()[0], w.base[0] + 2.0 * w.a[0] @ w.b[0], rtol=1e-5)


def test_embed_equals_merged_table():
    params = randomize(lora.apply(tiny_params(), 4, 8, ["embed_tokens"], KEY))
    table = params["model"]["embed_tokens"]["embedding"]
    ids = jnp.array([[0, 5, 127]])
    np.testing.assert_allclose(table.embed(ids), jnp.take(table.dense(), ids, axis=0), rtol=1e-5)
    np.testing.assert_array_equal(lora.disable(params)["model"]["embed_tokens"]["embedding"].embed(ids),
                                  jnp.take(table.base, ids, axis=0))


def test_disable_is_the_base_model_without_copies():
    params = randomize(lora.apply(tiny_params(), 4, 8, ["q_proj"], KEY))
    ref = lora.disable(params)
    w, w_ref = q_params(params)["q_proj"]["kernel"], q_params(ref)["q_proj"]["kernel"]
    assert not w_ref.enabled and w_ref.a is w.a and w_ref.b is w.b and w_ref.base is w.base
    x = jax.random.normal(jax.random.key(2), (3, D))
    np.testing.assert_allclose(run_layers(q_params(ref), x),
                               run_layers(q_params(tiny_params()), x), rtol=1e-6)
    assert not np.allclose(run_layers(q_params(params), x), run_layers(q_params(ref), x))
    assert q_params(lora.enable(ref))["q_proj"]["kernel"].enabled


def test_apply_init_scale_and_patterns():
    params = lora.apply(tiny_params(), 8, 16, ["q_proj", "mlp.down_proj"], KEY,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"layers.*down_proj": 4})
    q = q_params(params)["q_proj"]["kernel"]
    down = params["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert (q.a.shape, q.b.shape, q.scale) == ((L, D, 8), (L, 8, D), 2.0)
    assert (down.a.shape, down.b.shape, down.scale) == ((L, 64, 2), (L, 2, D), 2.0)
    assert not isinstance(q_params(params)["k_proj"]["kernel"], LoraWeight)
    assert float(jnp.abs(q.b).max()) == 0.0                       # starts as the base model
    assert 0 < float(jnp.abs(q.a).max()) <= 1 / np.sqrt(D)        # kaiming-uniform bound
    assert not np.allclose(q.a[0], q.a[1])                        # layers initialized independently
    rs = lora.apply(tiny_params(), 4, 8, "all-linear", KEY, use_rslora=True)
    assert q_params(rs)["o_proj"]["kernel"].scale == 4.0          # alpha / sqrt(r)
    assert not isinstance(rs["lm_head"]["kernel"], LoraWeight)


def test_bad_targets_say_what_exists():
    params = tiny_params()
    with pytest.raises(ValueError, match=r"\['q_prj'\].*available modules.*'q_proj'"):
        lora.apply(params, 4, 8, ["q_proj", "q_prj"], KEY)
    with pytest.raises(ValueError, match=r"'attn\.\*qq' match no module.*'v_proj'"):
        lora.apply(params, 4, 8, "attn.*qq", KEY)
    with pytest.raises(ValueError, match="rank_pattern key 'k_proj' matches none"):
        lora.apply(params, 4, 8, ["q_proj"], KEY, rank_pattern={"k_proj": 2})
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.apply(lora.apply(params, 4, 8, ["q_proj"], KEY), 4, 8, ["q_proj"], KEY)


def test_split_combine_round_trip():
    params = lora.apply(tiny_params(), 4, 8, ["q_proj", "v_proj"], KEY)
    mask = lora.trainable_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert sum(jax.tree.leaves(mask)) == 4
    trainable, frozen = lora.split(params)
    assert sorted(x.shape for x in jax.tree.leaves(trainable)) == sorted(
        [(L, D, 4), (L, 4, D), (L, D, 4), (L, 4, 16)])
    back = lora.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def loss_fn(trainable, frozen, x):
    return jnp.sum(run_layers(q_params(lora.combine(trainable, frozen)), x) ** 2)


def test_grads_only_for_adapters():
    params = lora.apply(tiny_params(), 4, 8, ["q_proj"], KEY)
    trainable, frozen = lora.split(params)
    x = jax.random.normal(jax.random.key(3), (3, D))
    grads = jax.jit(jax.grad(loss_fn))(trainable, frozen, x)
    g = q_params(grads)["q_proj"]["kernel"]
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert float(jnp.abs(g.b).max()) > 0 and float(jnp.abs(g.a).max()) == 0  # b = 0 at init
    trainable, frozen = lora.split(randomize(params))
    g = q_params(jax.grad(loss_fn)(trainable, frozen, x))["q_proj"]["kernel"]
    assert float(jnp.abs(g.a).max()) > 0 and float(jnp.abs(g.b).max()) > 0


def test_optimizer_state_only_for_adapters():
    params = lora.apply(tiny_params(), 4, 8, ["q_proj", "v_proj"], KEY)
    trainable, frozen = lora.split(params)
    opt = optax.adamw(1e-2)
    state = opt.init(trainable)
    adapter_shapes = {(L, D, 4), (L, 4, D), (L, 4, 16)}
    assert {x.shape for x in jax.tree.leaves(state)} <= adapter_shapes | {()}
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * sum(
        x.size for x in jax.tree.leaves(trainable)) + 1   # mu, nu and the step count
    x = jax.random.normal(jax.random.key(3), (3, D))
    grads = jax.grad(loss_fn)(trainable, frozen, x)
    updates, state = opt.update(grads, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    assert loss_fn(trainable, frozen, x) < loss_fn(lora.split(params)[0], frozen, x)


def test_qlora_grad_jit_and_no_dequantized_residuals():
    params = lora.apply(quant.quantize(tiny_params(), "nf4", 32), 4, 8, ["q_proj"], KEY)
    w = q_params(params)["q_proj"]["kernel"]
    assert isinstance(w.base, QuantizedWeight) and w.dense_shape == (L, D, D)
    trainable, frozen = lora.split(randomize(params))
    x = jax.random.normal(jax.random.key(4), (3, D))
    grads = jax.jit(jax.grad(loss_fn))(trainable, frozen, x)
    # the same as LoRA on the dequantized dense base
    dense_t, dense_f = lora.split(quant.dequantize(randomize(params)))
    ref = jax.grad(loss_fn)(dense_t, dense_f, x)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    layer0 = jax.tree.map(lambda t: t[0], w)
    _, vjp = jax.vjp(lambda x, a, b: layer0.replace(a=a, b=b).linear(x), x, layer0.a, layer0.b)
    assert not [r for r in jax.tree.leaves(vjp) if r.shape == (D, D)]


def test_merge_quantized_base_dequantizes():
    params = randomize(lora.apply(quant.quantize(tiny_params(), "int8"), 4, 8, ["q_proj"], KEY))
    w = q_params(params)["q_proj"]["kernel"]
    merged = q_params(lora.merge(params))["q_proj"]["kernel"]
    assert isinstance(merged, jax.Array) and merged.dtype == jnp.float32
    np.testing.assert_allclose(merged, w.base.dense() + 2.0 * jnp.matmul(w.a, w.b), rtol=1e-5,
                               atol=1e-6)


def test_dropout_needs_a_key_per_step():
    params = randomize(lora.apply(tiny_params(), 4, 8, ["q_proj"], KEY, dropout=0.5))
    x = jax.random.normal(jax.random.key(5), (3, D))
    no_rng = run_layers(q_params(params), x)
    merged = run_layers(q_params(lora.merge(params)), x)
    np.testing.assert_allclose(no_rng, merged, rtol=1e-5, atol=1e-6)  # no key: no dropout
    with_rng = lora.with_dropout_rng(params, jax.random.key(7))
    assert q_params(with_rng)["q_proj"]["kernel"].dropout_rng.shape == (L,)
    out = jax.jit(run_layers)(q_params(with_rng), x)
    assert not np.allclose(out, no_rng)
    np.testing.assert_array_equal(out, run_layers(q_params(with_rng), x))
    other = run_layers(q_params(lora.with_dropout_rng(params, jax.random.key(8))), x)
    assert not np.allclose(out, other)
    np.testing.assert_array_equal(run_layers(q_params(lora.disable(with_rng)), x),
                                  run_layers(q_params(tiny_params()), x))


def test_logical_axes_for():
    params = lora.apply(quant.quantize(tiny_params(), "nf4", 32), 4, 8, ["q_proj"], KEY)
    w = q_params(params)["q_proj"]["kernel"]
    axes = w.logical_axes(("layers", "embed", "heads"))
    assert axes == lora.logical_axes_for(w, ("layers", "embed", "heads"))
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    flat = jax.tree.leaves(jax.tree.map(lambda a, x: (a, x.shape), axes, w, is_leaf=is_axes),
                           is_leaf=is_axes)
    assert flat == [(("layers", "embed", "heads"), (L, D // 2, D)),
                    (("layers", None, "heads"), (L, 1, D)),
                    (("layers", "embed", None), (L, D, 4)),
                    (("layers", None, "heads"), (L, 4, D))]


def test_adapter_round_trip_and_exact_target_names(tmp_path):
    params = tiny_params()
    params["extra"] = {"q_proj": {"kernel": jnp.ones((D, 8))}}      # a second module named q_proj
    params = randomize(lora.apply(params, 4, 8, "layers.*q_proj", KEY,
                                  alpha_pattern={"q_proj": 6}))
    lora.save_adapter(params, str(tmp_path), base="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny" and (cfg["r"], cfg["lora_alpha"]) == (4, 6)
    assert re.fullmatch(cfg["target_modules"], "model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(cfg["target_modules"], "extra.q_proj")
    loaded = lora.load_adapter(tiny_params() | {"extra": params["extra"]}, str(tmp_path))
    w, v = q_params(params)["q_proj"]["kernel"], q_params(loaded)["q_proj"]["kernel"]
    np.testing.assert_array_equal(v.a, w.a)
    np.testing.assert_array_equal(v.b, w.b)
    assert v.scale == w.scale == 1.5


def test_load_adapter_errors_name_the_tensor(tmp_path):
    lora.save_adapter(lora.apply(tiny_params(), 4, 8, ["v_proj"], KEY), str(tmp_path))
    wide = tiny_params()
    wide["model"]["layers"]["self_attn"]["v_proj"]["kernel"] = jnp.ones((L, D, 24))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.v_proj\.lora_B\.weight \(16, 4\).*out=24"):
        lora.load_adapter(wide, str(tmp_path))
    no_v = tiny_params()
    del no_v["model"]["layers"]["self_attn"]["v_proj"]
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.layers\.\d\.self_attn\.v_proj"
                                         r"\.lora_[AB]\.weight' targets .* not in params"):
        lora.load_adapter(no_v, str(tmp_path))
    three = tiny_params()
    three["model"]["layers"]["self_attn"]["v_proj"]["kernel"] = jnp.ones((3, D, 16))
    with pytest.raises(ValueError, match=r"covers layers \[0, 1\] but params have layers \[0, 1, 2\]"):
        lora.load_adapter(three, str(tmp_path))
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="only safetensors adapters"):
        lora.load_adapter(tiny_params(), str(tmp_path))


# ----------------------------------------------------------------- parity with HF PEFT (torch)

def peft_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


IDS = np.random.RandomState(0).randint(0, 128, (2, 7))


def test_save_adapter_loads_in_peft_with_same_logits(hf_model, tmp_path):
    import peft
    import transformers

    import jaxalign as ja
    _, path = hf_model("llama")
    model = ja.load_model(path, dtype="float32")
    params = randomize(lora.apply(
        model.params, 4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj", "lm_head", "embed_tokens"], KEY,
        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}))
    ours = np.asarray(dataclasses.replace(model, params=params).logits(IDS))
    lora.save_adapter(params, str(tmp_path / "adapter"), base=path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    theirs = peft_logits(peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")), IDS)
    assert not np.allclose(ours, np.asarray(model.logits(IDS)), atol=1e-3)  # adapters matter
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_load_adapter_made_by_peft_gives_same_logits(hf_model, tmp_path):
    import peft
    import torch
    import transformers

    import jaxalign as ja
    _, path = hf_model("llama")
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 2},
                             use_rslora=True, lora_dropout=0.1)
    peft_model = peft.get_peft_model(base, config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    theirs = peft_logits(peft_model, IDS)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = ja.load_model(path, dtype="float32")
    params = lora.load_adapter(model.params, str(tmp_path / "adapter"))
    down = params["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert (down.rank, down.scale, down.dropout) == (2, 8 / np.sqrt(2), 0.1)
    assert q_params(params)["q_proj"]["kernel"].scale == 1.0     # alpha 2 / sqrt(4)
    ours = np.asarray(dataclasses.replace(model, params=params).logits(IDS))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_qlora_params_shard_over_a_mesh(hf_model):
    import jaxalign as ja
    from jaxalign.parallel.rules import named_shardings
    _, path = hf_model("llama")
    model = ja.load_model(path, dtype="float32")
    params = randomize(lora.apply(quant.quantize(model.params, "nf4", 32), 4, 8, "all-linear", KEY))
    mesh = ja.make_mesh(ja.MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jax.device_put(params, named_shardings(params, mesh))
    w = q_params(sharded)["q_proj"]["kernel"]
    P = jax.sharding.PartitionSpec
    assert (w.a.sharding.spec, w.b.sharding.spec, w.base.scales.sharding.spec) == (
        P(None, "fsdp", None), P(None, None, "tensor"), P(None, None, "tensor"))
    ids = np.concatenate([IDS, IDS])
    np.testing.assert_allclose(ja.Model(model.config, sharded, mesh).logits(ids),
                               dataclasses.replace(model, params=params).logits(ids),
                               rtol=1e-5, atol=1e-5)


def test_qlora_trainable_half_shards_when_some_quantized_kernels_have_no_adapter(hf_model):
    """Attention-only adapters on an NF4 model: the MLP's quantized kernels are frozen and
    appear in the trainable half as empty weights; sharding that half must still work."""
    import jaxalign as ja
    from jaxalign.parallel.rules import named_shardings
    _, path = hf_model("llama")
    model = ja.load_model(path, quantize="nf4", quant_block_size=32)
    params = lora.apply(model.params, 4, 8, ["q_proj", "v_proj"], KEY)
    trainable, _ = lora.split(params)
    mesh = ja.make_mesh(ja.MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = named_shardings(trainable, mesh)
    mlp = shardings["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(mlp, QuantizedWeight) and jax.tree.leaves(mlp) == []
    q = shardings["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.a.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
