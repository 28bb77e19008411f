"""The loss math and the jitted step: chunked log-probs, packing, accumulation, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign as ja
from jaxalign.algos.logprobs import label_logprobs, token_logprobs
from jaxalign.algos.sft import sft_sums
from jaxalign.config import OptimSection
from jaxalign.models.llama import hidden_states, unembed
from jaxalign.train.optim import make_optimizer
from jaxalign.train.step import accumulate, init_state, make_train_step

CFG = ja.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2)


def model(seed=0, **kw):
    return ja.init_model(dataclasses.replace(CFG, **kw), jax.random.key(seed))


def padded_batch(rows, t, loss_from=None):
    """Right-padded batch from lists of ids; loss on tokens at index >= loss_from[i]."""
    b = len(rows)
    ids = np.zeros((b, t), np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    lm = np.zeros((b, t), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        seg[i, : len(r)] = 1
        pos[i, : len(r)] = np.arange(len(r))
        lm[i, (loss_from[i] if loss_from else 1) : len(r)] = 1
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": lm, "attention_mask": (seg > 0).astype(np.int32)}


def test_chunked_logprobs_equal_naive_log_softmax():
    m = model()
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 96, (3, 21))
    pos = np.tile(np.arange(21), (3, 1))
    seg = np.ones((3, 21), np.int32)
    h = hidden_states(m.params, m.config, ids, pos, seg)
    labels = rng.randint(0, 96, (3, 21))
    naive = jax.nn.log_softmax(unembed(m.params, h, m.config).astype(jnp.float32), -1)
    naive = np.take_along_axis(np.asarray(naive), labels[..., None], -1)[..., 0]
    logits = np.asarray(unembed(m.params, h, m.config), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    naive_entropy = -(probs * np.log(probs)).sum(-1)
    for chunk in (None, 4, 7, 21, 64):  # None: one piece (the logits fit the budget)
        logp, ent, correct = label_logprobs(m.params, m.config, h, labels, chunk_size=chunk)
        np.testing.assert_allclose(logp, naive, atol=1e-5)
        np.testing.assert_allclose(ent, naive_entropy, atol=1e-5)
        np.testing.assert_array_equal(correct, logits.argmax(-1) == labels)

    # Gradients (hidden states and LM head) through the one-piece and rematerialized
    # chunked paths equal the naive ones too.
    def naive_loss(params, hh):
        return jnp.take_along_axis(jax.nn.log_softmax(unembed(params, hh, m.config), -1), labels[..., None], -1).sum()

    g_naive = jax.grad(naive_loss, argnums=(0, 1))(m.params, h)
    for chunk in (None, 4):
        g = jax.grad(lambda p, hh: label_logprobs(p, m.config, hh, labels, chunk_size=chunk)[0].sum(),
                     argnums=(0, 1))(m.params, h)
        np.testing.assert_allclose(g[1], g_naive[1], atol=1e-5)
        np.testing.assert_allclose(g[0]["lm_head"]["kernel"], g_naive[0]["lm_head"]["kernel"], atol=1e-5)


def test_ties_with_the_label_count_as_wrong():
    """A collapsed model (every logit equal, e.g. after a blown-up run) predicts nothing:
    with ties counted as correct it had token accuracy and exact match 1.0."""
    m = model()
    params = {**m.params, "lm_head": {"kernel": jnp.zeros_like(m.params["lm_head"]["kernel"])}}
    batch = jax.tree.map(jnp.asarray, padded_batch([[1, 2, 3, 4], [5, 6, 7]], 8, loss_from=[2, 1]))
    for chunk in (None, 3):
        sums = sft_sums(params, m.config, batch, chunk)
        assert float(sums["token_accuracy"][0]) == 0 and float(sums["token_accuracy"][1]) == 4
        assert float(sums["exact_match"][0]) == 0 and float(sums["exact_match"][1]) == 2
    # A unique largest logit at the label still counts.
    h = jnp.ones((1, 2, CFG.hidden_size))
    kernel = jnp.zeros((CFG.hidden_size, CFG.vocab_size)).at[:, 5].set(1.0)
    _, _, correct = label_logprobs({**params, "lm_head": {"kernel": kernel}}, m.config, h, jnp.array([[5, 6]]))
    assert correct.tolist() == [[True, False]]


def test_linear_seam_backward_equals_autodiff_of_dot():
    """`linear` on plain arrays has a hand-written backward pass; it must give autodiff's numbers."""
    from jaxalign.nn import linear

    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(3, 5, 8), jnp.float32)
    w = jnp.asarray(rng.randn(8, 6), jnp.float32)
    b = jnp.asarray(rng.randn(6), jnp.float32)
    cot = jnp.asarray(rng.randn(3, 5, 6), jnp.float32)

    def ours(x, w, b):
        return jnp.sum(jnp.tanh(linear(x, w, b)) * cot)

    def reference(x, w, b):
        return jnp.sum(jnp.tanh(jnp.dot(x, w) + b) * cot)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, w, b)
    want = jax.grad(reference, argnums=(0, 1, 2))(x, w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # bf16 compute on f32 masters: the weight gradient arrives in f32 through the cast.
    gw = jax.grad(lambda w: ours(x.astype(jnp.bfloat16), w, b).astype(jnp.float32))(w)
    assert gw.dtype == jnp.float32
    np.testing.assert_allclose(gw, want[1], rtol=0.05, atol=0.05 * float(jnp.abs(want[1]).max()))


def test_linear_backward_barrier_is_cpu_only(monkeypatch):
    """The optimization barrier in `linear`'s backward pass is traced on the CPU backend only."""
    from jaxalign.nn import linear

    grad = jax.grad(lambda x, w: jnp.sum(jnp.sin(linear(x, w))), argnums=(0, 1))
    x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
    assert "optimization_barrier" in str(jax.make_jaxpr(grad)(x, w))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, w = jnp.ones((2, 5)), jnp.ones((5, 3))  # new shapes: traced afresh, not from JAX's trace cache
    assert "optimization_barrier" not in str(jax.make_jaxpr(grad)(x, w))


def test_packed_rows_match_unpacked_examples():
    m = model(1)
    a, b = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]
    unpacked = padded_batch([a, b], 12, loss_from=[2, 3])
    ref = [float(sft_sums(m.params, m.config, {k: v[i : i + 1] for k, v in unpacked.items()})["loss"][0]) for i in range(2)]
    packed = {
        "input_ids": np.array([a + b], np.int32),
        "segment_ids": np.array([[1] * 5 + [2] * 7], np.int32),
        "positions": np.array([list(range(5)) + list(range(7))], np.int32),
        "loss_mask": np.array([[0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 1]], np.int32),
    }
    logp, _, _ = token_logprobs(m.params, m.config, packed)
    per_token = -np.asarray(logp)[0]
    # targets of example a: tokens 2..4 predicted at 1..3; of b: tokens 8..11 predicted at 7..10
    np.testing.assert_allclose([per_token[1:4].sum(), per_token[7:11].sum()], ref, rtol=1e-5)
    total = float(sft_sums(m.params, m.config, packed)["loss"][0])
    np.testing.assert_allclose(total, sum(ref), rtol=1e-5)


