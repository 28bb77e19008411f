"""AI feedback: the RLAIF judge (against direct logit computations), labeling files, the CAI
critique -> revision loop, constitution validation, bad inputs."""

import json
import os

import jax
import numpy as np
import pytest

import jaxalign as ja
from jaxalign.algos import constitutional as cai
from jaxalign.algos import rlaif
from jaxalign.data import load_tokenizer
from jaxalign.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["copy: abc\n", "reverse: xyz\n", "tell me a joke"]
RESP_A = ["abc", "zyx", "why did the chicken cross the road"]
RESP_B = ["abd", "xyz", "no"]


def _tiny_config(vocab=128):
    return ja.ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                          initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, dir): a random tiny Llama + the embedded char-level tokenizer, saved as HF."""
    path = str(tmp_path_factory.mktemp("judge"))
    tok = load_tokenizer()
    model = ja.init_model(_tiny_config(), jax.random.key(0))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _torch_last_logprobs(path, ids):
    import torch
    import transformers

    tm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return _log_softmax(tm(torch.tensor([ids])).logits[0, -1].numpy())


# ---------------------------------------------------------------------------- the judge


def test_judge_preference_equals_direct_logit_computation(tiny):
    model, tok, path = tiny
    judge = rlaif.Judge(model, tok)
    assert judge.chat and judge.labels.scoring == "token"
    principle = "Prefer correct answers."
    r = judge.compare(PROMPTS, RESP_A, RESP_B, [principle] * 3)
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    for i in range(3):
        expect = {}
        for order, (first, second) in {"ab": (RESP_A[i], RESP_B[i]), "ba": (RESP_B[i], RESP_A[i])}.items():
            # The judge prompt rendered by hand: the tiny tokenizer's chat template around the default template.
            text = ("<s><|user|>" + rlaif.JUDGE_TEMPLATE.format(prompt=PROMPTS[i], response_a=first, response_b=second,
                                                                principle=principle) + "</s><|assistant|>")
            ids = tok.encode(text, add_special_tokens=False)
            lp = _log_softmax(np.asarray(model.logits(np.asarray([ids])))[0, -1])
            expect[order] = np.exp(lp[a_id]) / (np.exp(lp[a_id]) + np.exp(lp[b_id]))  # P(label A)
            if i == 0 and order == "ab":  # and once against transformers' PyTorch forward of the saved checkpoint
                lpt = _torch_last_logprobs(path, ids)
                np.testing.assert_allclose(expect[order], np.exp(lpt[a_id]) / (np.exp(lpt[a_id]) + np.exp(lpt[b_id])),
                                           atol=1e-5)
        np.testing.assert_allclose(r["p_ab"][i], expect["ab"], atol=1e-5)
        np.testing.assert_allclose(r["p_ba"][i], 1 - expect["ba"], atol=1e-5)
        np.testing.assert_allclose(r["p"][i], (expect["ab"] + 1 - expect["ba"]) / 2, atol=1e-5)
        assert r["consistent"][i] == ((expect["ab"] > 0.5) == (expect["ba"] < 0.5))


def test_swapping_candidates_gives_the_complement(tiny):
    model, tok, _ = tiny
    judge = rlaif.Judge(model, tok, rlaif.JudgeSettings(batch_size=2))  # batching across a partial batch too
    principles = ["be concise"] * 3
    fwd = judge.compare(PROMPTS, RESP_A, RESP_B, principles)
    rev = judge.compare(PROMPTS, RESP_B, RESP_A, principles)
    # Single order: the same text is scored, so P(b better | b shown first) = 1 - P(a better | a shown second).
    np.testing.assert_allclose(rev["p_ab"], 1 - fwd["p_ba"], atol=1e-6)
    np.testing.assert_allclose(rev["p_ba"], 1 - fwd["p_ab"], atol=1e-6)
    np.testing.assert_allclose(rev["p"], 1 - fwd["p"], atol=1e-6)
    a = rlaif.label_pairs(judge, PROMPTS, RESP_A, RESP_B)
    b = rlaif.label_pairs(judge, PROMPTS, RESP_B, RESP_A)
    for x, y in zip(a, b):
        assert (x["chosen"], x["rejected"]) == (y["chosen"], y["rejected"])
        assert x["preference"] == pytest.approx(y["preference"], abs=1e-6)
        assert 0.5 <= x["preference"] < 1
        assert x["margin"] == pytest.approx(np.log(x["preference"] / (1 - x["preference"])))


def test_sharded_judge_matches_single_device(tiny):
    _, tok, path = tiny
    single = rlaif.Judge(ja.load_model(path), tok).compare(PROMPTS, RESP_A, RESP_B, ["x"] * 3)
    sharded_model = ja.load_model(path, mesh=ja.make_mesh((2, 2, 2)))
    sharded = rlaif.Judge(sharded_model, tok, rlaif.JudgeSettings(batch_size=3)).compare(PROMPTS, RESP_A, RESP_B,
                                                                                         ["x"] * 3)
    np.testing.assert_allclose(sharded["p"], single["p"], atol=1e-5)


def test_multi_token_labels_score_the_full_sequence_or_error(tiny):
    model, tok, _ = tiny
    with pytest.raises(ConfigError, match=r"splits the choice label 'first' into 5 tokens.*scoring='sequence'"):
        rlaif.Judge(model, tok, rlaif.JudgeSettings(choices=("first", "second"), scoring="token"))
    with pytest.raises(ConfigError, match="not distinguishable"):
        rlaif.Judge(model, tok, rlaif.JudgeSettings(choices=("A", "AB")))
    judge = rlaif.Judge(model, tok, rlaif.JudgeSettings(choices=("first", "second"), chat=False))
    assert judge.labels.scoring == "sequence"
    r = judge.compare(PROMPTS[:2], RESP_A[:2], RESP_B[:2], ["p"] * 2)

    def seq_logprob(text, label):
        ids = tok.encode(text + label)  # raw text: BOS added
        n = len(tok.encode(label, add_special_tokens=False))
        lp = _log_softmax(np.asarray(model.logits(np.asarray([ids])))[0])
        return sum(lp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids)))

    for i in range(2):
        text = rlaif.JUDGE_TEMPLATE.format(prompt=PROMPTS[i], response_a=RESP_A[i], response_b=RESP_B[i], principle="p")
        la, lb = seq_logprob(text, "first"), seq_logprob(text, "second")
        np.testing.assert_allclose(r["p_ab"][i], 1 / (1 + np.exp(lb - la)), atol=1e-5)
    # In "auto" mode single-token labels still use the one-position read.
    assert rlaif.Judge(model, tok).labels.scoring == "token"


def test_leading_space_variants_are_summed(tmp_path):
    """A tokenizer with " A" / " B" tokens: each label's probability is p("A") + p(" A")."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxalign.data.tokenizer import CHARACTERS, SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARACTERS + (" A", " B"))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r" [AB]|[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    model = ja.init_model(_tiny_config(), jax.random.key(3))
    judge = rlaif.Judge(model, tok, rlaif.JudgeSettings(chat=False))
    assert [[t for t, _ in v] for v in judge.labels.variants] == [["A", " A"], ["B", " B"]]
    assert judge.labels.scoring == "token"
    r = judge.compare(PROMPTS[:1], RESP_A[:1], RESP_B[:1], ["p"])
    text = rlaif.JUDGE_TEMPLATE.format(prompt=PROMPTS[0], response_a=RESP_A[0], response_b=RESP_B[0], principle="p")
    lp = _log_softmax(np.asarray(model.logits(np.asarray([tok.encode(text)])))[0, -1])
    pa = np.exp(lp[vocab["A"]]) + np.exp(lp[vocab[" A"]])
    pb = np.exp(lp[vocab["B"]]) + np.exp(lp[vocab[" B"]])
    np.testing.assert_allclose(r["p_ab"][0], pa / (pa + pb), atol=1e-5)
    no_space = rlaif.Judge(model, tok, rlaif.JudgeSettings(chat=False, leading_space=False))
    assert [[t for t, _ in v] for v in no_space.labels.variants] == [["A"], ["B"]]


