"""Sharded loading and forward on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxalign as ja
from jaxalign.parallel import partition_specs
from tests.test_models import batch


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_equals_single_device(hf_model, shape):
    _, path = hf_model("llama", num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    ids, mask, _ = batch(b=8)
    ref = np.asarray(ja.load_model(path).logits(ids, mask))
    mesh = ja.make_mesh(shape)
    model = ja.load_model(path, mesh=mesh)
    out = model.logits(ids, mask)
    assert out.sharding.spec[0] == ("data", "fsdp") or out.sharding.spec[0] in ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_shard_shapes_follow_the_rules(hf_model):
    _, path = hf_model("qwen2", tie_word_embeddings=False)
    mesh = ja.make_mesh((2, 2, 2))
    model = ja.load_model(path, mesh=mesh)
    layers = model.params["model"]["layers"]
    q = layers["self_attn"]["q_proj"]["kernel"]  # [L, D, Hq*hd] = [2, 32, 32]: (layers, embed->fsdp, heads->tensor)
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 16, 16)
    down = layers["mlp"]["down_proj"]["kernel"]  # [2, 64, 32]: (layers, mlp->tensor, embed->fsdp)
    assert down.addressable_shards[0].data.shape == (2, 32, 16)
    emb = model.params["model"]["embed_tokens"]["embedding"]  # [128, 32]: (vocab->tensor, embed->fsdp)
    assert emb.addressable_shards[0].data.shape == (64, 16)
    head = model.params["lm_head"]["kernel"]  # [32, 128]: (embed->fsdp, vocab->tensor)
    assert head.addressable_shards[0].data.shape == (16, 64)
    bias = layers["self_attn"]["k_proj"]["bias"]  # [2, 16]: (layers, kv_heads->tensor)
    assert bias.addressable_shards[0].data.shape == (2, 8)
    norm = layers["input_layernorm"]["scale"]
    assert norm.sharding.spec == P(None, None) and norm.addressable_shards[0].data.shape == (2, 32)
    specs = partition_specs(model.params, mesh)
    for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)), jax.tree.leaves(model.params)):
        assert leaf.sharding.spec == spec
        expected = tuple(
            dim // (int(np.prod([mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax)])) if ax else 1)
            for dim, ax in zip(leaf.shape, tuple(spec) + (None,) * (leaf.ndim - len(spec)))
        )
        assert leaf.addressable_shards[0].data.shape == expected


def test_loader_reads_only_shards(hf_model, monkeypatch):
    """Each device's callback receives only its slice (the model is never assembled whole first)."""
    _, path = hf_model("llama")
    seen = []
    real = jax.make_array_from_callback

    def spy(shape, sharding, cb):
        def wrapped(index):
            out = cb(index)
            seen.append((shape, out.shape))
            return out
        return real(shape, sharding, wrapped)

    monkeypatch.setattr(jax, "make_array_from_callback", spy)
    ja.load_model(path, mesh=ja.make_mesh((1, 4, 2)))
    sharded = [(full, got) for full, got in seen if full != got]
    assert sharded, "no parameter was read shard by shard"
    assert all(np.prod(got) < np.prod(full) for full, got in sharded)
