"""PPO / GRPO / RLOO: the pieces of one rollout, learning on toy rewards, shared-base memory,
exact resume, and the errors for bad settings and inputs."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import rl
from jaxalign.algos import ppo
from jaxalign.algos.rl_loop import (AdvantageSettings, UpdateSchedule, advantages, kl_placement,
                                    minibatch_indices, rollout_prompts)
from jaxalign.algos.rollout import RewardModel, load_prompts, overlong_penalty, response_logprobs
from jaxalign.config import load_config
from jaxalign.errors import ConfigError
from jaxalign.parallel.mesh import MeshConfig, make_mesh
from jaxalign.train.loop import apply_transforms, build_model, load_tokenizer, train
from jaxalign.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "jaxalign", "assets", "tiny")
# The embedded character tokenizer has 104 tokens: a random model over exactly those ids.
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 104, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letter_fraction(prompts, completions):
    """Toy reward: the fraction of the completion's characters that are lowercase letters."""
    return [sum(c in LETTERS for c in text) / max(len(text), 1) for text in completions]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random model's config.json and 64 prompts ("say: <letters>")."""
    d = tmp_path_factory.mktemp("ppo")
    (d / "config.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(0)
    rows = [{"prompt": "say: " + "".join(rng.choice(list(LETTERS), rng.integers(2, 6)))} for _ in range(64)]
    (d / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


@pytest.fixture(scope="module")
def tiny(files):
    """(model, tokenizer), built once as the loop builds them (8 simulated devices)."""
    cfg = _config(files, "ppo", "unused")
    return build_model(cfg, make_mesh(MeshConfig(-1, 1, 1))), load_tokenizer(cfg)


def _config(files, algorithm, out, extra=()):
    overrides = [
        f"algorithm={algorithm}", f"output_dir={out}", f"model.config={files / 'config.json'}",
        f"model.tokenizer={TOKENIZER}", f"data.train={files / 'prompts.jsonl'}", "data.eval=null",
        "train.batch_size=8", "train.log_every=1", "train.async_checkpoints=false", "train.export=false",
        "train.save_every=null", "train.steps=4", "optim.learning_rate=3e-3", "optim.schedule=constant",
        "ppo.num_minibatches=2", "ppo.ppo_epochs=2", "ppo.response_length=8", "ppo.max_prompt_length=12",
        "ppo.reward_fn=tests.test_ppo:letter_fraction"]
    if algorithm != "ppo":
        overrides.append("ppo.group_size=4")
    return load_config(None, overrides + list(extra))


def _objective(cfg, tiny):
    """What the loop does before its first step: transforms, build, init_params, partition.
    The loop samples batches with `objective.sample_batch(params)` from the current params."""
    from jaxalign.train.loop import partition_params

    model, tokenizer = tiny
    model = apply_transforms(model, cfg)
    objective = ppo.build(cfg, model, tokenizer)
    params = objective.init_params(model.params)
    trainable, frozen, combine = partition_params(params, objective.trainable_mask)
    assert objective.sample_batch == objective.train_batches.next
    return model, objective, params, (trainable, frozen)


def _records(run_dir):
    return {r["step"]: r for r in read_metrics(str(run_dir)) if "loss" in r}


# ---------------------------------------------------------------------------- one rollout


@pytest.mark.parametrize("lora", [False, True])
def test_first_minibatch_of_a_rollout(files, tiny, lora):
    """Policy == reference at the start (a frozen copy; or adapters with b = 0 vs adapters off):
    KL 0, ratio 1, nothing clipped; the log-probs recomputed at the rollout temperature (0.7)
    equal the sampler's; masks and shapes of the experience line up."""
    extra = ["lora.rank=4", "lora.alpha=8"] if lora else []
    cfg = _config(files, "ppo", "unused", extra)
    model, objective, params, _ = _objective(cfg, tiny)
    batch = objective.sample_batch(params)
    b, p, n = 8, cfg.ppo.max_prompt_length, cfg.ppo.response_length
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (b, p + n)
    for key in ("response_mask", "old_logprobs", "old_values", "advantages", "returns"):
        assert batch[key].shape == (b, n), key
    m = batch["response_mask"]
    assert np.array_equal(batch["attention_mask"][:, p:], m)
    assert np.all(np.diff(m, axis=1) <= 0) and np.all(m[:, 0] == 1)  # a prefix of ones per row
    for key in ("old_logprobs", "advantages", "returns", "old_values"):
        assert np.all(batch[key][m == 0] == 0), key
    assert np.all(batch["input_ids"][:, p:][m == 0] == tiny[1].pad_token_id)  # pad after the stop, never EOS
    stats = dict(zip(objective.train_batches.stat_names, batch["rollout_stats"][0]))
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)
    assert stats["sampler_logprob_error"] < 1e-4  # full forward at temperature 0.7 == the sampler's log-probs

    sums = jax.jit(objective.loss_fn)(params, batch, jax.random.key(0))
    metrics = {k: float(s / c) for k, (s, c) in sums.items()}
    assert metrics["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["policy/clipfrac_avg"] == 0.0 and metrics["policy/approxkl_avg"] < 1e-10
    assert metrics["val/clipfrac_avg"] == 0.0
    assert np.isfinite(metrics["loss"])


def test_rewards_kl_gae_and_group_advantages():
    """PPO rewards = -kl_coef * KL_t everywhere + score at the last response token; GAE with
    gamma = lam = 1 and zero values gives returns = reward-to-go; GRPO/RLOO broadcast."""
    logp = jnp.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5, 0.0], [-1.0, -2.0, -1.0, -1.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = jnp.array([2.0, -1.0])
    s = AdvantageSettings("ppo", kind="k1", gamma=1.0, lam=1.0, whiten_rewards=False, whiten_advantages=False)
    adv, ret, kl, rewards = advantages(logp, ref, jnp.zeros_like(logp), scores, mask, 0.1, s)
    expected_kl = (logp - ref) * mask  # k1 = log pi - log ref
    np.testing.assert_allclose(kl, expected_kl, atol=1e-6)
    expected = -0.1 * expected_kl
    expected = expected.at[0, 2].add(2.0).at[1, 3].add(-1.0)  # score at the last response token
    np.testing.assert_allclose(rewards, expected, atol=1e-6)
    to_go = jnp.cumsum(expected[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose(ret, to_go, atol=1e-6)
    np.testing.assert_allclose(adv, to_go, atol=1e-6)
    adv, _, _, _ = advantages(logp, ref, jnp.zeros_like(logp), scores, mask, 0.1,
                              dataclasses.replace(s, whiten_advantages=True))
    assert float(jnp.sum(adv * mask)) == pytest.approx(0.0, abs=1e-5) and np.all(np.asarray(adv)[mask == 0] == 0)

    scores4 = jnp.array([1.0, 0.0, 0.0, 1.0])
    mask4 = jnp.ones((4, 3)).at[1, 2].set(0)
    z = jnp.zeros((4, 3))
    adv, *_ = advantages(z, z, z, scores4, mask4, 0.0, dataclasses.replace(s, algorithm="rloo", group_size=4))
    base = (scores4.sum() - scores4) / 3
    np.testing.assert_allclose(adv, (scores4 - base)[:, None] * mask4, atol=1e-6)
    adv, *_ = advantages(z, z, z, scores4, mask4, 0.0, dataclasses.replace(s, algorithm="grpo", group_size=2))
    np.testing.assert_allclose(adv[:, 0], [0.7071, -0.7071, -0.7071, 0.7071], atol=1e-3)  # (s - mean) / (std + eps)


def test_prompt_and_minibatch_schedules_and_metric_names():
    """Rollout k takes slot k of its epoch's prompt permutation (every prompt once per epoch);
    each epoch of a rollout visits every row once in minibatches; statistics are logged under
    TRL's names where TRL has them."""
    per_rollout, num_prompts = 8, 20  # 2 rollouts per epoch (4 prompts left out)
    first = [rollout_prompts(k, num_prompts, per_rollout, seed=3) for k in range(2)]
    assert len(set(np.concatenate(first))) == 16 and all(len(x) == per_rollout for x in first)
    order = np.random.default_rng([3, 1]).permutation(num_prompts)
    np.testing.assert_array_equal(rollout_prompts(2, num_prompts, per_rollout, seed=3), order[:per_rollout])
    schedule = UpdateSchedule(rows=12, minibatch_rows=4, epochs=2, num_minibatches=3, seed=0, rollout_size=12)
    for epoch in range(2):
        rows = [minibatch_indices(epoch * 3 + j, 5, schedule) for j in range(3)]
        assert sorted(np.concatenate(rows)) == list(range(12)) and all(np.all(np.diff(r) > 0) for r in rows)
    names = {stat: ppo.rollout_metric(stat) for stat in ppo.rollout_stat_names("grpo", True, False, ("f",))}
    assert names["kl"] == "objective/kl" and names["reward"] == "reward" and names["reward_std"] == "reward_std"
    assert names["response_length"] == "completions/mean_length" and names["rewards/f"] == "rewards/f/mean"
    assert names["score"] == "rollout/score"


# ---------------------------------------------------------------------------- learning, resume


def _rises(records):
    steps = sorted(records)
    first = np.mean([records[s]["rollout/score"] for s in steps[:4]])
    last = np.mean([records[s]["rollout/score"] for s in steps[-4:]])
    assert last > first + 0.15, (first, last)
    assert all(np.isfinite(r["loss"]) for r in records.values())


def test_ppo_raises_the_toy_reward_and_resumes_exactly(files, tmp_path):
    """24 steps (12 rollouts) of PPO with an adaptive KL coefficient raise the toy reward;
    resuming from the step-16 checkpoint reproduces steps 17-24 (same rollouts, same updates,
    same KL coefficient)."""
    import shutil

    extra = ["train.steps=24", "train.save_every=4", "ppo.ppo_epochs=1", "ppo.kl_coef=0.01",
             "ppo.adaptive_kl=true", "ppo.target_kl=1.0", "ppo.kl_horizon=100"]
    train(_config(files, "ppo", tmp_path / "full", extra))
    full = _records(tmp_path / "full")
    _rises(full)
    assert full[24]["rollout/kl_coef"] != full[1]["rollout/kl_coef"]  # the controller moved
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for step in (20, 24):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
    train(_config(files, "ppo", tmp_path / "resumed", extra))
    resumed = _records(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 25))
    for step in range(17, 25):
        for key in ("loss", "rollout/score", "objective/kl", "rollout/kl_coef", "loss/value_avg",
                    "policy/clipfrac_avg"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_grpo_raises_the_toy_reward(files, tmp_path):
    train(_config(files, "grpo", tmp_path, ["train.steps=24", "ppo.ppo_epochs=1", "ppo.beta=0.01"]))
    records = _records(tmp_path)
    _rises(records)
    assert "kl" in records[24]  # beta > 0: the k3 KL to the reference is in the loss


# ---------------------------------------------------------------------------- memory


def test_lora_policy_reference_value_and_reward_share_one_base(files, tiny, tmp_path):
    """LoRA: reference = adapters off, value = its own adapters + head on the same base arrays,
    reward model = a LoRA reward adapter of the same base: one copy of the base weights."""
    from jaxalign.models import heads
    from jaxalign.peft import lora

    model, _ = tiny
    rm = heads.add_score_head(lora.apply(model.params, 4, 8, "all-linear", jax.random.key(7)), model.config,
                              jax.random.key(8))
    heads.save_reward_adapter(rm, str(tmp_path / "rm_adapter"))
    cfg = _config(files, "ppo", "unused", ["lora.rank=4", "lora.alpha=8", "lora.targets=all-linear",
                                           "ppo.reward_fn=null", f"ppo.reward_adapter={tmp_path / 'rm_adapter'}"])
    model, objective, params, (trainable, frozen) = _objective(cfg, tiny)
    assert objective.summary["base_weight_copies"] == pytest.approx(1.0)
    # What the jitted step receives: the trainable tree holds no base weight at all ...
    assert all(x.size < model.config.hidden_size * model.config.intermediate_size
               for x in jax.tree.leaves(trainable))
    # ... and every base array of the value model is the policy's own array object.
    pol = jax.tree.leaves(lora.bases(params["policy"]["model"]))
    val = jax.tree.leaves(lora.bases(params["value"]["model"]))
    assert len(pol) == len(val) and all(a is b for a, b in zip(pol, val))
    batch = objective.sample_batch(params)  # the reward adapter scores on the shared base
    assert np.all(np.isfinite(batch["advantages"]))

    # LoRA, value model = fresh adapters + head on the policy's base, reward = a function: one copy.
    lora_fn = _config(files, "ppo", "unused", ["lora.rank=4", "lora.alpha=8", "ppo.value_model=policy"])
    assert _objective(lora_fn, tiny)[1].summary["base_weight_copies"] == pytest.approx(1.0)
    # No LoRA: policy, a frozen reference copy and a trainable value copy (lm_head-less): ~3.
    copies = ppo.build(_config(files, "ppo", "unused"), *tiny).summary["base_weight_copies"]
    assert 2.5 < copies <= 3.0


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, message", [
    ("ppo.top_p=1.5", r"top_p must be in \(0, 1\]"),
    ("ppo.temperature=-1", "temperature must be > 0"),
    ("ppo.temperature=0", "temperature must be > 0"),
    ("ppo.reward_fn=null", "exactly one of ppo.reward_model"),
    ("ppo.reward_fn=nosuchmodule:fn", "cannot import 'nosuchmodule'"),
    ("ppo.group_size=1", "group_size must be >= 2"),
    ("train.save_every=3", "multiple of the optimizer steps per rollout"),
    ("ppo.response_length=60", "exceeds the model's context"),
])
def test_bad_settings_fail_at_build(files, tiny, override, message):
    cfg = _config(files, "grpo", "unused", [override])
    with pytest.raises(ConfigError, match=message):
        ppo.build(cfg, *tiny)


def test_long_prompts_are_truncated_on_the_left_or_skipped(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = [{"prompt": "x" * 30}, {"prompt": "short"}, {"prompt": [{"role": "user", "content": "hi"}]}, {"text": "?"}]
    kept = load_prompts(rows, tok, max_prompt_length=10, truncation="left")
    assert kept.stats.truncated == 1 and kept.stats.drop_reasons == {"missing_prompt": 1} and len(kept) == 3
    assert list(kept.ids[0]) == [tok.bos_token_id] + [tok.convert_tokens_to_ids("x")] * 9  # BOS kept, tail kept
    skipped = load_prompts(rows, tok, max_prompt_length=10, truncation="skip")
    assert len(skipped) == 2 and skipped.stats.drop_reasons["too_long"] == 1
    with pytest.raises(Exception, match="no usable prompts"):
        load_prompts(rows[:1], tok, max_prompt_length=10, truncation="skip")


def test_reward_model_with_another_tokenizer_rescores_the_decoded_text(tmp_path):
    """A reward model whose tokenizer differs from the policy's scores the re-tokenized text:
    the same as scoring that text directly."""
    from transformers import AutoTokenizer

    import jaxalign as ja
    from jaxalign.models import heads
    from jaxalign.models.config import from_hf_dict

    policy_tok = AutoTokenizer.from_pretrained(TOKENIZER)
    other = AutoTokenizer.from_pretrained(TOKENIZER)
    other.add_tokens(["hello"])  # a different vocabulary: "hello" is one token here
    config = from_hf_dict({**TINY, "vocab_size": 105})
    rm = ja.init_model(config, jax.random.key(3))
    params = heads.add_score_head(rm.params, config, jax.random.key(4))
    scorer = RewardModel(params, config, None, other, policy_tok)
    assert scorer.retokenize
    prompt = policy_tok.encode("say: hello", add_special_tokens=True)
    resp = policy_tok.encode("hello", add_special_tokens=False) + [policy_tok.eos_token_id]
    p, n = 12, 8
    ids = np.zeros((1, p + n), np.int32)
    mask = np.zeros_like(ids)
    ids[0, p - len(prompt):p], mask[0, p - len(prompt):p] = prompt, 1
    ids[0, p:p + len(resp)], mask[0, p:p + len(resp)] = resp, 1
    batch = {"input_ids": ids, "attention_mask": mask, "eos": np.array([1]),
             "response_mask": mask[:, p:]}
    got = scorer(batch, p)
    direct = other.encode("say: hellohello", add_special_tokens=True) + [other.eos_token_id]
    want = heads.sequence_scores(params, config, jnp.asarray([direct]), jnp.ones((1, len(direct)), jnp.int32))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5)


# ---------------------------------------------------------------------------- issue 14


def odd_prompt(prompts, completions):
    """Toy reward: 1 for prompts of odd length, else 0 (the same for every sample of a prompt)."""
    return [float(len(p) % 2) for p in prompts]


def even_letters(prompts, completions):
    """Toy reward: the letter fraction for prompts of even length, else 0."""
    return [0.0 if len(p) % 2 else f for p, f in zip(prompts, letter_fraction(prompts, completions))]


def test_value_model_from_a_reward_model_with_another_tokenizer_is_refused(files, tiny):
    """The critic reads the policy's token ids; a reward model with another tokenizer (here a
    smaller vocabulary) would look them up out of range: value_model=reward is a ConfigError
    naming the fix, and auto picks the policy."""
    from transformers import AutoTokenizer

    import jaxalign as ja
    from jaxalign.models import heads
    from jaxalign.models.config import from_hf_dict

    model, policy_tok = tiny
    other = AutoTokenizer.from_pretrained(TOKENIZER)
    other.add_tokens(["hello"])
    config = from_hf_dict({**TINY, "vocab_size": 50})
    params = heads.add_score_head(ja.init_model(config, jax.random.key(3)).params, config, jax.random.key(4))
    scorer = RewardModel(params, config, None, other, policy_tok)
    cfg = _config(files, "ppo", "unused", ["ppo.value_model=reward"])
    with pytest.raises(ConfigError, match="ppo.value_model: policy"):
        ppo.value_params(cfg, model.params, model.config, scorer, None)
    _, value_config = ppo.value_params(_config(files, "ppo", "unused"), model.params, model.config, scorer, None)
    assert value_config is model.config


def test_lora_dropout_is_off_in_rl_updates(files, tmp_path):
    """The old log-probs are computed without dropout, so the updates run without it too: at
    the first minibatch of a rollout (step 3 here: the adapters are no longer zero) the ratio
    is 1 with lora.dropout=0.3."""
    train(_config(files, "ppo", tmp_path, ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.3", "train.steps=3",
                                           "ppo.ppo_epochs=1"]))
    first = _records(tmp_path)[3]
    assert first["policy/approxkl_avg"] < 1e-10 and first["policy/clipfrac_avg"] == 0.0
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)