# ---------------------------------------------------------------------------- labeling files


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_label_cli_writes_trl_preference_data(tiny, tmp_path):
    from jaxalign.cli import main
    from jaxalign.data import detect_format, load_rows, tokenize_preference

    _, tok, path = tiny
    data = _write_jsonl(tmp_path / "cands.jsonl", [{"prompt": p, "response_a": a, "response_b": b}
                                                   for p, a, b in zip(PROMPTS, RESP_A, RESP_B)])
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "--judge", path, "--data", data, "--out", str(out), "--principle", "honesty"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for r, a, b in zip(rows, RESP_A, RESP_B):
        assert {r["chosen"], r["rejected"]} == {a, b}
        assert set(r) >= {"prompt", "chosen", "rejected", "preference", "margin", "position_consistent"}
        assert r["principle"] == "honesty"
    loaded = load_rows(str(out))
    assert detect_format(loaded) == "preference"
    pairs, stats = tokenize_preference(loaded, tok, max_length=1024)
    assert stats.examples == 3 and pairs[0]["margin"] == pytest.approx(rows[0]["margin"])
    # Parquet output, and prompts-only input with a policy model sampling two candidates each.
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    pq = tmp_path / "prefs.parquet"
    assert main(["label", "--judge", path, "--policy", path, "--data", prompts, "--out", str(pq),
                 "--max-new-tokens", "4", "--temperature", "1.0"]) == 0
    got = load_rows(str(pq))
    assert len(got) == 2 and set(got.column_names) >= {"prompt", "chosen", "rejected", "margin"}


