"""Evaluation: the arithmetic task and its checkers (plain and chat-rendered prompts), prompt
encoding, `evaluate_models` on tiny random models (checker, metrics, reward, KL against direct
computations), errors for bad specs, and `jaxalign eval` end to end."""

import argparse
import json

import jax
import numpy as np
import pytest

import jaxalign as ja
from jaxalign import evaluate
from jaxalign.algos.rollout import RewardModel, load_prompts
from jaxalign.data import arithmetic, load_tokenizer
from jaxalign.data.tasks import check_answer
from jaxalign.errors import CheckpointError, ConfigError, DataError
from tests.test_rlaif import _log_softmax, _tiny_config

Q = "What is 23 plus 48? Reply with just the number."
# How SmolLM2-135M-Instruct's ChatML template renders Q as a user turn (its default system prompt).
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n")
# An earlier turn asked another sum: the checkers read the last question.
MULTI_TURN = ("<|im_start|>user\nWhat is 10 plus 10? Reply with just the number.<|im_end|>\n"
              "<|im_start|>assistant\n20<|im_end|>\n" + CHATML)
# completion -> (just_the_number, is_number_only, sum_right, reward) for 23 + 48 = 71
CASES = {
    "71": (1.0, True, True, 1.0),
    " 71\n": (1.0, True, True, 1.0),
    "72": (0.0, True, False, 0.25),
    "23 + 48 = 71": (0.0, False, True, 0.25),
    "The answer is 71.": (0.0, False, True, 0.25),
    "59 + 63 = 152": (0.0, False, False, 0.0),
    "071": (0.0, True, True, 0.25),
    "71 apples": (0.0, False, True, 0.25),
    "": (0.0, False, False, 0.0),
    "seventy-one": (0.0, False, False, 0.0),
}


def length_metric(prompts, completions):
    """A metric for the tests: characters per completion."""
    return [float(len(c)) for c in completions]


def odd_length(prompts, completions):
    """A checker for the tests that returns bools and is not constant on random models."""
    return [len(c) % 2 == 1 for c in completions]


# ---------------------------------------------------------------------------- the arithmetic task


def test_make_prompt():
    assert arithmetic.make_prompt(23, 48) == Q
    assert arithmetic.parse_prompt(Q) == (23, 48)


@pytest.mark.parametrize("prompt", [Q, CHATML, MULTI_TURN], ids=["plain", "chatml", "multi_turn"])
def test_checkers_on_hand_written_completions(prompt):
    completions = list(CASES)
    prompts = [prompt] * len(completions)
    assert arithmetic.just_the_number(prompts, completions) == [v[0] for v in CASES.values()]
    assert [arithmetic.is_number_only(c) for c in completions] == [v[1] for v in CASES.values()]
    assert [arithmetic.sum_right(prompt, c) for c in completions] == [v[2] for v in CASES.values()]
    assert arithmetic.reward(prompts, completions) == [v[3] for v in CASES.values()]
    assert arithmetic.number_only_scores(prompts, completions) == [float(v[1]) for v in CASES.values()]
    assert arithmetic.sum_right_scores(prompts, completions) == [float(v[2]) for v in CASES.values()]


def test_checkers_reject_other_prompts_and_mismatched_lengths():
    with pytest.raises(DataError, match="not an arithmetic prompt.*What is A plus B"):
        arithmetic.just_the_number(["copy: abc\n"], ["abc"])
    with pytest.raises(DataError, match="2 prompts but 1 completions"):
        arithmetic.reward([Q, Q], ["71"])


