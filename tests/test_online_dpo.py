"""Online DPO: pairs from the judge's scores, the loss against `dpo` on the same log-probs,
a short run's metrics, exact resume, the judge model, and the errors for bad settings."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.algos import online_dpo
from jaxalign.algos.preference_losses import dpo
from jaxalign.config import load_config
from jaxalign.errors import ConfigError
from jaxalign.parallel.mesh import MeshConfig, make_mesh
from jaxalign.train.loop import apply_transforms, build_model, load_tokenizer, partition_params, train
from jaxalign.train.metrics import read_metrics

from tests.test_ppo import TINY, TOKENIZER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random model (config.json + weights dir) and 32 prompts ("say: <letters>")."""
    d = tmp_path_factory.mktemp("online_dpo")
    (d / "config.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    rows = [{"prompt": "say: " + "".join(rng.choice(letters, rng.integers(2, 6)))} for _ in range(32)]
    (d / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def _config(files, out, extra=()):
    return load_config(None, [
        "algorithm=online_dpo", f"output_dir={out}", f"model.config={files / 'config.json'}",
        f"model.tokenizer={TOKENIZER}", f"data.train={files / 'prompts.jsonl'}", "data.eval=null",
        "train.batch_size=8", "train.log_every=1", "train.async_checkpoints=false", "train.export=false",
        "train.steps=4", "optim.learning_rate=3e-3", "optim.schedule=constant", "ppo.response_length=8",
        "ppo.max_prompt_length=12", "ppo.temperature=1.0", "ppo.reward_fn=tests.test_ppo:letter_fraction",
        *extra])


@pytest.fixture(scope="module")
def tiny(files):
    cfg = _config(files, "unused")
    return build_model(cfg, make_mesh(MeshConfig(-1, 1, 1))), load_tokenizer(cfg)


def test_pairs_from_scores_choose_the_higher_score_and_drop_ties():
    # prompt 0: second wins; 1: first wins; 2: tie (dropped); 3: first wins by a hair
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.3, 1.0, 0.999])
    chosen, rejected, kept = online_dpo.pairs_from_scores(scores)
    assert chosen.tolist() == [1, 2, 4, 6] and rejected.tolist() == [0, 3, 5, 7]
    assert kept.tolist() == [True, True, False, True]
    assert np.all(scores[chosen][kept] > scores[rejected][kept])


def test_pair_rows_mark_the_response_and_drop_tied_pairs():
    p = 3  # prompt columns: [pad, bos, x] then 2 response columns
    batch = {"input_ids": np.array([[0, 1, 5, 7, 2], [0, 1, 5, 8, 0]], np.int32),
             "attention_mask": np.array([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]], np.int32),
             "response_mask": np.array([[1, 1], [1, 0]], np.int32)}
    rows = online_dpo.pair_rows(batch, np.array([1]), np.array([0]), np.array([True]), p)
    assert rows["chosen_input_ids"].tolist() == [[0, 1, 5, 8, 0]]
    assert rows["chosen_loss_mask"].tolist() == [[0, 0, 0, 1, 0]]
    assert rows["rejected_loss_mask"].tolist() == [[0, 0, 0, 1, 1]]
    assert rows["rejected_positions"].tolist() == [[0, 0, 1, 2, 3]]  # real tokens count from 0
    tied = online_dpo.pair_rows(batch, np.array([1]), np.array([0]), np.array([False]), p)
    assert tied["chosen_loss_mask"].sum() == 0 and tied["rejected_loss_mask"].sum() == 0


def _first_step(cfg, tiny):
    """What the loop does before its first step: transforms, build, params, one sampled batch."""
    model, tokenizer = tiny
    model = apply_transforms(model, cfg)
    objective = online_dpo.build(cfg, model, tokenizer)
    params = objective.init_params(model.params) if objective.init_params else model.params
    partition_params(params, objective.trainable_mask)
    return model, objective, params, objective.sample_batch(params)