def test_grpo_drops_uniform_groups_and_weighs_several_reward_functions(files, tiny):
    """drop_uniform_groups: groups whose rewards are all equal leave the loss (their response
    mask is 0), counted as frac_reward_zero_std. A reward_fn list: each function is
    logged as rewards/<name>/mean, the reward is their weighted sum."""
    fns = ["tests.test_ppo:odd_prompt", "tests.test_ppo:even_letters"]  # odd prompts: uniform groups
    cfg = _config(files, "grpo", "unused", [f"ppo.reward_fn={json.dumps(fns)}", "ppo.reward_weights=[1.0, 0.5]",
                                            "ppo.drop_uniform_groups=true", "ppo.scale_rewards=false"])
    assert cfg.ppo.scale_rewards == "none"  # the former boolean
    _, objective, params, _ = _objective(cfg, tiny)
    it = objective.train_batches
    batch = it.next(params)
    stats = dict(zip(it.stat_names, batch["rollout_stats"][0]))
    exp = {k: v for k, v in it.rows.items()}
    n = cfg.ppo.max_prompt_length
    prompt_len = exp["attention_mask"][:, :n].sum(1) - 1  # the text's characters (BOS dropped)
    odd = prompt_len % 2 == 1
    assert 0 < odd.mean() < 1
    assert np.all(exp["response_mask"][odd] == 0) and np.all(exp["response_mask"][~odd][:, 0] == 1)
    assert stats["frac_reward_zero_std"] == pytest.approx(odd.mean())
    assert stats["rewards/odd_prompt"] == pytest.approx(odd.mean()) and stats["rewards/even_letters"] > 0
    assert stats["score"] == pytest.approx(stats["rewards/odd_prompt"] + 0.5 * stats["rewards/even_letters"],
                                           rel=1e-5)
    with pytest.raises(ConfigError, match="2 weights for 1 reward functions"):
        ppo.build(_config(files, "grpo", "unused", ["ppo.reward_weights=[1, 2]"]), *tiny)


