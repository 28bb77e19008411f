"""Reward models: score-head parity with transformers' *ForSequenceClassification, export /
import round trips (full and PEFT LoRA), the reward objective (training gain, export,
bad rows)."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxalign.algos import pairs, reward
from jaxalign.config import load_config
from jaxalign.data import load_tokenizer, pad_pairs
from jaxalign.errors import ConfigError, DataError
from jaxalign.models import heads
from jaxalign.models.model import load_model
from jaxalign.parallel.mesh import make_mesh
from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics
from tests.hf_models import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ASSETS = os.path.join(ROOT, "jaxalign", "assets", "tiny")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "reward.yaml")


scores_fn = jax.jit(heads.sequence_scores, static_argnums=1)
values_fn = jax.jit(heads.token_values, static_argnums=1)
reward_sums = jax.jit(reward.reward_sums, static_argnums=1)


def padded_batch(seed=0, b=4, t=11, pad=0):
    """Random ids (never the pad id) with left- and right-padded rows; HF-style position ids."""
    ids = np.random.RandomState(seed).randint(3, 128, (b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    mask[3, :2] = 0
    ids[mask == 0] = pad
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, pos


def torch_scores(model, ids, mask, pos):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits[:, 0].float().numpy()


def assert_rel_close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max abs err {err} > {rel} x scale {scale}: {ours} vs {ref}"


def make_seq_cls(path, family="qwen2", seed=0):
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](
        **TINY, num_labels=1, pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_seq_cls_checkpoint_gives_its_scores(tmp_path, family):
    """An HF-made reward model loads with its head; scores and per-token values match PyTorch."""
    ref_model = make_seq_cls(str(tmp_path / "rm"), family)
    rm = heads.load_reward_model(str(tmp_path / "rm"), dtype="float32")
    assert set(rm.params) == {"model", "score"} and rm.params["score"]["kernel"].shape == (32, 1)
    ids, mask, pos = padded_batch()
    assert_rel_close(scores_fn(rm.params, rm.config, ids, mask), torch_scores(ref_model, ids, mask, pos))
    with torch.no_grad():
        h = ref_model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            position_ids=torch.tensor(pos)).last_hidden_state
        values = ref_model.score(h)[..., 0].numpy()
    ours = np.asarray(values_fn(rm.params, rm.config, ids, mask))
    real = mask.astype(bool)
    assert_rel_close(ours[real], values[real])


def test_causal_lm_gets_fresh_head_and_export_loads_in_transformers(tmp_path, hf_model):
    _, path = hf_model("llama")
    mesh = make_mesh((2, 2, 2))
    rm = heads.load_reward_model(path, dtype="float32", mesh=mesh, seed=3)
    assert "lm_head" not in rm.params
    kernel = np.asarray(rm.params["score"]["kernel"])
    assert kernel.shape == (32, 1) and 0.5 / np.sqrt(33) < kernel.std() < 2 / np.sqrt(33)
    assert rm.params["score"]["kernel"].sharding.spec[0] == "fsdp"
    out = str(tmp_path / "export")
    heads.save_reward_model(rm, out, pad_token_id=0)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, pos = padded_batch(seed=1)
    ours = scores_fn(rm.params, rm.config, ids, mask)
    assert_rel_close(ours, torch_scores(hf, ids, mask, pos))
    # left and right padding of the same sequence give the same score
    seq = ids[0, :7]
    left = np.concatenate([np.zeros(4, int), seq])[None]
    right = np.concatenate([seq, np.zeros(4, int)])[None]
    two = np.concatenate([left, right])
    m = (np.concatenate([np.zeros(4), np.ones(7)])[None], np.concatenate([np.ones(7), np.zeros(4)])[None])
    s = np.asarray(scores_fn(rm.params, rm.config, two, np.concatenate(m).astype(int)))
    np.testing.assert_allclose(s[0], s[1], rtol=1e-5)
    again = heads.load_reward_model(out, dtype="float32")  # our own export reloads with the same head
    np.testing.assert_allclose(again.params["score"]["kernel"], kernel)


def test_lora_reward_adapter_loads_in_peft_and_back(tmp_path, hf_model):
    """save_reward_adapter writes a PEFT SEQ_CLS adapter (LoRA + score head) that PEFT scores
    like we do; load_reward_adapter reads it back onto the base."""
    import peft

    from jaxalign.peft import lora

    _, path = hf_model("llama")
    rm = heads.load_reward_model(path, dtype="float32", seed=1)
    params = lora.apply(rm.params, 4, 8.0, ["q_proj", "v_proj"], jax.random.key(0))
    params = jax.tree.map(lambda w: w.replace(b=jax.random.normal(jax.random.key(1), w.b.shape) * 0.3)
                          if isinstance(w, lora.LoraWeight) else w, params, is_leaf=lambda x: isinstance(x, lora.LoraWeight))
    out = str(tmp_path / "adapter")
    heads.save_reward_adapter(params, out, base=path)
    ids, mask, pos = padded_batch(seed=2)
    ours = np.asarray(scores_fn(params, rm.config, ids, mask))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, pad_token_id=0,
                                                                           dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    assert_rel_close(ours, torch_scores(peft_model, ids, mask, pos))
    base_params = load_model(path, dtype="float32").params
    back, _ = heads.load_reward_adapter(base_params, rm.config, out)
    assert "lm_head" not in back
    np.testing.assert_allclose(scores_fn(back, rm.config, ids, mask), ours, rtol=1e-5, atol=1e-6)


def letter_prefs(path, n, seed):
    """Learnable-in-a-few-steps preferences: chosen words use letters a-l, rejected n-y
    (random lengths 2-6, so length carries no signal)."""
    rng = np.random.RandomState(seed)
    path.parent.mkdir(parents=True, exist_ok=True)

    def word(letters):
        return "".join(rng.choice(list(letters), rng.randint(2, 7)))

    rows = [{"prompt": f"say: {word('abcdefghijklmnopqrstuvwxyz')}\n", "chosen": word("abcdefghijkl"),
             "rejected": word("nopqrstuvwxy")} for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def small_run_config(tmp_path, model_path, quickstart, extra=()):
    """A quickstart config shrunk to a few steps on the letter preferences."""
    return load_config(quickstart, [
        f"output_dir={tmp_path / 'run'}", f"model.path={model_path}", f"model.tokenizer={TINY_ASSETS}",
        f"data.train={letter_prefs(tmp_path / 'train.jsonl', 512, 0)}",
        f"data.eval={letter_prefs(tmp_path / 'eval.jsonl', 64, 1)}", "data.max_length=24", "data.buckets=[24]",
        "train.batch_size=16", "optim.warmup_steps=0", "train.eval_every=null", "train.save_every=null",
        "train.log_every=10", "train.async_checkpoints=false", *extra])


def test_reward_training_improves_accuracy_and_export_matches_transformers(tmp_path, hf_model):
    _, path = hf_model("llama", initializer_range=0.02)
    cfg = small_run_config(tmp_path, path, QUICKSTART, ["train.steps=12", "optim.learning_rate=3e-3"])
    train(cfg)
    tmp_path = tmp_path / "run"
    evals = [r for r in read_metrics(str(tmp_path)) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 12]
    first, last = evals[0], evals[-1]
    assert last["eval/accuracy"] > max(first["eval/accuracy"] + 0.1, 0.6), (first, last)
    assert last["eval/loss"] < first["eval/loss"]
    for key in ("length_correlation", "accuracy_chosen_shorter", "frac_chosen_shorter"):
        assert f"eval/{key}" in last
    final = str(tmp_path / "final")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    ours = heads.load_reward_model(final, dtype="float32")
    tok = load_tokenizer(final)
    pairs = [{"prompt_ids": np.array(tok.encode("copy: abc\n")), "chosen_ids": np.array(tok.encode("abc</s>", add_special_tokens=False)),
              "rejected_ids": np.array(tok.encode("abd</s>", add_special_tokens=False)), "margin": 0.0}] * 2
    b = pad_pairs(pairs, 16, tok.pad_token_id)
    ids, mask = b["chosen_input_ids"], b["chosen_attention_mask"]
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    assert_rel_close(scores_fn(ours.params, ours.config, ids, mask), torch_scores(hf, ids, mask, pos))


BAD_ROWS = [
    {"prompt": "copy: ab\n", "chosen": "ab", "rejected": "ba"},       # fine
    {"prompt": "copy: ab\n", "chosen": "ab"},                         # missing column
    {"prompt": "copy: ab\n", "chosen": "  ", "rejected": "ba"},        # empty response
    {"prompt": "copy: ab\n", "chosen": "ab", "rejected": "ab"},        # chosen == rejected
    {"prompt": "copy: cd\n", "chosen": "cd", "rejected": None},        # null
]
IMPLICIT_ROWS = [
    {"chosen": "copy: ab\nab", "rejected": "copy: ab\nba"},            # fine
    {"chosen": "ab", "rejected": "cd"},                                # no shared prompt
    {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: ho\n\nAssistant: yo"},  # prompts differ
    {"chosen": "copy: ab\nab", "rejected": "copy: ab\nab"},            # identical
]


@pytest.mark.parametrize("rows,reasons", [
    (BAD_ROWS, {"missing_field": 2, "empty_response": 1, "chosen_equals_rejected": 1}),
    (IMPLICIT_ROWS, {"no_shared_prompt": 1, "prompt_mismatch": 1, "chosen_equals_rejected": 1}),
])
def test_bad_rows_are_dropped_with_counts_or_named(tmp_path, rows, reasons):
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tok = load_tokenizer(TINY_ASSETS)
    cfg = load_config(QUICKSTART, [f"data.train={data}", "data.eval=null"])
    kept, stats = pairs.load_preference_examples(cfg, tok, "train")
    assert len(kept) == 1 and stats.rows == len(rows) and stats.dropped == len(rows) - 1
    assert stats.drop_reasons == reasons
    bad_index = 1
    cfg = load_config(QUICKSTART, [f"data.train={data}", "data.eval=null", "data.on_bad_row=error"])
    with pytest.raises(DataError, match=f"row {bad_index}:"):
        pairs.load_preference_examples(cfg, tok, "train")


def test_padding_rows_do_not_count_and_margin_shifts_loss(hf_model):
    _, path = hf_model("llama")
    rm = heads.load_reward_model(path, dtype="float32")
    pair = {"prompt_ids": np.array([1, 5, 6]), "chosen_ids": np.array([7, 2]), "rejected_ids": np.array([8, 9, 2]),
            "margin": 0.0}
    batch = pad_pairs([pair, None], 8, 0)  # a real pair and an all-padding row
    sums = reward_sums(rm.params, rm.config, batch)
    loss, count = (float(x) for x in sums["loss"])
    assert count == 1 and np.isfinite(loss)
    ids = np.concatenate([batch["chosen_input_ids"][:1], batch["rejected_input_ids"][:1]])
    mask = np.concatenate([batch["chosen_attention_mask"][:1], batch["rejected_attention_mask"][:1]])
    rc, rr = np.asarray(scores_fn(rm.params, rm.config, ids, mask))
    diff = float(rc - rr)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-diff)), rtol=1e-5)
    batch["margin"][0] = 1.5
    shifted = float(reward_sums(rm.params, rm.config, batch)["loss"][0])
    np.testing.assert_allclose(shifted, np.log1p(np.exp(-(diff - 1.5))), rtol=1e-5)


def test_margin_from_scores_sets_each_pairs_margin(tmp_path):
    """reward.margin_from_scores: margin = scale x (score_chosen - score_rejected), checked in the
    batches the objective trains on; pairs without scores, or with a margin column too, are refused."""
    from jaxalign.algos.reward import margins_from_scores

    rows = [{"prompt": "copy: ab\n", "chosen": "ab", "rejected": "ba", "score_chosen": 9.0, "score_rejected": 5.0},
            {"prompt": "copy: cd\n", "chosen": "cd", "rejected": "dc", "score_chosen": 6.0, "score_rejected": 5.5}]
    data = tmp_path / "scored.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tok = load_tokenizer(TINY_ASSETS)
    cfg = load_config(QUICKSTART, [f"data.train={data}", "data.eval=null"])
    kept, _ = pairs.load_preference_examples(cfg, tok, "train")
    margins_from_scores(kept, 0.5, "data.train")
    assert [p["margin"] for p in kept] == [2.0, 0.25]
    assert pad_pairs(kept, 16, tok.pad_token_id)["margin"].tolist() == [2.0, 0.25]
    with pytest.raises(DataError, match="needs score_chosen and score_rejected on every pair; 1 of 2 data.train"):
        margins_from_scores([{**kept[0]}, {k: v for k, v in kept[1].items() if k != "score_gap"}], 0.5, "data.train")
    with pytest.raises(DataError, match="has a margin column and reward.margin_from_scores is set"):
        margins_from_scores([{**kept[0], "margin": 1.0}], 0.5, "data.train")
    with pytest.raises(ConfigError, match="unknown config key 'reward.margin_from_score'; did you mean 'reward.margin_from_scores'"):
        load_config(QUICKSTART, ["reward.margin_from_score=0.5"])
