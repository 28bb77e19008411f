"""The KV-cache sampler: parity with transformers' generate, cache vs full forward, sampling rules."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxalign as ja
from jaxalign.errors import ConfigError
from jaxalign.sampling import add_arguments, decode_logits, generate, run
from jaxalign.models.llama import hidden_states_cached, init_cache, split_layers, split_layers_shared, unembed
from jaxalign.models.model import positions_from_mask

FAMILIES = {
    "llama": dict(),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=16),
    "mistral": dict(sliding_window=4),  # window < prompt + generation: decode must apply it
}
N = 8


def prompts(b=3, p=6, vocab=128, seed=0):
    """Left-padded prompts of different lengths (6, 3, 5 real tokens), pads set to id 0."""
    ids = np.random.RandomState(seed).randint(3, vocab, (b, p))
    mask = np.ones((b, p), np.int64)
    mask[1, :3] = 0
    mask[2 % b, :1] = 0
    return ids * mask, mask


def hf_greedy(torch_model, ids, mask, n, eos=None, pad=0):
    """transformers' greedy generate, padded to [B, n] with `pad` after stops."""
    torch_model.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                                   min_new_tokens=0, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    out = out[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=pad)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(hf_model, family):
    torch_model, path = hf_model(family, **FAMILIES[family])
    model = ja.load_model(path, dtype="float32")
    ids, mask = prompts()
    ref = hf_greedy(torch_model, ids, mask, N)
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=N, greedy=True, eos_token_ids=(),
                   pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert np.asarray(out.mask).all() and (np.asarray(out.lengths) == N).all()

    # Stop token: one row's 3rd generated token (not occurring before it in that row).
    row = next(r for r in range(len(ref)) if ref[r, 2] not in ref[r, :2])
    eos = int(ref[row, 2])
    ref_eos = hf_greedy(torch_model, ids, mask, N, eos=eos, pad=0)
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=N, greedy=True, eos_token_ids=(eos,),
                   pad_token_id=0)
    tokens, lengths, gen_mask = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.mask)
    np.testing.assert_array_equal(tokens, ref_eos)
    assert tokens[row, 2] == eos and (tokens[row, 3:] == 0).all() and lengths[row] == 3
    np.testing.assert_array_equal(gen_mask, np.arange(N)[None] < lengths[:, None])
    for r in range(len(ref)):  # each row: up to and including its first eos, or all N
        hits = np.flatnonzero(ref[r] == eos)
        assert lengths[r] == (hits[0] + 1 if len(hits) else N)
    assert (np.asarray(out.logprobs)[gen_mask == 0] == 0).all()


@pytest.mark.parametrize("per_layer", [True, False], ids=["per_layer_cache", "stacked_cache"])
@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_decode_logits_equal_full_forward(hf_model, family, per_layer):
    """Prefill + one-token decode steps reproduce `Model.logits` at every real position, with
    either cache form (per-layer: what CPU decodes with; stacked: accelerators)."""
    _, path = hf_model(family, **FAMILIES[family])
    model = ja.load_model(path, dtype="float32")
    params, config = model.params, model.config
    ids, mask = prompts()
    cont = np.random.RandomState(1).randint(3, 128, (3, 5))
    full_ids = np.concatenate([ids, cont], 1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], 1)
    ref = np.asarray(model.logits(full_ids, full_mask))  # [B, P + 5, V]

    p = ids.shape[1]

    @jax.jit
    def prefill(params, ids, mask):
        cache = init_cache(config, 3, p + 5, per_layer=per_layer)
        h, cache = hidden_states_cached(params, config, ids, mask.astype(bool), positions_from_mask(mask), cache,
                                        prefill=True)
        return unembed(params, h, config), cache

    step = jax.jit(lambda params, tok, pos, cache: decode_logits(params, config, tok, pos, cache))
    pre, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask))
    assert cache.per_layer == per_layer
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(pre)[real], ref[:, :p][real], atol=1e-5)
    pos = mask.sum(-1)
    for j in range(cont.shape[1]):
        logits, cache = step(params, jnp.asarray(cont[:, j]), jnp.asarray(pos + j), cache)
        np.testing.assert_allclose(np.asarray(logits), ref[:, p + j], atol=1e-5, err_msg=f"decode step {j}")


