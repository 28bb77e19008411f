"""DPO: sequence log-probs against transformers, ln 2 at step 0, the three reference
sources agreeing, SimPO without a reference, a short training run, bad rows."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
import torch

from jaxalign.algos import dpo
from jaxalign.data import load_tokenizer, pad_pairs
from jaxalign.errors import ConfigError, DataError
from jaxalign.models.model import load_model
from jaxalign.parallel.mesh import make_mesh
from jaxalign.peft import lora
from jaxalign.train.loop import apply_transforms, train
from jaxalign.train.metrics import read_metrics
from tests.test_reward import TINY_ASSETS, letter_prefs, small_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "dpo.yaml")


def random_pairs(n=4, seed=0):
    rng = np.random.RandomState(seed)
    return [{"prompt_ids": rng.randint(3, 128, rng.randint(2, 6)), "chosen_ids": rng.randint(3, 128, rng.randint(1, 6)),
             "rejected_ids": rng.randint(3, 128, rng.randint(1, 6)), "margin": 0.0} for _ in range(n)]


def test_sequence_logps_match_transformers(hf_model):
    """Summed response log-probs of chosen and rejected (one forward over both) equal
    PyTorch's on the same token ids."""
    torch_model, path = hf_model("qwen2")
    model = load_model(path, dtype="float32")
    pairs = random_pairs()
    batch = pad_pairs(pairs, 12, 0)
    pc, pr, lc, lr = jax.jit(dpo.pair_logps, static_argnums=(1, 3))(model.params, model.config, batch, 4)
    for side, ours, lengths in (("chosen", pc, lc), ("rejected", pr, lr)):
        ref = []
        for p in pairs:
            ids = np.concatenate([p["prompt_ids"], p[f"{side}_ids"]])
            with torch.no_grad():
                logits = torch_model(input_ids=torch.tensor(ids[None])).logits[0].float()
            logp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:, None]))[:, 0].numpy()
            ref.append(logp[len(p["prompt_ids"]) - 1:].sum())
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(lengths, [len(p[f"{side}_ids"]) for p in pairs])