def length_score(prompts, completions):
    """A scoring judge for the tests: longer is better."""
    return [float(len(c)) for c in completions]


def first_wins(prompts, completions):
    """A reference scorer: the first candidate of each pair (even index) wins, except on row 1 (a tie)."""
    return [0.0 if i in (2, 3) else float(i % 2 == 0) for i in range(len(completions))]


def test_label_by_score_takes_best_vs_worst_and_drops_ties():
    prompts = ["p0", [{"role": "user", "content": "p1"}], "p2"]
    candidates = [["a", "bbb", "cc"], ["x", "yy", "zzz"], ["same", "same", "same"]]
    scores = rlaif.score_candidates(length_score, prompts, candidates)
    assert scores.tolist() == [[1, 3, 2], [1, 2, 3], [4, 4, 4]]
    rows, ties = rlaif.label_by_score(prompts, candidates, scores)
    assert ties == 1 and len(rows) == 2
    assert rows[0] == {"prompt": "p0", "chosen": "bbb", "rejected": "a", "score_chosen": 3.0, "score_rejected": 1.0}
    # a conversation prompt gives TRL's conversational layout: chosen/rejected as assistant turns
    assert rows[1]["prompt"] == [{"role": "user", "content": "p1"}]
    assert rows[1]["chosen"] == [{"role": "assistant", "content": "zzz"}]
    assert rows[1]["rejected"] == [{"role": "assistant", "content": "x"}]
    with pytest.raises(DataError, match="one finite float per completion"):
        rlaif.score_candidates(lambda p, c: [1.0], prompts, candidates)


def test_judge_agreement_counts_only_pairs_the_reference_separates():
    rows = [{"chosen": "a0"}, {"chosen": "b1"}, {"chosen": [{"role": "assistant", "content": "b2"}]}]
    info = rlaif.judge_agreement(rows, np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.5, 1.0]), ["a0", "a1", "a2"])
    assert info == {"agreement": 1.0, "compared": 2, "reference_ties": 1}
    assert [r["reference_agrees"] for r in rows] == [True, None, True]
    rows = [{"chosen": "b0"}]
    assert rlaif.judge_agreement(rows, np.array([1.0]), np.array([0.0]), ["a0"])["agreement"] == 0.0


def test_label_cli_with_a_scoring_judge_samples_several_candidates(tiny, tmp_path, capsys):
    from jaxalign.cli import main
    from jaxalign.data import detect_format, load_rows, tokenize_preference

    _, tok, path = tiny
    convs = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    data = _write_jsonl(tmp_path / "prompts.jsonl", convs)
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "--judge-fn", "tests.test_rlaif:length_score", "--policy", path, "--num-samples", "4",
                 "--data", data, "--out", str(out), "--max-new-tokens", "6", "--temperature", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "best vs worst of 4 candidates" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"wrote {len(rows)} preference pairs" in printed
    assert f"{3 - len(rows)} of 3 prompts dropped" in printed  # every prompt is a pair or a counted tie
    for r in rows:
        assert r["score_chosen"] > r["score_rejected"]
        assert len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"])
        assert r["prompt"] in [c["prompt"] for c in convs]
    loaded = load_rows(str(out))
    assert detect_format(loaded) == "preference"
    _, stats = tokenize_preference(loaded, tok, max_length=1024)
    assert stats.examples == len(rows)