def test_split_layers_shares_the_stacked_weights(hf_model):
    """The per-layer split that the CPU decode reads equals slicing the stacked leaves, and on one
    CPU device it is a view of them (no copy of the weights per generate call)."""
    _, path = hf_model("llama")
    params = ja.load_model(path, dtype="float32").params
    shared, copied = split_layers_shared(params), split_layers(params)
    stacked = params["model"]["layers"]
    assert isinstance(shared["model"]["layers"], tuple) and len(shared["model"]["layers"]) == 2
    assert jax.tree.structure(shared) == jax.tree.structure(copied)
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(copied)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = stacked["self_attn"]["q_proj"]["kernel"]
    view = shared["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"]
    assert view.unsafe_buffer_pointer() == q.unsafe_buffer_pointer() + q[0].nbytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_cache_attention_equals_dot_product_attention(dtype):
    """The per-layer decode's attention over one layer's cache (keys [B, Hkv, hd, S], values
    [B, Hkv, S, hd]) is the XLA kernel's over the same keys/values laid out [B, S, Hkv, hd]:
    GQA (6 query heads on 2), 3 new tokens, scattered masked slots."""
    from jaxalign.nn.attention import dot_product_attention, layer_cache_attention

    rs = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rs.randn(*shape), dtype) for shape in [(2, 3, 6, 8), (2, 2, 10, 8), (2, 2, 10, 8)])
    mask = jnp.asarray(rs.rand(2, 1, 3, 10) < 0.7).at[..., 0].set(True)
    ours = layer_cache_attention(q, jnp.swapaxes(k, 2, 3), v, mask)
    ref = dot_product_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)
    assert ours.shape == ref.shape == (2, 3, 6, 8) and ours.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               atol=1e-6 if dtype == "float32" else 2e-2)


def full_logits(model, ids, mask, out):
    """Full-forward logits predicting each generated token: [B, N, V]."""
    seq = np.concatenate([ids, np.asarray(out.tokens)], 1)
    seq_mask = np.concatenate([mask, np.asarray(out.mask)], 1)
    p = ids.shape[1]
    return np.asarray(model.logits(seq, seq_mask))[:, p - 1:-1]


def test_logprobs_match_recomputation_and_filters_hold(hf_model):
    _, path = hf_model("llama")
    model = ja.load_model(path, dtype="float32")
    ids, mask = prompts()
    temp, k = 0.7, 5
    out = generate(model, ids, mask, jax.random.key(1), max_new_tokens=N, temperature=temp, top_k=k, top_p=0.9,
                   eos_token_ids=())
    logits = full_logits(model, ids, mask, out)
    tokens = np.asarray(out.tokens)
    # logprob = log_softmax(logits / T)[token]: the unfiltered temperature-scaled distribution
    ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / temp, -1)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-4)
    # every sampled token is among the top k
    rank = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)
    assert (rank < k).all()
    # ... and inside the nucleus of the top-k-renormalized distribution: the mass of the
    # strictly more likely tokens is below top_p
    desc = np.sort(logits / temp, -1)[..., ::-1][..., :k]
    pk = np.asarray(jax.nn.softmax(desc, -1))
    mass_before = np.take_along_axis(np.cumsum(pk, -1) - pk, rank[..., None], -1)[..., 0]
    assert (mass_before < 0.9 + 1e-6).all()