def test_loss_is_dpo_on_the_policy_and_reference_logprobs(files, tiny):
    """At the first step the loss equals `dpo` on the chosen / rejected log-probs (sums over
    the response) of the policy and the frozen reference, averaged over the untied pairs."""
    from jaxalign.algos.dpo import pair_logps

    cfg = _config(files, "unused")
    model, objective, params, batch = _first_step(cfg, tiny)
    assert set(params) == {"policy", "reference"}  # no LoRA: a frozen copy
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    pc, pr, lc, lr = pair_logps(params["policy"], model.config, arrays)
    rc, rr, _, _ = pair_logps(params["reference"], model.config, arrays)
    np.testing.assert_allclose(batch["ref_chosen_logps"][lc > 0], rc[lc > 0], rtol=1e-5, atol=1e-5)
    losses, _, _ = dpo(pc, pr, rc, rr, beta=0.1)
    kept = np.asarray(lc > 0)
    out = objective.loss_fn(params, arrays, jax.random.key(0))
    s, n = out["loss"]
    assert float(n) == kept.sum() >= 1
    np.testing.assert_allclose(float(s) / float(n), float(np.mean(np.asarray(losses)[kept])), rtol=1e-5)
    np.testing.assert_allclose(float(s) / float(n), np.log(2), rtol=1e-4)  # policy == reference at step 0


def test_score_gaps_offset_the_loss_with_margin_from_scores(files, tiny):
    """`dpo.margin_from_scores`: each pair carries the judge's score gap (chosen - rejected >= 0),
    and at step 0 the loss is -log sigmoid(-alpha * gap) averaged over the pairs kept (ODPO)."""
    cfg = _config(files, "unused", ["dpo.margin_from_scores=2.0"])
    model, objective, params, batch = _first_step(cfg, tiny)
    kept = batch["chosen_loss_mask"].sum(1) > 0
    gap = batch["score_gap"][kept]
    assert np.all(gap > 0)
    s, n = objective.loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))["loss"]
    expected = np.mean(np.log1p(np.exp(2.0 * gap)))
    np.testing.assert_allclose(float(s) / float(n), expected, rtol=1e-4)


def test_short_run_logs_finite_metrics_and_resumes_exactly(files, tmp_path):
    """6 steps with a checkpoint every 2: TRL's metric names, all finite; resuming from the
    step-4 checkpoint repeats steps 5-6 (same samples, same losses)."""
    extra = ["train.steps=6", "train.save_every=2", "ppo.missing_eos_penalty=0.5"]
    train(_config(files, tmp_path / "full", extra))
    full = {r["step"]: r for r in read_metrics(str(tmp_path / "full")) if "loss" in r}
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "objective/scores_margin", "val/contain_eos_token", "judge/tie_fraction",
             "completions/mean_length", "rewards/letter_fraction/mean"]
    for step in range(1, 7):
        for name in names:
            assert np.isfinite(full[step][name]), (step, name)
    assert full[1]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference before any update
    assert full[6]["objective/kl"] != pytest.approx(0.0, abs=1e-4)
    assert full[1]["objective/scores_margin"] >= 0  # chosen = the higher score
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    train(_config(files, tmp_path / "resumed", extra))
    resumed = {r["step"]: r for r in read_metrics(str(tmp_path / "resumed")) if "loss" in r}
    assert sorted(resumed) == list(range(1, 7))
    for step in (5, 6):
        for name in ("loss", "objective/scores", "objective/kl", "rewards/margins"):
            assert resumed[step][name] == pytest.approx(full[step][name], rel=1e-5, abs=1e-7), (step, name)


@pytest.mark.parametrize("override, message", [
    ("ppo.reward_fn=null", "set exactly one of online_dpo.judge"),
    ("online_dpo.judge=some/judge", r"got ppo.reward_fn, online_dpo.judge"),
    ("ppo.reward_fn=nosuchmodule:fn", "cannot import 'nosuchmodule'"),
    ("ppo.cliprange=0.1", "does not use ppo.cliprange"),
    ("dpo.reference=precomputed", "cannot work online"),
    ("dpo.max_prompt_length=8", "remove dpo.max_prompt_length"),
    ("ppo.temperature=0", "temperature must be > 0"),
    ("dpo.loss_type=orpo", None),  # reference-free: builds
])
def test_bad_settings_fail_at_build(files, tiny, override, message):
    cfg = _config(files, "unused", [override])
    if message is None:
        assert online_dpo.build(cfg, *tiny).summary["reference memory"] == "none"
        return
    with pytest.raises(ConfigError, match=message):
        online_dpo.build(cfg, *tiny)