def test_packed_segments_do_not_attend_to_each_other():
    m = model(2)
    a, b = [5, 6, 7, 8], [10, 11, 12]
    seg = np.array([[1] * 4 + [2] * 3], np.int32)
    pos = np.array([list(range(4)) + list(range(3))], np.int32)
    h1 = hidden_states(m.params, m.config, np.array([a + b]), pos, seg)
    h2 = hidden_states(m.params, m.config, np.array([[50, 51, 52, 53] + b]), pos, seg)
    np.testing.assert_allclose(h1[:, 4:], h2[:, 4:], atol=1e-6)  # b unaffected by a's tokens
    alone = hidden_states(m.params, m.config, np.array([b]), pos[:, :3], np.ones((1, 3), np.int32))
    np.testing.assert_allclose(h1[:, 4:], alone, atol=1e-5)


def _loss_fn(params, batch, rng):
    return sft_sums(params, CFG, batch, chunk_size=8)


def _relative_error(g1, g2):
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
    return (diff / sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(g1))) ** 0.5


@pytest.mark.parametrize("dtype,tolerance", [("float64", 1e-6), ("float32", 1e-5)])
def test_gradient_accumulation_equals_full_batch(dtype, tolerance):
    """K microbatches of B/K give the gradients of one batch of B: exact math (checked in f64
    to 1e-6 relative), f32 rounding aside."""
    rng = np.random.RandomState(1)
    rows = [list(rng.randint(1, 96, rng.randint(4, 16))) for _ in range(8)]
    with jax.enable_x64(dtype == "float64"):
        cfg = dataclasses.replace(CFG, dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype), model(3).params)
        batch = jax.tree.map(jnp.asarray, padded_batch(rows, 16, loss_from=[2] * 8))
        loss_fn = lambda p, b, r: sft_sums(p, cfg, b, chunk_size=8)  # noqa: E731
        ident = lambda p, _: p  # noqa: E731
        g1, s1 = accumulate(loss_fn, ident, params, None, batch, jax.random.key(0), 1)
        g4, s4 = accumulate(loss_fn, ident, params, None, batch, jax.random.key(0), 4)
        assert float(s1["loss"][1]) == float(s4["loss"][1])
        np.testing.assert_allclose(float(s1["loss"][0]), float(s4["loss"][0]), rtol=tolerance)
        assert _relative_error(g1, g4) <= tolerance


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_training_follows_single_device_losses(shape):
    rng = np.random.RandomState(2)
    batches = [padded_batch([list(rng.randint(1, 96, rng.randint(4, 16))) for _ in range(8)], 16, [2] * 8) for _ in range(4)]
    optimizer, schedule = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=1), 4)

    def run(mesh):
        from jaxalign.train.loop import to_global, train_state_shardings

        m = ja.init_model(CFG, jax.random.key(4), mesh=mesh)
        if mesh is None:
            state = init_state(m.params, optimizer, 0)
            step = jax.jit(make_train_step(_loss_fn, optimizer, schedule, lambda p, _: p))
            feed = lambda b: jax.tree.map(jnp.asarray, b)  # noqa: E731
        else:
            sh = train_state_shardings(m.params, optimizer, mesh)
            state = jax.jit(lambda p: init_state(p, optimizer, 0), out_shardings=sh)(m.params)
            step = jax.jit(make_train_step(_loss_fn, optimizer, schedule, lambda p, _: p),
                           in_shardings=(sh, None, None), out_shardings=(sh, None), donate_argnums=0)
            feed = lambda b: to_global(b, mesh)  # noqa: E731
        losses = []
        for b in batches:
            state, metrics = step(state, None, feed(b))
            losses.append(float(metrics["loss"]))
        return losses

    single = run(None)
    sharded = run(ja.make_mesh(shape))
    assert single[-1] < single[0]
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