@pytest.mark.parametrize("algorithm, extra", [("rloo", ["ppo.kl_coef=0.1", "ppo.beta=0.04"]),
                                              ("grpo", ["ppo.loss_type=dapo", "ppo.epsilon_high=0.28",
                                                        "ppo.scale_rewards=batch", "ppo.beta=0.04"])])
def test_first_minibatch_of_rloo_and_grpo_variants(files, tiny, algorithm, extra):
    """RLOO's per-sequence ratios and GRPO's dapo aggregation (row_norm: the rollout's tokens
    per sequence) start at ratio 1, nothing clipped, KL 0, a finite loss."""
    cfg = _config(files, algorithm, "unused", extra)
    _, objective, params, _ = _objective(cfg, tiny)
    batch = objective.sample_batch(params)
    if algorithm == "grpo":
        n = objective.train_batches.rows["response_mask"].sum() / len(objective.train_batches.rows["response_mask"])
        np.testing.assert_allclose(batch["row_norm"], n, rtol=1e-6)
    sums = jax.jit(objective.loss_fn)(params, batch, jax.random.key(0))
    metrics = {k: float(s / c) for k, (s, c) in sums.items()}
    assert metrics["val/ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["policy/clipfrac_avg"] == 0.0
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and np.isfinite(metrics["loss"])
    if algorithm == "rloo":
        assert float(sums["loss"][1]) == 8  # a mean over the minibatch's sequences


# ---------------------------------------------------------------------------- overlong penalty, kl_in


def _first_step(cfg, tiny):
    """(experience rows, rollout stats, the first minibatch, its loss sums)."""
    _, objective, params, _ = _objective(cfg, tiny)
    batch = objective.sample_batch(params)
    it = objective.train_batches
    sums = jax.jit(objective.loss_fn)(params, batch, jax.random.key(0))
    return it.rows, dict(zip(it.stat_names, batch["rollout_stats"][0])), batch, sums, (objective, params)


def test_overlong_penalty_is_trls():
    """DAPO's soft overlong punishment (Eq. 13), as TRL's get_soft_overlong_punishment: 0 up to
    L_max - L_cache tokens, (L_max - L_cache - |y|) / L_cache up to L_max, -1 beyond."""
    from trl.rewards import get_soft_overlong_punishment

    lengths = np.arange(0, 24)
    for max_length, cache in ((20, 4), (20, 1), (20, 20), (8, 3)):
        want = get_soft_overlong_punishment(max_length, cache)([[1] * n for n in lengths])
        np.testing.assert_allclose(overlong_penalty(lengths, max_length, cache), want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(overlong_penalty([16, 17, 18, 20, 21], 20, 4), [0.0, -0.25, -0.5, -1.0, -1.0])


def test_score_adds_the_overlong_penalty_of_the_response_mask_length(tiny):
    """The length is the response mask's (the stop token included); the penalty, times the
    factor, is added to the score after the missing-EOS penalty and reported as its own part."""
    from jaxalign.algos.rollout import RewardFunctions, score

    tokenizer = tiny[1]
    mask = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])
    ids = np.where(mask > 0, tokenizer.convert_tokens_to_ids("a"), tokenizer.pad_token_id)
    batch = {"input_ids": np.concatenate([np.ones((3, 2), int), ids], 1), "response_mask": mask,
             "eos": np.array([1, 1, 0])}
    raw, scores, parts = score(batch, ["p"] * 3, RewardFunctions("tests.test_ppo:letter_fraction"), tokenizer, 2,
                               missing_eos_penalty=1.0, overlong_cache=4, overlong_factor=0.5)
    np.testing.assert_allclose(parts["overlong_penalty"], 0.5 * np.array([0.0, -0.5, -1.0]))
    np.testing.assert_allclose(scores, raw - [0.0, 0.0, 1.0] + parts["overlong_penalty"])