def test_model_judge_reports_agreement_with_a_reference_scorer(tiny, tmp_path):
    _, _, path = tiny
    data = _write_jsonl(tmp_path / "cands.jsonl", [{"prompt": p, "response_a": a, "response_b": b}
                                                   for p, a, b in zip(PROMPTS, RESP_A, RESP_B)])
    info = rlaif.label(path, data, str(tmp_path / "o.jsonl"), agreement_fn="tests.test_rlaif:first_wins",
                       settings=rlaif.JudgeSettings(principle="honesty"))
    rows = [json.loads(line) for line in open(info["out"])]
    picked_a = [r["chosen"] == a for r, a in zip(rows, RESP_A)]
    assert info["compared"] == 2 and info["reference_ties"] == 1
    assert info["agreement"] == pytest.approx((picked_a[0] + picked_a[2]) / 2)
    assert [r["reference_agrees"] for r in rows] == [picked_a[0], None, picked_a[2]]


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --judge --judge-fn is required"),
    (["--judge", "J", "--judge-fn", "m:f"], "not allowed with argument"),
])
def test_label_needs_exactly_one_judge(tmp_path, capsys, args, message):
    from jaxalign.cli import main

    with pytest.raises(SystemExit):
        main(["label", *args, "--data", "d.jsonl", "--out", str(tmp_path / "o.jsonl")])
    assert message in capsys.readouterr().err


def test_label_rejects_inconsistent_judge_settings(tiny, tmp_path):
    _, _, path = tiny
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    with pytest.raises(ConfigError, match="model judge compares pairs"):
        rlaif.label(path, data, str(tmp_path / "o.jsonl"), policy_dir=path, num_samples=3)
    with pytest.raises(ConfigError, match="labels already come from that scorer"):
        rlaif.label(None, data, str(tmp_path / "o.jsonl"), judge_fn=length_score, agreement_fn=length_score)
    with pytest.raises(DataError, match="all 1 prompts' candidates scored the same"):
        rlaif.label(None, data, str(tmp_path / "o.jsonl"), judge_fn=lambda p, c: [0.0] * len(c), policy_dir=path,
                    num_samples=2, sample={"max_new_tokens": 2})
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(DataError, match="row 0: 'prompt' is .*ending with a user turn"):
        rlaif.read_candidates(bad, need_responses=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_candidates_name_the_row_and_nothing_is_written(tiny, tmp_path):
    from jaxalign.cli import main

    _, _, path = tiny
    rows = [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in zip(PROMPTS, RESP_A, RESP_B)]
    rows[2]["response_b"] = None
    data = _write_jsonl(tmp_path / "cands.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2 has no 'response_b'"):
        rlaif.read_candidates(data)
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "--judge", path, "--data", data, "--out", str(out)]) == 2
    assert not out.exists() and os.listdir(tmp_path) == ["cands.jsonl"]
    only_a = _write_jsonl(tmp_path / "only_a.jsonl", [{"prompt": "p", "response_a": "x"}])
    with pytest.raises(DataError, match=r"\['response_b'\] missing.*policy model"):
        rlaif.read_candidates(only_a)