def test_nonfinite_step_is_not_applied():
    m = model(5)
    optimizer, schedule = make_optimizer(OptimSection(learning_rate=1e-2), 4)
    batch = jax.tree.map(jnp.asarray, padded_batch([[1, 2, 3, 4]], 8))

    def nan_loss(params, b, rng):
        sums = _loss_fn(params, b, rng)
        return {**sums, "loss": (sums["loss"][0] * jnp.nan, sums["loss"][1])}

    state = init_state(m.params, optimizer, 0)
    new, metrics = jax.jit(make_train_step(nan_loss, optimizer, schedule, lambda p, _: p))(state, None, batch)
    assert int(metrics["finite"]) == 0
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == 1


def test_lora_training_updates_only_adapters():
    from jaxalign.train.loop import partition_params

    m = model(6)
    params = ja.lora.apply(m.params, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], rng=jax.random.key(1))
    trainable, frozen, combine = partition_params(params)
    optimizer, schedule = make_optimizer(OptimSection(learning_rate=1e-2), 3)
    state = init_state(trainable, optimizer, 0)
    adapter_sizes = sorted(x.size for x in jax.tree.leaves(trainable))
    moment_sizes = sorted(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moment_sizes == sorted(adapter_sizes * 2)  # Adam's mu and nu, adapters only
    step = jax.jit(make_train_step(_loss_fn, optimizer, schedule, combine))
    rng = np.random.RandomState(3)
    losses = []
    for _ in range(3):
        batch = jax.tree.map(jnp.asarray, padded_batch([list(rng.randint(1, 96, 10)) for _ in range(4)], 12))
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    after = combine(state.params, frozen)
    base_before = jax.tree.leaves(ja.lora.disable(params))
    base_after = jax.tree.leaves(ja.lora.disable(after))
    changed = 0
    for path_leaf_before, path_leaf_after in zip(jax.tree_util.tree_leaves_with_path(params),
                                                 jax.tree_util.tree_leaves_with_path(after)):
        (path, before), (_, now) = path_leaf_before, path_leaf_after
        name = jax.tree_util.keystr(path)
        if name.endswith(".a") or name.endswith(".b"):
            changed += int(not np.array_equal(before, now))
        else:
            np.testing.assert_array_equal(before, now, err_msg=f"frozen leaf {name} changed")
    assert changed == 6  # a and b of the three targets moved
    assert len(base_before) == len(base_after)