def test_overlong_penalty_is_in_the_reward_and_logged(files, tiny):
    """A tiny RLOO rollout with overlong_cache 4 of response_length 8: the penalty is part of
    the reward, not of the score, and is logged as rewards/overlong_penalty/mean."""
    cfg = _config(files, "rloo", "unused", ["ppo.overlong_cache=4", "ppo.overlong_penalty_factor=0.5"])
    _, stats, batch, sums, _ = _first_step(cfg, tiny)
    lengths = batch["response_mask"].sum(1)  # the random model rarely stops: mostly -0.5
    penalty = np.mean(0.5 * overlong_penalty(lengths, 8, 4))
    assert penalty < 0 and stats["rewards/overlong_penalty"] == pytest.approx(penalty, rel=1e-5)
    assert stats["reward"] == pytest.approx(stats["score"] + penalty, rel=1e-5)
    logged = sums["rewards/overlong_penalty/mean"]
    assert float(logged[0] / logged[1]) == pytest.approx(penalty, rel=1e-5)


def test_kl_in_reward_or_not():
    """Without the KL in the reward, PPO's rewards are the score at the last token only; with
    it, GRPO's advantages are computed on score - kl_coef * sum_t KL_t."""
    logp = jnp.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0], [-0.3, -2.0, -1.0], [-1.0, -0.2, -1.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5], [-1.0, -2.0, -1.0], [-0.5, -1.0, -1.5], [-0.2, -0.2, -0.9]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    scores = jnp.array([2.0, -1.0, 0.5, 1.0])
    s = AdvantageSettings("ppo", kind="k1", kl_in="loss", whiten_advantages=False)
    _, _, kl, rewards = advantages(logp, ref, jnp.zeros_like(logp), scores, mask, 0.1, s)
    np.testing.assert_allclose(kl, (logp - ref) * mask, atol=1e-6)  # still measured
    np.testing.assert_allclose(rewards, jnp.zeros((4, 3)).at[0, 2].set(2.0).at[1, 1].set(-1.0).at[2, 2].set(0.5)
                               .at[3, 0].set(1.0), atol=1e-6)
    grpo = AdvantageSettings("grpo", kind="k1", kl_in="reward", group_size=2)
    adv, *_ = advantages(logp, ref, jnp.zeros_like(logp), scores, mask, 0.1, grpo)
    shaped = scores - 0.1 * jnp.sum((logp - ref) * mask, axis=1)
    np.testing.assert_allclose(adv, rl.grpo_advantages(shaped, 2)[:, None] * mask, atol=1e-6)
    no_kl, *_ = advantages(logp, ref, jnp.zeros_like(logp), scores, mask, 0.1,
                           dataclasses.replace(grpo, kl_in="loss"))
    np.testing.assert_allclose(no_kl, rl.grpo_advantages(scores, 2)[:, None] * mask, atol=1e-6)
    assert kl_placement("ppo", "auto") == (True, False) and kl_placement("grpo", "auto") == (False, True)
    assert kl_placement("rloo", "auto") == (True, True) and kl_placement("ppo", "loss") == (False, True)