def test_scored_positions_give_the_full_paths_logps_and_gradients(hf_model):
    """`sequence_logps` on the batch builders' `score_at` (LM head at the response positions
    only) equals the full path (LM head everywhere, then the shifted loss mask): log-probs,
    lengths and gradients, for right padding (`pad_pairs`) and left padding (online DPO's
    rows), responses of different lengths, and rows scoring nothing (an all-padding row, a tied
    online pair)."""
    from jaxalign.algos import online_dpo
    from jaxalign.algos.pairs import concat_sides

    _, path = hf_model("llama", initializer_range=0.05)
    model = load_model(path, dtype="float32")
    right = pad_pairs(random_pairs(3) + [None], 32, 0)
    # 4 left-padded prompt columns, then 3 response columns (response_mask 0 after the EOS, id 2).
    ids = np.array([[0, 0, 5, 6, 7, 8, 2], [0, 9, 10, 11, 12, 2, 0], [13, 14, 15, 16, 17, 18, 19],
                    [0, 0, 0, 20, 21, 22, 23]], np.int32)
    sampled = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32),
               "response_mask": (ids[:, 4:] > 0).astype(np.int32)}
    left = online_dpo.pair_rows(sampled, np.array([0, 2]), np.array([1, 3]), np.array([True, False]), 4)
    logps = jax.jit(lambda p, b: dpo.sequence_logps(p, model.config, b))
    grads = jax.jit(jax.grad(lambda p, b, w: jax.numpy.sum(w * dpo.sequence_logps(p, model.config, b)[0])))
    for pairs in (right, left):
        gathered = concat_sides(pairs)
        full = {k: v for k, v in gathered.items() if k != "score_at"}
        assert gathered["score_at"].shape[1] < gathered["input_ids"].shape[1]
        (lg, ng), (lf, nf) = logps(model.params, gathered), logps(model.params, full)
        n = np.asarray(nf)
        assert np.any(n == 0) and len(set(n[n > 0])) > 1  # empty rows, different lengths
        np.testing.assert_array_equal(ng, nf)
        np.testing.assert_allclose(lg, lf, rtol=1e-5, atol=1e-5)
        w = np.linspace(0.5, 1.5, len(nf)).astype(np.float32)
        for a, b in zip(*(jax.tree.leaves(grads(model.params, batch, w)) for batch in (gathered, full))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _objective(tmp_path, path, extra=()):
    mesh = make_mesh((4, 2, 1))
    cfg = small_run_config(tmp_path, path, QUICKSTART, ["data.max_eval_examples=16", *extra])
    model = apply_transforms(load_model(path, dtype="float32", mesh=mesh), cfg)
    tok = load_tokenizer(TINY_ASSETS)
    return cfg, model, dpo.build(cfg, model, tok)


_JITTED: dict = {}


def _loss(objective, params, batch):
    if id(objective) not in _JITTED:
        _JITTED[id(objective)] = (objective, jax.jit(objective.loss_fn))
    sums = _JITTED[id(objective)][1](params, batch, jax.random.key(0))
    return {k: float(s) / float(c) for k, (s, c) in sums.items()}


def test_step0_loss_is_ln2_and_reference_sources_agree(tmp_path, hf_model):
    """Policy == reference gives ln 2 through the objective's loss_fn on a real batch, for
    frozen_copy, precomputed and adapters_off. With the policy moved away (LoRA b != 0, and
    the same weights merged for the dense variants), all three give the same loss != ln 2."""
    _, path = hf_model("llama", initializer_range=0.05)
    cfg, model, frozen = _objective(tmp_path / "a", path)
    assert frozen.summary["dpo"].endswith("reference=frozen_copy")
    batch = next(frozen.train_batches)
    params = frozen.init_params(model.params)
    ref_leaf, policy_leaf = params["reference"]["lm_head"]["kernel"], params["policy"]["lm_head"]["kernel"]
    pointers = lambda x: {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}  # noqa: E731
    assert not pointers(ref_leaf) & pointers(policy_leaf)  # a real copy, not shared buffers
    assert ref_leaf.sharding == policy_leaf.sharding
    m = _loss(frozen, params, batch)
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(0, abs=1e-6)  # accuracies: ties up to float noise

    _, _, pre = _objective(tmp_path / "b", path, ["dpo.precompute_ref_logps=true"])
    pre_batch = next(pre.train_batches)
    np.testing.assert_array_equal(pre_batch["chosen_input_ids"], batch["chosen_input_ids"])  # same seed, same order
    assert _loss(pre, model.params, pre_batch)["loss"] == pytest.approx(math.log(2), abs=1e-6)

    _, lmodel, off = _objective(tmp_path / "c", path, ["lora.rank=4", "lora.targets=[q_proj,v_proj,gate_proj]"])
    assert off.summary["dpo"].endswith("reference=adapters_off") and off.init_params is None
    assert _loss(off, lmodel.params, batch)["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # move the policy: random adapters; the dense variants get the same weights merged
    is_lora = lambda x: isinstance(x, lora.LoraWeight)  # noqa: E731
    moved = jax.tree.map(lambda w: w.replace(b=jax.random.normal(jax.random.key(2), w.b.shape) * 0.05) if is_lora(w)
                         else w, lmodel.params, is_leaf=is_lora)
    merged = lora.merge(moved)
    got = {
        "adapters_off": _loss(off, moved, batch),
        "frozen_copy": _loss(frozen, {"policy": merged, "reference": params["reference"]}, batch),
        "precomputed": _loss(pre, merged, pre_batch),
    }
    assert abs(got["frozen_copy"]["loss"] - math.log(2)) > 1e-3
    for name in ("adapters_off", "precomputed"):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert got[name][key] == pytest.approx(got["frozen_copy"][key], rel=1e-4, abs=1e-5), (name, key)


def test_simpo_needs_no_reference_and_ipo_length_normalizes(tmp_path, hf_model):
    _, path = hf_model("llama")
    cfg, model, simpo = _objective(tmp_path / "s", path, ["dpo.loss_type=simpo", "dpo.beta=2.0"])
    assert simpo.summary["dpo"].endswith("reference=none") and simpo.init_params is None
    batch = next(simpo.train_batches)
    m = _loss(simpo, model.params, batch)
    pc, pr, lc, lr = jax.jit(dpo.pair_logps, static_argnums=1)(model.params, model.config, batch)
    expected = -jax.nn.log_sigmoid(2.0 * (pc / lc - pr / lr) - cfg.dpo.simpo_gamma)
    assert m["loss"] == pytest.approx(float(np.mean(expected)), rel=1e-4)
    assert m["logps/chosen"] == pytest.approx(float(np.mean(pc / lc)), rel=1e-4)
    # RPO: the chosen reply's per-token NLL (raw sums, not the length-normalized log-probs) joins the loss
    _, _, rpo = _objective(tmp_path / "r", path, ["dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.rpo_alpha=0.5"])
    m_rpo = _loss(rpo, model.params, batch)
    assert m_rpo["nll_loss"] == pytest.approx(float(np.mean(-pc / lc)), rel=1e-4)
    assert m_rpo["loss"] == pytest.approx(float(np.mean(expected - 0.5 * pc / lc)), rel=1e-4)
    assert m["loss"] == pytest.approx(float(np.mean(expected)), rel=1e-4)  # 0 = off
    no_lora = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, reference="adapters_off", loss_type="sigmoid"))
    with pytest.raises(ConfigError, match="adapters_off needs LoRA"):
        dpo.resolve_reference(no_lora, has_lora=False)