def test_splits_are_disjoint_deterministic_and_prefix_stable():
    train, held = arithmetic.make_splits(seed=0, n_train=3000, n_eval=200)
    assert len(train) == 3000 and len(held) == 200
    assert len(set(train)) == 3000 and len(set(held)) == 200
    assert all(10 <= x <= 99 for pair in train + held for x in pair)
    unordered = lambda pairs: {(min(a, b), max(a, b)) for a, b in pairs}  # noqa: E731
    assert not unordered(train) & unordered(held)  # neither 23+48 nor 48+23 leaks
    assert arithmetic.make_splits(seed=0, n_train=3000, n_eval=200) == (train, held)
    assert arithmetic.make_splits(seed=0, n_train=10, n_eval=64)[1] == held[:64]  # what `--n 64` asks
    assert arithmetic.make_splits(seed=1, n_train=0, n_eval=200)[1] != held
    assert arithmetic.eval_prompts(3) == [arithmetic.make_prompt(a, b) for a, b in held[:3]]
    with pytest.raises(DataError, match="n_train=8000 exceeds"):
        arithmetic.make_splits(seed=0, n_train=8000, n_eval=200)


def test_written_dataset_feeds_rl_prompts_and_the_checker_reads_them(tmp_path):
    assert arithmetic.main([str(tmp_path), "--n-train", "20", "--n-eval", "8"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
    train = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    assert len(rows) == 8 and len(train) == 20
    r = rows[0]
    assert r["prompt"] == [{"role": "user", "content": arithmetic.make_prompt(r["a"], r["b"])}]
    assert r["completion"] == [{"role": "assistant", "content": str(r["a"] + r["b"])}]
    assert r["answer"] == r["a"] + r["b"]
    tok = load_tokenizer()  # has a chat template: RL renders the messages with it
    prompts = load_prompts(rows, tok, max_prompt_length=200)
    assert all("<|user|>What is" in t for t in prompts.texts)
    answers = [str(r["answer"]) for r in rows]
    assert arithmetic.just_the_number(prompts.texts, answers) == [1.0] * 8
    assert arithmetic.just_the_number(prompts.texts, [str(r["answer"] + 1) for r in rows]) == [0.0] * 8
    arithmetic.write_dataset(str(tmp_path / "plain"), n_train=2, n_eval=2, chat=False)
    plain = json.loads(open(tmp_path / "plain" / "eval.jsonl").readline())
    assert plain["prompt"] == arithmetic.make_prompt(plain["a"], plain["b"]) and plain["completion"] == str(
        plain["answer"])


# ---------------------------------------------------------------------------- evaluate on tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, other model, tokenizer, dir of model): random tiny Llamas + the embedded tokenizer."""
    path = str(tmp_path_factory.mktemp("eval_model"))
    tok = load_tokenizer()
    model = ja.init_model(_tiny_config(len(tok)), jax.random.key(0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, ja.init_model(_tiny_config(len(tok)), jax.random.key(1)), tok, path


PROMPTS = evaluate.TASKS["tiny"].prompts(6)


def _direct_logprob(model, prompt_ids, response_ids):
    """log p(response | prompt) from one full forward of the unpadded sequence."""
    seq = np.asarray([list(prompt_ids) + list(response_ids)], np.int32)
    logp = _log_softmax(model.logits(seq, np.ones_like(seq))[0])
    p = len(prompt_ids)
    return sum(logp[p + i - 1, t] for i, t in enumerate(response_ids))


def test_encode_prompts_plain_chat_and_messages(tiny):
    _, _, tok, _ = tiny
    plain = evaluate.encode_prompts(tok, [Q], chat=False, max_prompt_length=200)
    assert list(plain.ids[0]) == tok.encode(Q, add_special_tokens=True) and plain.ids[0][0] == tok.bos_token_id
    assert plain.texts == [Q]
    rendered = tok.apply_chat_template([{"role": "user", "content": Q}], tokenize=False, add_generation_prompt=True)
    for prompt, chat in ((Q, True), (Q, "auto"), ([{"role": "user", "content": Q}], False)):
        got = evaluate.encode_prompts(tok, [prompt], chat=chat, max_prompt_length=200)
        assert got.texts == [rendered] and list(got.ids[0]) == tok.encode(rendered, add_special_tokens=False)
    with pytest.raises(DataError, match="1 of 2 prompts cannot be evaluated"):
        evaluate.encode_prompts(tok, [Q, "x" * 300], max_prompt_length=200)
    no_template = load_tokenizer()
    no_template.chat_template = None
    assert evaluate.encode_prompts(no_template, [Q], chat="auto", max_prompt_length=200).texts == [Q]
    with pytest.raises(ConfigError, match="no chat template"):
        evaluate.encode_prompts(no_template, [Q], chat=True, max_prompt_length=200)


def test_evaluate_models_metrics_reward_and_kl(tiny):
    from jaxalign.models import heads

    model, other, tok, _ = tiny
    rm_params = heads.add_score_head(other.params, other.config, jax.random.key(5))
    scorer = RewardModel(rm_params, other.config)
    rows = evaluate.evaluate_models({"model": model, "other": other}, tok, PROMPTS, checker=odd_length,
                                    metrics={"chars": "tests.test_eval:length_metric"}, reward_model=scorer,
                                    reference=model, max_new_tokens=8, batch_size=4, samples=len(PROMPTS))
    assert [r["model"] for r in rows] == ["model", "other"]
    encoded = evaluate.encode_prompts(tok, PROMPTS, max_prompt_length=200)
    for r, m in zip(rows, (model, other)):
        texts = [s["completion"] for s in r["samples"]]
        assert [s["prompt"] for s in r["samples"]] == PROMPTS
        assert r["accuracy"] == pytest.approx(np.mean(odd_length(PROMPTS, texts)))  # bools count as 0/1
        assert r["chars"] == pytest.approx(np.mean([len(t) for t in texts]))
        assert [s["score"] for s in r["samples"]] == [float(x) for x in odd_length(PROMPTS, texts)]
        # The completions are the greedy ones, prompt by prompt; length counts the EOS, ended = stopped at EOS.
        lengths, ended = [], []
        for ids, text in zip(encoded.ids, texts):
            out = ja.generate(m, np.asarray([ids]), None, jax.random.key(0), max_new_tokens=8, greedy=True,
                              eos_token_ids=(tok.eos_token_id,), pad_token_id=0)
            toks = np.asarray(out.tokens[0])[:int(out.lengths[0])]
            assert text == tok.decode(toks, skip_special_tokens=True)
            lengths.append(len(toks))
            ended.append(float(tok.eos_token_id in toks.tolist()))
        assert r["mean_length"] == pytest.approx(np.mean(lengths))
        assert r["ended"] == pytest.approx(np.mean(ended))
    assert rows[0]["kl_to_reference"] == 0.0  # the reference itself
    # KL of the other model: mean over prompts of log p_other(y) - log p_model(y) on other's greedy y.
    c = evaluate.greedy_completions(other, tok, encoded.ids, max_new_tokens=8, batch_size=4)
    want_kl, want_reward = [], []
    for i, ids in enumerate(encoded.ids):
        resp = c.input_ids[i, c.prompt_length:][c.response_mask[i] > 0]
        want_kl.append(_direct_logprob(other, ids, resp) - _direct_logprob(model, ids, resp))
        seq = np.asarray([list(ids) + list(resp)], np.int32)
        want_reward.append(float(heads.sequence_scores(rm_params, other.config, seq, np.ones_like(seq))[0]))
    assert rows[1]["kl_to_reference"] == pytest.approx(np.mean(want_kl), rel=1e-4, abs=1e-4)
    assert abs(rows[1]["kl_to_reference"]) > 1e-3  # two random models disagree
    assert rows[1]["mean_reward"] == pytest.approx(np.mean(want_reward), rel=1e-4, abs=1e-4)


def test_tiny_task_default_checker_is_exact_match(tiny):
    model, _, tok, _ = tiny
    prompts = PROMPTS[:2]
    [row] = evaluate.evaluate_models({"m": model}, tok, prompts, max_new_tokens=6, batch_size=2, samples=2)
    assert row["kl_to_reference"] is None and row["mean_reward"] is None
    assert row["accuracy"] == np.mean([check_answer(s["prompt"], s["completion"]) for s in row["samples"]])
    ok = evaluate.resolve(evaluate.DEFAULT_CHECKER, "checker")
    assert ok(["copy: abc\n", "reverse: abc\n"], ["abc", "abc"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "checker='no_colon' must look like 'package.module:function'"),
    ("nosuch.module:fn", "cannot import 'nosuch.module'"),
    ("jaxalign.data.arithmetic:nope", "jaxalign.data.arithmetic has no function 'nope'"),
])
def test_bad_checker_spec_is_a_clear_error(tiny, spec, message):
    model, _, tok, _ = tiny
    with pytest.raises(ConfigError, match=message):
        evaluate.evaluate_models({"m": model}, tok, PROMPTS[:1], checker=spec, max_new_tokens=4)


# ---------------------------------------------------------------------------- jaxalign eval


def cli(argv):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return evaluate.run(parser.parse_args(argv))


def test_eval_cli_end_to_end_writes_json(tiny, tmp_path, capsys):
    _, _, _, path = tiny
    out = tmp_path / "res" / "tiny.json"
    result = cli([path, "--task", "tiny", "--n", "5", "--max-new-tokens", "6", "--batch-size", "4",
                  "--reference", path, "--metric", "chars=tests.test_eval:length_metric", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["n"] == 5 and saved["checker"] == evaluate.DEFAULT_CHECKER and saved["chat"] is False
    [row] = saved["rows"]
    assert row == json.loads(json.dumps(result["rows"][0]))
    assert abs(row["kl_to_reference"]) < 1e-6  # the same weights, loaded twice
    assert row["chars"] == pytest.approx(np.mean([len(s["completion"]) for s in row["samples"]]))
    assert [s["prompt"] for s in row["samples"]] == PROMPTS[:5]
    assert "| model | accuracy | chars | mean length | ended | KL to reference |" in printed
    assert f"wrote {out}" in printed

    result = cli([path, "--task", "arithmetic", "--n", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "a.json")])
    row = result["rows"][0]
    assert result["chat"] is True and result["checker"] == "jaxalign.data.arithmetic:just_the_number"
    assert set(arithmetic.METRICS) <= set(row) and row["kl_to_reference"] is None
    assert [s["prompt"] for s in row["samples"]] == arithmetic.eval_prompts(3)
    assert "| model | accuracy | number only | sum right | mean length | ended |" in result["table"]

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": Q}]}) + "\n")
    result = cli([path, "--prompts", str(prompts), "--checker", "jaxalign.data.arithmetic:just_the_number",
                  "--max-new-tokens", "4", "--out", ""])
    assert result["n"] == 1 and result["rows"][0]["samples"][0]["prompt"] == [{"role": "user", "content": Q}]


def test_eval_cli_errors_say_how_to_fix(tiny, tmp_path):
    _, _, _, path = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(DataError, match="needs a 'prompt' column; found columns \\['question'\\]"):
        cli([path, "--prompts", str(bad), "--checker", "jaxalign.data.arithmetic:just_the_number"])
    with pytest.raises(ConfigError, match="--prompts needs --checker"):
        cli([path, "--prompts", str(bad)])
    # A bad spec fails before anything loads: the model directory does not even exist.
    with pytest.raises(ConfigError, match="--checker='x.y:z': cannot import 'x.y'"):
        cli([str(tmp_path / "missing"), "--task", "tiny", "--checker", "x.y:z"])
    with pytest.raises(ConfigError, match="--metric 'oops' must look like"):
        cli([path, "--task", "tiny", "--metric", "oops"])
    with pytest.raises(CheckpointError, match="does not exist; pass a local HF checkpoint directory"):
        cli([str(tmp_path / "missing"), "--task", "tiny", "--out", ""])
    with pytest.raises(ConfigError, match="--reference .* does not exist; pass an HF model directory"):
        cli([path, "--task", "tiny", "--reference", str(tmp_path / "nope"), "--out", ""])


def test_jaxalign_command_runs_eval(tiny, tmp_path):
    from jaxalign import cli as command

    _, _, _, path = tiny
    out = tmp_path / "r.json"
    assert command.main(["eval", path, "--task", "tiny", "--n", "2", "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 2