def test_ppo_kl_in_loss(files, tiny):
    """PPO with kl_in: loss: no KL in the rewards (no kl_coef / non_score_reward statistics),
    beta x the k3 KL's token mean in the loss (logged as kl)."""
    cfg = _config(files, "ppo", "unused", ["ppo.kl_in=loss", "ppo.beta=0.5"])
    _, stats, batch, sums, (objective, params) = _first_step(cfg, tiny)
    assert "kl" in stats and "kl_coef" not in stats and "non_score_reward" not in stats
    assert float(sums["kl"][0]) == pytest.approx(0.0, abs=1e-5)  # policy == reference at first
    m = batch["response_mask"]
    shifted = {**batch, "ref_logprobs": (batch["ref_logprobs"] - 0.3) * m}
    moved = jax.jit(objective.loss_fn)(params, shifted, jax.random.key(0))
    k3 = rl.kl_penalty(batch["old_logprobs"], shifted["ref_logprobs"], kind="k3")
    want = 0.5 * float(rl.masked_mean(k3, m))  # the loss is a token mean: + beta x the KL's token mean
    got = float(moved["loss"][0] / moved["loss"][1] - sums["loss"][0] / sums["loss"][1])
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("algorithm, auto, explicit", [
    ("ppo", ["ppo.kl_coef=0.2"], ["ppo.kl_coef=0.2", "ppo.kl_in=reward"]),
    ("grpo", ["ppo.beta=0.04"], ["ppo.beta=0.04", "ppo.kl_in=loss"]),
    ("rloo", ["ppo.kl_coef=0.1"], ["ppo.kl_coef=0.1", "ppo.kl_in=reward"]),
])
def test_kl_in_auto_is_the_former_placement(files, tiny, algorithm, auto, explicit):
    """kl_in: auto keeps each algorithm's former placement: PPO's in the reward, GRPO's in the
    loss (RLOO's in both: with beta 0 the same as in the reward): the same experience, the
    same loss, the same statistics."""
    def untimed(d):
        return {k: np.asarray(v) for k, v in d.items() if "time_" not in k}

    rows_a, stats_a, _, sums_a, _ = _first_step(_config(files, algorithm, "unused", auto), tiny)
    rows_e, stats_e, _, sums_e, _ = _first_step(_config(files, algorithm, "unused", explicit), tiny)
    for a, e in ((rows_a, rows_e), (untimed(stats_a), untimed(stats_e)), (untimed(sums_a), untimed(sums_e))):
        assert a.keys() == e.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def test_grpo_kl_in_reward(files, tiny):
    """GRPO with kl_in: reward: kl_coef x the sequence's KL is off the score before the group
    baseline (logged as kl_coef and non_score_reward), no KL term in the loss, no reference
    log-probs kept."""
    _, stats, batch, sums, _ = _first_step(_config(files, "grpo", "unused", ["ppo.kl_in=reward"]), tiny)
    assert stats["kl_coef"] == pytest.approx(0.05) and stats["non_score_reward"] == pytest.approx(-0.05 * stats["kl"])
    assert "kl" not in sums and "ref_logprobs" not in batch