def test_sampling_is_deterministic_and_top_k_1_is_greedy(hf_model):
    _, path = hf_model("qwen2", tie_word_embeddings=True)
    model = ja.load_model(path, dtype="float32")
    ids, mask = prompts()
    kw = dict(max_new_tokens=N, eos_token_ids=())
    a = generate(model, ids, mask, jax.random.key(3), **kw)
    b = generate(model, ids, mask, jax.random.key(3), **kw)
    c = generate(model, ids, mask, jax.random.key(4), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    greedy = generate(model, ids, mask, jax.random.key(0), greedy=True, **kw)
    top1 = generate(model, ids, mask, jax.random.key(5), top_k=1, **kw)
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    # streaming in host-side chunks gives the same tokens as the one-shot loop
    seen = []
    streamed = generate(model, ids, mask, jax.random.key(3), on_tokens=seen.append, stream_chunk=3, **kw)
    np.testing.assert_array_equal(np.asarray(streamed.tokens), np.asarray(a.tokens))
    assert [s.shape[1] for s in seen] == [1, 4, 7, 8]


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=60), "exceeds the model's max_position_embeddings (64) by 2"),
])
def test_invalid_settings_raise(hf_model, kwargs, message):
    _, path = hf_model("llama", max_position_embeddings=64)
    model = ja.load_model(path)
    ids, mask = prompts()  # longest prompt: 6 real tokens; 6 + 60 = 66 = 64 + 2
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ConfigError) as e:
        generate(model, ids, mask, jax.random.key(0), **kwargs)
    assert message in str(e.value)


def test_sharded_generation_equals_single_device(hf_model):
    _, path = hf_model("llama")
    ids, mask = prompts(b=4)
    ref = generate(ja.load_model(path), ids, mask, jax.random.key(0), max_new_tokens=N, greedy=True,
                   eos_token_ids=())
    model = ja.load_model(path, mesh=ja.make_mesh((2, 2, 2)))
    out = generate(model, ids, mask, jax.random.key(0), max_new_tokens=N, greedy=True, eos_token_ids=())
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_lora_params_generate_through_the_seams(hf_model):
    """LoRA leaves (non-zero b) give the same tokens as their merged dense weights."""
    lora = pytest.importorskip("jaxalign.peft.lora")
    _, path = hf_model("llama")
    model = ja.load_model(path)
    params = lora.apply(model.params, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                        rng=jax.random.key(0))
    params = jax.tree.map(lambda w: w.replace(b=jax.random.normal(jax.random.key(1), w.b.shape) * 0.5)
                          if isinstance(w, lora.LoraWeight) else w, params,
                          is_leaf=lambda x: isinstance(x, lora.LoraWeight))
    ids, mask = prompts()
    kw = dict(max_new_tokens=N, greedy=True, eos_token_ids=())
    out = generate((params, model.config), ids, mask, jax.random.key(0), **kw)
    merged = generate((lora.merge(params), model.config), ids, mask, jax.random.key(0), **kw)
    base = generate(model, ids, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(merged.tokens))
    assert (np.asarray(out.tokens) != np.asarray(base.tokens)).any()


def char_tokenizer(path):
    """A 128-token character-level tokenizer with a chat template, saved to `path`."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in list(range(32, 127)) + list(range(161, 190)):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(path)
    return fast


def cli(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


def test_cli_streams_one_prompt_and_prints_batches(hf_model, tmp_path, capsys):
    _, path = hf_model("llama")
    tok = char_tokenizer(path)
    one = cli([path, "--prompt", "hello", "--greedy", "--max-new-tokens", "6", "--chat"])
    streamed = capsys.readouterr().out
    assert streamed == one[0] + "\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    ref = generate(ja.load_model(path), np.asarray([ids]), None, jax.random.key(0), max_new_tokens=6, greedy=True,
                   eos_token_ids=(2,))
    assert one[0] == tok.decode(np.asarray(ref.tokens[0])[:int(ref.lengths[0])], skip_special_tokens=True)

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"prompt": p}) for p in ["hello", "a much longer prompt", "x"]))
    many = cli([path, "--prompts-file", str(prompts_file), "--greedy", "--max-new-tokens", "6", "--chat",
                "--batch-size", "2"])
    printed = capsys.readouterr().out
    assert many[0] == one[0] and len(many) == 3
    assert "### prompt 2\nx\n### completion 2\n" in printed

    with pytest.raises(ConfigError, match="no prompts"):
        cli([path])