def test_outputs_are_written_atomically(tmp_path):
    out = tmp_path / "prefs.jsonl"
    cai.write_rows(str(out), [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    before = out.read_text()
    with pytest.raises(TypeError):
        cai.write_rows(str(out), [{"prompt": "p"}, {"prompt": object()}])  # fails half-way through
    assert out.read_text() == before
    assert os.listdir(tmp_path) == ["prefs.jsonl"]  # no temp file left behind


@pytest.mark.parametrize("algorithm", ["reward", "dpo"])
def test_label_output_trains_reward_model_and_dpo(tiny, tmp_path, algorithm):
    pytest.importorskip(f"jaxalign.algos.{algorithm}")
    from jaxalign.config import load_config
    from jaxalign.train.loop import train

    _, _, path = tiny
    config = os.path.join(ROOT, "configs", "quickstart", f"{algorithm}.yaml")
    if not os.path.exists(config):
        pytest.skip(f"{config} not written yet")
    src = [json.loads(line) for line in open(os.path.join(ROOT, "jaxalign", "assets", "tiny", "prefs_eval.jsonl"))][:8]
    data = _write_jsonl(tmp_path / "cands.jsonl", [{"prompt": r["prompt"], "response_a": r["chosen"],
                                                    "response_b": r["rejected"]} for r in src])
    out = str(tmp_path / "labeled.jsonl")
    rlaif.label(path, data, out, settings=rlaif.JudgeSettings(batch_size=8))
    cfg = load_config(config, [f"model.path={path}", f"output_dir={tmp_path / 'run'}", f"data.train={out}",
                               "data.eval=null", "train.steps=2", "train.batch_size=8", "train.log_every=1",
                               "train.export=false", "train.async_checkpoints=false", "train.eval_every=null"])
    metrics = train(cfg)
    assert np.isfinite(metrics["loss"])


# ---------------------------------------------------------------------------- constitution


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_default_constitution_loads():
    c = cai.load_constitution()
    names = [p.name for p in c.principles]
    assert {"harmlessness", "helpfulness", "honesty", "conciseness"} <= set(names)
    assert all(p.critique_request and p.revision_request and p.judge_text for p in c.principles)
    assert c.few_shot and set(c.few_shot[0]) == set(cai._FEW_SHOT_KEYS)


@pytest.mark.parametrize("text, message", [
    ("principles:\n  - {name: a, critique_request: c, revision_request: r}\n  - {name: honesty, critique_request: c}\n",
     r"principles\[1\] \('honesty'\) is missing 'revision_request'"),
    ("principles:\n  - {name: a, critique_request: c, revision_request: r, judge_promt: j}\n",
     r"principles\[0\] \('a'\): unknown key 'judge_promt' \(did you mean 'judge_prompt'\?\)"),
    ("principles:\n  - {critique_request: c, revision_request: r}\n", r"principles\[0\] is missing 'name'"),
    ("principles:\n  - just a string\n", r"principles\[0\] must be a mapping"),
    ("principles: []\n", r"'principles' must be a non-empty list"),
    ("principles:\n  - {name: a, critique_request: c, revision_request: r}\n  - {name: a, critique_request: c, "
     "revision_request: r}\n", r"principles\[1\] \('a'\): the name 'a' is already used by principles\[0\]"),
    ("principles:\n  - {name: a, critique_request: c, revision_request: r}\nfew_shot:\n  - {prompt: p, response: r}\n",
     r"few_shot\[0\] is missing 'critique_request'"),
    ("principles:\n  - {name: a, critique_request: c, revision_request: r}\ntemplates:\n  critique: '{prompt} {judge}'\n",
     r"templates.critique template uses the field \{judge\}"),
    ("principle:\n  - {name: a}\n", r"unknown top-level key 'principle' \(did you mean 'principles'\?\)"),
    ("principles: [\n", r"not valid YAML"),
])
def test_malformed_constitution_names_the_entry(tmp_path, text, message):
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=message) as e:
        cai.load_constitution(path)
    assert path in str(e.value)


def test_cli_reports_a_malformed_constitution(tiny, tmp_path, capsys):
    from jaxalign.cli import main

    _, _, path = tiny
    bad = _write(tmp_path / "c.yaml", "principles:\n  - {name: x, critique_request: c}\n")
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response_a": "a", "response_b": "b"}])
    assert main(["label", "--judge", path, "--data", data, "--out", str(tmp_path / "o.jsonl"),
                 "--constitution", bad]) == 2
    assert "principles[0] ('x') is missing 'revision_request'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- CAI supervised phase


CONSTITUTION = {
    "principles": [{"name": "kind", "critique_request": "Is it unkind?", "revision_request": "Make it kind."}],
    "few_shot": [{"prompt": "hi", "response": "go", "critique_request": "Rude?", "critique": "Yes.",
                  "revision_request": "Fix.", "revision": "hello"}],
    "templates": {"critique": "Q: {prompt}\nA: {response}\nCR: {critique_request}\nC:",
                  "revision": "Q: {prompt}\nA: {response}\nCR: {critique_request}\nC: {critique}\nRR: {revision_request}\nR:"},
}


def test_cai_records_critiques_and_revisions_with_configured_templates(tiny, tmp_path):
    model, tok, _ = tiny
    s = cai.CAISettings(max_new_tokens=4, temperature=0.0, chat=False, revisions=2,
                        templates={"answer": "User: {prompt}\nBot:"})
    res = cai.critique_revise(model, tok, PROMPTS[:2], CONSTITUTION, s)
    assert len(res.records) == 4 and [r["round"] for r in res.records] == [1, 1, 2, 2]
    t = CONSTITUTION["templates"]
    shot = CONSTITUTION["few_shot"][0]
    crit_prefix = t["critique"].format(**shot) + " Yes.\n\n"
    rev_prefix = t["revision"].format(**shot) + " hello\n\n"
    for rec in res.records:
        assert rec["answer_prompt"] == f"User: {rec['prompt']}\nBot:"
        assert rec["principle"] == "kind"
        assert rec["critique_prompt"] == crit_prefix + t["critique"].format(
            prompt=rec["prompt"], response=rec["initial_answer"], critique_request="Is it unkind?")
        assert rec["revision_prompt"] == rev_prefix + t["revision"].format(
            prompt=rec["prompt"], response=rec["initial_answer"], critique_request="Is it unkind?",
            critique=rec["critique"], revision_request="Make it kind.")
        assert set(rec) == {"prompt", "round", "answer_prompt", "initial_answer", "principle", "critique_prompt",
                            "critique", "revision_prompt", "revision"}
    # Round 2 critiques round 1's revision; the SFT completion is the last revision.
    assert [r["initial_answer"] for r in res.records[2:]] == [r["revision"] for r in res.records[:2]]
    assert res.sft_rows == [{"prompt": r["answer_prompt"], "completion": " " + r["revision"]} for r in res.records[2:]]
    # Greedy generations are the model's: the recorded critique is what greedy decoding of the prompt gives.
    again = cai.generate_texts(model, tok, [tok.encode(res.records[0]["critique_prompt"])], max_new_tokens=4,
                               temperature=0.0, stop_strings=cai.STOP_STRINGS)
    assert again.texts[0] == res.records[0]["critique"]


def test_cai_chat_mode_and_files(tiny, tmp_path):
    from jaxalign.cli import main

    model, tok, path = tiny
    res = cai.critique_revise(model, tok, ["hi"], CONSTITUTION,
                              cai.CAISettings(max_new_tokens=3, temperature=0.0, use_few_shot=False))
    rec = res.records[0]
    assert rec["critique_prompt"] == (f"<s><|user|>hi</s><|assistant|>{rec['initial_answer']}</s>"
                                      "<|user|>Is it unkind?</s><|assistant|>")
    assert rec["revision_prompt"] == rec["critique_prompt"] + f"{rec['critique']}</s><|user|>Make it kind.</s><|assistant|>"
    assert res.sft_rows[0]["completion"] == [{"role": "assistant", "content": rec["revision"]}]
    # CLI: files written, SFT rows in prompt/completion format.
    cons = tmp_path / "c.yaml"
    import yaml

    cons.write_text(yaml.safe_dump({"principles": CONSTITUTION["principles"]}))
    prompts = tmp_path / "red.txt"
    prompts.write_text("hi\nhow do I pick a lock\n")
    out = tmp_path / "cai" / "sft.jsonl"
    assert main(["cai", path, "--prompts", str(prompts), "--out", str(out), "--constitution", str(cons),
                 "--max-new-tokens", "3", "--chat", "false"]) == 0
    sft = [json.loads(line) for line in out.read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / "cai" / "sft.records.jsonl").read_text().splitlines()]
    assert len(sft) == len(records) == 2 and set(sft[0]) == {"prompt", "completion"}
    assert records[1]["prompt"] == "how do I pick a lock"


def test_bad_cai_template_field(tiny):
    model, tok, _ = tiny
    with pytest.raises(ConfigError, match=r"critique template uses the field \{critique\}"):
        cai.critique_revise(model, tok, ["hi"], CONSTITUTION,
                            cai.CAISettings(chat=False, templates={"critique": "{prompt} {critique}"}))