@pytest.mark.parametrize("extra, message", [
    (["ppo.overlong_cache=9"], r"ppo.overlong_cache=9 must be in \[0, ppo.response_length=8\]"),
    (["ppo.overlong_cache=-1"], r"ppo.overlong_cache=-1 must be in"),
    (["ppo.overlong_cache=4", "ppo.overlong_penalty_factor=-1"], "ppo.overlong_penalty_factor must be >= 0"),
    (["ppo.kl_in=loss"], "ppo.beta is 0"),
    (["ppo.kl_in=reward", "ppo.beta=0.1"], "would be unused: set ppo.beta: 0"),
    (["ppo.kl_in=loss", "ppo.beta=0.1", "ppo.adaptive_kl=true"], "ppo.adaptive_kl adapts ppo.kl_coef"),
])
def test_bad_kl_in_and_overlong_settings_fail_at_build(files, tiny, extra, message):
    with pytest.raises(ConfigError, match=message):
        ppo.build(_config(files, "ppo", "unused", extra), *tiny)


def test_bad_kl_in_value_fails_at_load(files):
    with pytest.raises(ConfigError, match="ppo.kl_in='both' is not valid; choose one of: auto, reward, loss"):
        _config(files, "ppo", "unused", ["ppo.kl_in=both"])