def test_judge_model_and_win_rate_over_the_reference(files, tiny, tmp_path):
    """A judge model (the tiny model itself, LoRA policy): the judge's metrics are logged, and
    the eval win rate over the reference is 0.5 with all ties at step 0 (policy == reference,
    greedy), a rate in [0, 1] after training."""
    model, tokenizer = tiny
    model.save_pretrained(str(tmp_path / "judge"))
    tokenizer.save_pretrained(str(tmp_path / "judge"))
    extra = ["ppo.reward_fn=null", f"online_dpo.judge={tmp_path / 'judge'}", "online_dpo.judge_chat=false",
             "online_dpo.judge_template='P:{prompt} A:{response_a} B:{response_b} Answer:'",
             "online_dpo.principle=helpfulness", "lora.rank=4", "lora.alpha=8", "train.steps=3",
             f"data.eval={files / 'prompts.jsonl'}", "data.max_eval_examples=8"]
    train(_config(files, tmp_path / "run", extra))
    records = read_metrics(str(tmp_path / "run"))
    steps = {r["step"]: r for r in records if "loss" in r}
    for name in ("loss", "judge/preference", "judge/position_consistent", "judge/tie_fraction", "objective/kl"):
        assert all(np.isfinite(steps[s][name]) for s in (1, 2, 3)), name
    assert 0.5 <= steps[1]["judge/preference"] <= 1.0
    evals = [r for r in records if "eval/win_rate" in r]
    assert evals[0]["eval/win_rate"] == 0.5 and evals[0]["eval/tie_fraction"] == 1.0
    assert 0.0 <= evals[-1]["eval/win_rate"] <= 1.0


def test_judge_model_that_does_not_exist_is_a_clear_error(files, tiny, tmp_path):
    cfg = _config(files, "unused", ["ppo.reward_fn=null", f"online_dpo.judge={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="online_dpo.judge=.*nothing' does not exist"):
        online_dpo.build(cfg, *tiny)


def test_quickstart_runs_through_the_cli(tiny, tmp_path):
    """configs/quickstart/online_dpo.yaml (bundled prompts, the task checker as judge) on a tiny
    random policy: the run finishes and evaluates the win rate over the reference."""
    from jaxalign.cli import main

    model, tokenizer = tiny
    model.save_pretrained(str(tmp_path / "policy"))
    tokenizer.save_pretrained(str(tmp_path / "policy"))
    args = ["train", os.path.join(ROOT, "configs", "quickstart", "online_dpo.yaml"), f"output_dir={tmp_path / 'run'}",
            f"model.path={tmp_path / 'policy'}", "train.steps=2", "train.batch_size=8", "data.max_eval_examples=8",
            "train.eval_every=null", "train.save_every=null", "train.async_checkpoints=false", "train.export=false"]
    assert main(args) == 0
    records = read_metrics(str(tmp_path / "run"))
    evals = [r for r in records if "eval/win_rate" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(0.0 <= r["eval/score"] <= 1.0 and 0.0 <= r["eval/reference_score"] <= 1.0 for r in evals)
    assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()


def test_prompts_follow_data_columns_and_system_prompt(files, tmp_path):
    """`data.columns` and `data.system_prompt` reach the prompts online methods sample from."""
    from jaxalign.algos.ppo import load_rl_prompts
    from tests.hf_models import chatml_tokenizer

    rows = [{"question": "say: ab"}, {"question": "say: cd"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    base = [f"data.train={tmp_path / 'q.jsonl'}", "ppo.max_prompt_length=64"]
    chatml = chatml_tokenizer()
    with pytest.raises(Exception, match="no usable prompts.*missing_prompt.*data.columns"):
        load_rl_prompts(_config(files, "unused", base), chatml)
    train, _ = load_rl_prompts(_config(files, "unused", [*base, "data.columns={prompt: question}",
                                                         "data.system_prompt=Be brief."]), chatml)
    assert [t.split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for t in train.texts] == ["say: ab", "say: cd"]
    assert all(t.startswith("<|im_start|>system\nBe brief.") for t in train.texts)