def test_dpo_training_improves_eval_rewards(tmp_path, hf_model):
    _, path = hf_model("llama", initializer_range=0.02)
    cfg = small_run_config(tmp_path, path, QUICKSTART, ["train.steps=12", "optim.learning_rate=3e-3"])
    result = train(cfg)
    evals = [r for r in read_metrics(str(tmp_path / "run")) if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [0, 12]
    first, last = evals
    assert first["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert last["eval/rewards/accuracies"] > 0.8 and last["eval/rewards/margins"] > 0.5, last
    assert last["eval/loss"] < 0.5
    assert "eval/length_correlation" in last and "eval/accuracy_chosen_shorter" in last
    assert np.isfinite(result["loss"])
    exported = load_model(str(tmp_path / "run" / "final"))  # the policy, as a causal LM
    assert "lm_head" in exported.params and "reference" not in exported.params


def test_bad_rows_dropped_and_counted_or_named(tmp_path, hf_model):
    _, path = hf_model("llama")
    data = tmp_path / "bad.jsonl"
    good = open(letter_prefs(tmp_path / "good.jsonl", 32, 0)).read()
    cut = "x" * 20  # past data.max_length=24: the responses below differ only after it
    data.write_text('{"prompt": "say: a\\n", "chosen": "ab", "rejected": "ab"}\n'
                    '{"prompt": "say: a\\n", "chosen": "", "rejected": "cd"}\n'
                    f'{{"prompt": "say: a\\n", "chosen": "{cut}a", "rejected": "{cut}b"}}\n'
                    '{"prompt": "say: b\\n", "chosen": "ab", "rejected": "cd"}\n' + good)
    _, _, objective = _objective(tmp_path / "x", path, [f"data.train={data}", "data.eval=null"])
    stats = objective.summary["train data"]
    assert stats["examples"] == 33 and stats["drop_reasons"] == {
        "chosen_equals_rejected": 1, "empty_response": 1, "chosen_equals_rejected_after_truncation": 1}
    assert stats["left_out_per_epoch"] == 1  # 33 pairs in batches of 16
    with pytest.raises(DataError, match="row 0: .*identical"):
        _objective(tmp_path / "y", path, [f"data.train={data}", "data.eval=null", "data.on_bad_row=error"])


def test_margin_from_scores_offsets_the_sigmoid_loss(tmp_path, hf_model):
    """ODPO: at step 0 (h = 0) the loss is -log σ(-α·gap) per pair; min_score_gap filters first."""
    _, path = hf_model("llama")
    rng = np.random.RandomState(0)
    rows = [dict(r, score_chosen=float(rng.randint(5, 10)), score_rejected=float(rng.randint(0, 5)))
            for r in map(json.loads, open(letter_prefs(tmp_path / "p.jsonl", 40, 0)).read().splitlines())]
    rows[0]["score_rejected"] = rows[0]["score_chosen"]  # gap 0: filtered out below
    data = tmp_path / "scored.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    common = [f"data.train={data}", "data.eval=null", "data.min_score_gap=0.5", "dpo.margin_from_scores=0.5"]
    _, model, objective = _objective(tmp_path / "m", path, common)
    stats = objective.summary["train data"]
    assert stats["drop_reasons"] == {"score_gap_below_min": 1} and stats["examples"] == 39
    gaps = [r["score_chosen"] - r["score_rejected"] for r in rows[1:]]
    assert stats["mean_score_gap"] == pytest.approx(np.mean(gaps))
    assert objective.summary["dpo"].endswith("margin_from_scores=0.5")
    batch = next(objective.train_batches)
    assert batch["score_gap"].shape == (16,) and batch["score_gap"].min() >= 1.0
    m = _loss(objective, objective.init_params(model.params), batch)
    assert m["loss"] == pytest.approx(float(np.mean(-jax.nn.log_sigmoid(-0.5 * batch["score_gap"]))), rel=1e-5)
    with pytest.raises(DataError, match="margin_from_scores needs score_chosen and score_rejected.*512 of 512"):
        _objective(tmp_path / "n", path, ["data.eval=null", "dpo.margin_from_scores=0.5"])
    with pytest.raises(ConfigError, match="margin_from_scores works with dpo.loss_type=sigmoid only"):
        _objective(tmp_path / "o", path, common + ["dpo.loss_type=ipo"])


def test_orpo_is_reference_free_nll_plus_odds_ratio(tmp_path, hf_model):
    """ORPO through the DPO objective: no reference weights; loss = chosen NLL per token
    - β log σ(log odds ratio) on average log-probs; TRL's metric names."""
    _, path = hf_model("llama")
    cfg, model, orpo = _objective(tmp_path / "o", path, ["dpo.loss_type=orpo", "dpo.beta=0.2"])
    assert orpo.summary["dpo"].endswith("reference=none") and orpo.init_params is None
    batch = next(orpo.train_batches)
    m = _loss(orpo, model.params, batch)
    pc, pr, lc, lr = (np.asarray(x, np.float64) for x in
                      jax.jit(dpo.pair_logps, static_argnums=1)(model.params, model.config, batch))
    ac, ar = pc / lc, pr / lr
    log_odds = (ac - np.log1p(-np.exp(ac))) - (ar - np.log1p(-np.exp(ar)))
    log_sig = -np.logaddexp(0.0, -log_odds)
    assert m["loss"] == pytest.approx(np.mean(-ac - 0.2 * log_sig), rel=1e-4)
    assert m["nll_loss"] == pytest.approx(np.mean(-ac), rel=1e-4)
    assert m["log_odds_ratio"] == pytest.approx(np.mean(log_sig), rel=1e-4)
    assert m["log_odds_chosen"] == pytest.approx(np.mean(log_odds), rel=1e-4, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(0.2 * np.mean(ac), rel=1e-4)
    assert m["rewards/margins"] == pytest.approx(0.2 * np.mean(ac - ar), rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="rpo_alpha adds the chosen NLL that dpo.loss_type=orpo already has"):
        _objective(tmp_path / "r", path, ["dpo.loss_type=orpo", "dpo.rpo_alpha=0.5"])


def test_orpo_quickstart_trains_through_the_cli(tmp_path, hf_model):
    from jaxalign.cli import main

    _, path = hf_model("llama", initializer_range=0.02)
    args = ["train", os.path.join(ROOT, "configs", "quickstart", "orpo.yaml"), f"output_dir={tmp_path / 'run'}",
            f"model.path={path}", "model.config=null", f"model.tokenizer={TINY_ASSETS}",
            f"data.train={letter_prefs(tmp_path / 'train.jsonl', 512, 0)}",
            f"data.eval={letter_prefs(tmp_path / 'eval.jsonl', 64, 1)}", "data.max_length=24", "data.buckets=[24]",
            "train.batch_size=16",
            "train.steps=12", "optim.learning_rate=3e-3", "optim.warmup_steps=0", "train.eval_every=null",
            "train.save_every=null", "train.async_checkpoints=false"]
    assert main(args) == 0
    evals = [r for r in read_metrics(str(tmp_path / "run")) if "eval/log_odds_ratio" in r]
    assert [r["step"] for r in evals] == [0, 12]
    first, last = evals
    assert last["eval/rewards/accuracies"] > max(first["eval/rewards/accuracies"] + 0.2, 0.8), (first, last)
    assert last["eval/log_odds_chosen"] > first["eval/log_odds_chosen"] + 0.5
    assert last["eval/nll_loss"] < first["eval/nll_loss"]
    exported = load_model(str(tmp_path / "run" / "final"))
    assert "lm_head" in exported.params