def test_one_update_per_rollout_skips_the_old_logprob_forward(files, tiny):
    """GRPO with one update per rollout and the KL in the loss: no policy forward in the
    experience (the rows' old log-probs are the sampler's; no entropy / sampler_logprob_error
    statistics), and the loss, with the update's own log-probs as the old ones, equals the
    loss on recomputed old log-probs (ratio 1), gradients included. PPO (KL in the reward)
    still recomputes them."""
    one = ["ppo.num_minibatches=1", "ppo.ppo_epochs=1"]
    cfg = _config(files, "grpo", "unused", one + ["ppo.beta=0.04"])
    rows, stats, batch, sums, (objective, params) = _first_step(cfg, tiny)
    assert "entropy" not in stats and "sampler_logprob_error" not in stats and "kl" in stats
    policy = params["policy"]
    model = tiny[0]
    p = cfg.ppo
    recomputed, _ = jax.jit(lambda pp: response_logprobs(pp, model.config, batch["input_ids"], batch["attention_mask"],
                                                         p.max_prompt_length, temperature=p.temperature))(policy)
    np.testing.assert_allclose(batch["old_logprobs"], np.asarray(recomputed) * batch["response_mask"], atol=1e-4)
    settings = ppo.LossSettings(algorithm="grpo", prompt_length=p.max_prompt_length, temperature=p.temperature,
                                beta=0.04, loss_type=ppo.loss_type("grpo", p.loss_type),
                                stats=objective.train_batches.stat_names)
    exact = {**batch, "old_logprobs": np.asarray(recomputed)}

    def loss(pp, b, s):
        out = ppo.rl_sums(pp, b, s, model.config, None)
        return out["loss"][0] / out["loss"][1], out

    (got, got_sums), got_grad = jax.jit(jax.value_and_grad(
        lambda pp: loss(pp, batch, dataclasses.replace(settings, old_is_current=True)), has_aux=True))(params)
    (want, want_sums), want_grad = jax.jit(jax.value_and_grad(
        lambda pp: loss(pp, exact, settings), has_aux=True))(params)
    assert float(sums["loss"][0]) == pytest.approx(float(got_sums["loss"][0]), rel=1e-6)  # the objective's loss
    assert float(got_sums["val/ratio"][0] / got_sums["val/ratio"][1]) == 1.0
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-6)

    _, ppo_stats, _, _, _ = _first_step(_config(files, "ppo", "unused", one), tiny)
    assert ppo_stats["sampler_logprob_error"] < 1e-4 and "entropy" in ppo_stats
