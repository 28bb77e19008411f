"""Tests of the data layer: sources, formats + loss masks, batching, embedded task/tokenizer."""

import json
import random

import numpy as np
import pytest

from jaxalign.data import (
    BatchIterator,
    default_buckets,
    detect_format,
    first_fit_pack,
    load_rows,
    load_tokenizer,
    split_implicit_prompt,
    tokenize_preference,
    tokenize_sft,
)
from jaxalign.data import tasks
from jaxalign.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    """The tiny tokenizer without a chat template."""
    t = load_tokenizer()
    t.chat_template = None
    return t


def targets(tok, ex):
    """Decoded text of the target tokens."""
    ids = ex["input_ids"][ex["loss_mask"] == 1]
    return tok.decode(ids.tolist(), skip_special_tokens=False)


MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "copy: abc"},
    {"role": "assistant", "content": "abc"},
    {"role": "user", "content": "reverse: xyz"},
    {"role": "assistant", "content": "zyx"},
]


# ----------------------------------------------------------------------------- sources


def test_load_rows_local_files(tmp_path):
    rows = [{"prompt": "copy: ab\n", "completion": "ab"}, {"prompt": "copy: cd\n", "completion": "cd"}]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_rows(str(p))
    assert len(ds) == 2 and ds[1]["completion"] == "cd"
    ds = load_rows("json", data_files=[str(p), str(p)])
    assert len(ds) == 4
    import datasets

    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    assert load_rows(str(pq))[0]["prompt"] == "copy: ab\n"
    assert load_rows(rows) == rows


def test_load_rows_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(empty))
    with pytest.raises(DataError, match="empty"):
        load_rows([])
    with pytest.raises(DataError, match="row 1"):
        load_rows([{"text": "a"}, "b"])


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "columns,fmt",
    [
        (["text"], "language_modeling"),
        (["messages"], "language_modeling"),
        (["prompt", "completion"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected", "margin"], "implicit_preference"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_from_rows_and_kind():
    assert detect_format([{"prompt": "p", "completion": "c"}]) == "prompt_completion"
    # A preference dataset has a prompt but no completion: not an SFT dataset.
    with pytest.raises(DataError, match="chosen"):
        detect_format(["prompt", "chosen", "rejected"], kind="sft")


def test_detect_format_error_names_columns_and_formats():
    with pytest.raises(DataError) as e:
        detect_format(["question", "answer"])
    msg = str(e.value)
    assert "question" in msg and "answer" in msg
    assert "prompt_completion" in msg and "'completion'" in msg and "messages" in msg


def test_missing_column_error_names_it(tok):
    with pytest.raises(DataError) as e:
        tokenize_sft([{"prompt": "copy: ab\n"}], tok, format="prompt_completion")
    assert "'completion'" in str(e.value) and "found columns ['prompt']" in str(e.value)
    with pytest.raises(DataError, match="'rejected'"):
        tokenize_preference([{"prompt": "p", "chosen": "a"}], tok, format="preference")


def test_prompt_completion_mask(tok):
    rows = [{"prompt": "reverse: abcde\n", "completion": "edcba"}]
    (ex,), stats = tokenize_sft(rows, tok)
    assert stats.format == "prompt_completion" and stats.examples == 1
    assert ex["input_ids"].dtype == np.int32 and ex["loss_mask"].shape == ex["input_ids"].shape
    assert targets(tok, ex) == "edcba</s>"
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"].tolist(), skip_special_tokens=True) == "reverse: abcde\nedcba"
    # Full-sequence training: every token but the first.
    (full,), _ = tokenize_sft(rows, tok, completion_only=False)
    assert full["loss_mask"][0] == 0 and full["loss_mask"][1:].all()


def test_text_format_trains_on_everything(tok):
    (ex,), stats = tokenize_sft([{"text": "hello world"}], tok)
    assert stats.format == "language_modeling"
    assert targets(tok, ex) == "hello world</s>"
    assert ex["loss_mask"][0] == 0 and ex["loss_mask"][1:].all()


def test_messages_mask_covers_assistant_turns(tok):
    (ex,), _ = tokenize_sft([{"messages": MESSAGES}], tok)
    assert targets(tok, ex) == "abc</s>zyx</s>"
    text = tok.decode(ex["input_ids"].tolist(), skip_special_tokens=False)
    assert text == tok.apply_chat_template(MESSAGES, tokenize=False)
    # The assistant role marker is context, not a target.
    marker = tok.convert_tokens_to_ids("<|assistant|>")
    assert not ex["loss_mask"][ex["input_ids"] == marker].any()
    (full,), _ = tokenize_sft([{"messages": MESSAGES}], tok, completion_only=False)
    assert full["loss_mask"][1:].all()


def test_conversational_prompt_completion(tok):
    row = {"prompt": MESSAGES[:4], "completion": [{"role": "assistant", "content": "zyx"}]}
    (ex,), stats = tokenize_sft([row], tok)
    assert stats.format == "prompt_completion"
    assert targets(tok, ex) == "zyx</s>"


def test_alpaca(tok, plain_tok):
    rows = [
        {"instruction": "reverse the word", "input": "abc", "output": "cba"},
        {"instruction": "say hi", "output": "hi"},
    ]
    (a, b), stats = tokenize_sft(rows, tok)
    assert stats.format == "alpaca"
    assert targets(tok, a) == "cba</s>" and targets(tok, b) == "hi</s>"
    assert "<|user|>reverse the word\n\nabc</s>" in tok.decode(a["input_ids"].tolist(), skip_special_tokens=False)
    # Without a chat template: the classic Alpaca prompt text.
    (a, b), _ = tokenize_sft(rows, plain_tok)
    assert targets(plain_tok, a) == "cba</s>"
    text = plain_tok.decode(a["input_ids"].tolist(), skip_special_tokens=True)
    assert "### Instruction:\nreverse the word\n\n### Input:\nabc\n\n### Response:\ncba" in text
    assert "### Input" not in plain_tok.decode(b["input_ids"].tolist())


def test_messages_need_chat_template(plain_tok):
    with pytest.raises(DataError, match="chat_template"):
        tokenize_sft([{"messages": MESSAGES}], plain_tok)


def test_truncation_counts(tok):
    rows = [
        {"prompt": "copy: abc\n", "completion": "abc"},  # 15 tokens
        {"prompt": "copy: abcdefgh\n", "completion": "abcdefgh"},  # 25 tokens
        {"prompt": "copy: " + "a" * 30 + "\n", "completion": "a"},  # prompt alone > 20
    ]
    exs, stats = tokenize_sft(rows, tok, max_length=20)
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert stats.drop_reasons == {"no_targets_after_truncation": 1}
    assert [len(e["input_ids"]) for e in exs] == [15, 20]
    assert targets(tok, exs[1]) == "abcd"  # the prefix is kept
    exs, stats = tokenize_sft(rows, tok, max_length=20, truncation="drop")
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 2)
    assert stats.drop_reasons == {"too_long": 2}
    # Truncation drops are not "bad rows": on_bad_row="error" does not raise for them.
    _, stats = tokenize_sft(rows, tok, max_length=20, truncation="drop", on_bad_row="error")
    assert stats.dropped == 2


def test_sft_bad_rows(tok):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}, {"prompt": None, "completion": "c"}]
    exs, stats = tokenize_sft(rows, tok)
    assert stats.examples == 1 and stats.drop_reasons == {"empty_response": 1, "missing_field": 1}
    with pytest.raises(DataError, match="row 1"):
        tokenize_sft(rows, tok, on_bad_row="error")
    _, stats = tokenize_sft([{"messages": MESSAGES[:2]}], tok)  # no assistant turn
    assert stats.drop_reasons == {"no_targets": 1}


def test_mask_with_bpe_tokenizer():
    """A merging (byte-level BPE) tokenizer: targets still decode to the completion."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + r["completion"] for r in tasks.make_datasets()["train"][:500]]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"]))
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    rows = [{"prompt": "reverse: abcde\n", "completion": "edcba"}, {"prompt": "Q: ok?", "completion": " yes it is"}]
    exs, _ = tokenize_sft(rows, t)
    assert [targets(t, e) for e in exs] == ["edcba<eos>", " yes it is<eos>"]
    assert any(len(t.decode([i])) > 1 for i in exs[0]["input_ids"])  # merges happened


# ----------------------------------------------------------------------------- preference


def test_preference_explicit(tok):
    rows = [{"prompt": "copy: abc\n", "chosen": "abc", "rejected": "cba", "margin": 0.5}]
    (p,), stats = tokenize_preference(rows, tok)
    assert stats.format == "preference" and stats.examples == 1
    assert tok.decode(p["prompt_ids"].tolist(), skip_special_tokens=False) == "<s>copy: abc\n"
    assert tok.decode(p["chosen_ids"].tolist(), skip_special_tokens=False) == "abc</s>"
    assert tok.decode(p["rejected_ids"].tolist(), skip_special_tokens=False) == "cba</s>"
    assert p["margin"] == 0.5


def test_preference_conversational(tok):
    rows = [{"prompt": MESSAGES[:2], "chosen": [{"role": "assistant", "content": "abc"}],
             "rejected": [{"role": "assistant", "content": "ab"}]}]
    (p,), _ = tokenize_preference(rows, tok)
    assert tok.decode(p["prompt_ids"].tolist(), skip_special_tokens=False).endswith("copy: abc</s><|assistant|>")
    assert tok.decode(p["chosen_ids"].tolist(), skip_special_tokens=False) == "abc</s>"
    assert p["margin"] == 0.0
    # Implicit prompt from whole conversations.
    rows = [{"chosen": MESSAGES[:2] + [{"role": "assistant", "content": "abc"}],
             "rejected": MESSAGES[:2] + [{"role": "assistant", "content": "cba"}]}]
    (q,), stats = tokenize_preference(rows, tok)
    assert stats.format == "implicit_preference"
    assert np.array_equal(q["prompt_ids"], p["prompt_ids"])
    assert tok.decode(q["rejected_ids"].tolist(), skip_special_tokens=False) == "cba</s>"


def test_hh_rlhf_implicit_prompt(tok):
    base = "\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?\n\nAssistant:"
    chosen, rejected = base + " It is six.", base + " It is seven."
    assert split_implicit_prompt(chosen, rejected) == (base, " It is six.", " It is seven.")
    # Without the hh marker: cut at a word boundary.
    assert split_implicit_prompt("The answer is 12", "The answer is 13") == ("The answer is", " 12", " 13")
    (p,), stats = tokenize_preference([{"chosen": chosen, "rejected": rejected}], tok)
    assert stats.format == "implicit_preference"
    assert tok.decode(p["prompt_ids"].tolist(), skip_special_tokens=True) == base
    assert tok.decode(p["chosen_ids"].tolist(), skip_special_tokens=False) == " It is six.</s>"


def test_preference_bad_rows(tok):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": None},
        {"prompt": "p", "chosen": "  ", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        {"prompt": "p", "chosen": "c", "rejected": "d"},
    ]
    pairs, stats = tokenize_preference(rows, tok)
    assert len(pairs) == 2 and stats.examples == 2 and stats.dropped == 3
    assert stats.drop_reasons == {"missing_field": 1, "empty_response": 1, "chosen_equals_rejected": 1}
    with pytest.raises(DataError, match="row 1.*'rejected'"):
        tokenize_preference(rows, tok, on_bad_row="error")
    with pytest.raises(DataError, match="row 0.*identical"):
        tokenize_preference(rows[3:], tok, on_bad_row="error")  # index is relative to the rows given
    _, stats = tokenize_preference([{"chosen": "same text", "rejected": "same text"}], tok)
    assert stats.drop_reasons == {"chosen_equals_rejected": 1}


def test_preference_truncation(tok):
    rows = [{"prompt": "copy: abcdefgh\n", "chosen": "abcdefgh", "rejected": "abcdefg"}]  # prompt 16, responses 9/8
    (p,), stats = tokenize_preference(rows, tok, max_length=20, max_prompt_length=12)
    assert stats.truncated == 1
    assert len(p["prompt_ids"]) == 12 and p["prompt_ids"][0] == tok.bos_token_id  # left cut, BOS kept
    assert tok.decode(p["prompt_ids"].tolist(), skip_special_tokens=True) == "copy: abcdefgh\n"[-11:]
    assert len(p["chosen_ids"]) == 8 and len(p["rejected_ids"]) == 8
    _, stats = tokenize_preference(rows, tok, max_length=20, truncation="drop")
    assert stats.dropped == 1 and stats.drop_reasons == {"too_long": 1}


def test_pairs_identical_after_truncation_are_dropped(tok):
    rows = [{"prompt": "copy: ab\n", "chosen": "abcdefgh", "rejected": "abcdefgx"}]  # prompt 10 tokens
    pairs, stats = tokenize_preference(rows, tok, max_length=14, on_bad_row="error")  # a truncation drop
    assert pairs == [] and stats.drop_reasons == {"chosen_equals_rejected_after_truncation": 1}
    (p,), stats = tokenize_preference(rows, tok, max_length=18)  # the last tokens still differ
    assert stats.truncated == 1 and p["chosen_ids"].tolist() != p["rejected_ids"].tolist()


# ----------------------------------------------------------------------------- batching


def make_examples(n, seed=0, lo=3, hi=40):
    """Examples whose ids identify them: example i is [1000 + i, i, i, ...]."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(lo, hi + 1))
        ids = np.full(L, i, np.int32)
        ids[0] = 1000 + i
        # Odd examples: a target on the first token too, which batching must clear.
        mask = (np.arange(L) >= (L // 2 if i % 2 == 0 else 0)).astype(np.int32)
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


def test_default_buckets():
    assert default_buckets(100) == [16, 32, 64, 100]
    assert default_buckets(64, min_length=32) == [32, 64]


def test_bucket_padding_uses_only_configured_lengths():
    exs = make_examples(50)
    it = BatchIterator(exs, 4, seed=1, buckets=[12, 24, 40], pad_id=7, num_epochs=1, drop_last=False)
    assert it.shapes == [(4, 12), (4, 24), (4, 40)]
    n = 0
    for b in it:
        B, T = b["input_ids"].shape
        assert T in (12, 24, 40)
        lengths = b["attention_mask"].sum(1)
        assert T == min(x for x in (12, 24, 40) if x >= lengths.max())  # the smallest fitting bucket
        assert (b["input_ids"][b["attention_mask"] == 0] == 7).all()  # right padding with pad_id
        for r in range(B):
            L = lengths[r]
            assert (b["attention_mask"][r, :L] == 1).all() and (b["attention_mask"][r, L:] == 0).all()
            if L:
                ex = exs[b["input_ids"][r, 0] - 1000]
                assert np.array_equal(b["input_ids"][r, :L], ex["input_ids"])
                assert np.array_equal(b["loss_mask"][r, :L], np.r_[0, ex["loss_mask"][1:]])
                assert np.array_equal(b["positions"][r, :L], np.arange(L))
                assert (b["segment_ids"][r, :L] == 1).all()
            n += L > 0
        assert (b["loss_mask"][b["attention_mask"] == 0] == 0).all()
    assert n == 50  # drop_last=False: everything once, the last batch filled with empty rows
    assert it.seen_shapes <= set(it.shapes)
    with pytest.raises(DataError, match="largest bucket"):
        BatchIterator(exs, 4, buckets=[8, 16])


def unpack(batch):
    """The examples inside a packed batch, checking segment invariants on the way."""
    found = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        real = seg > 0
        assert np.array_equal(real, batch["attention_mask"][r] == 1)
        n = real.sum()
        assert real[:n].all()  # segments first, then padding
        assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
        for k in range(1, seg.max() + 1):
            idx = np.nonzero(seg == k)[0]
            assert np.array_equal(batch["positions"][r, idx], np.arange(len(idx)))
            assert batch["loss_mask"][r, idx[0]] == 0  # no target across a segment start
            found.append((batch["input_ids"][r, idx], batch["loss_mask"][r, idx]))
    return found


def test_packing():
    exs = make_examples(60)
    it = BatchIterator(exs, 4, seed=3, packing=True, seq_len=64, num_epochs=1, drop_last=False)
    assert it.shapes == [(4, 64)]
    seen = []
    for b in it:
        assert b["input_ids"].shape == (4, 64)
        seen += unpack(b)
    ids = sorted(int(x[0][0]) - 1000 for x in seen)
    assert ids == list(range(60))  # each example exactly once
    for got_ids, got_mask in seen:
        ex = exs[int(got_ids[0]) - 1000]
        assert np.array_equal(got_ids, ex["input_ids"])
        want = ex["loss_mask"].copy()
        want[0] = 0
        assert np.array_equal(got_mask, want)
    assert max(len(x[0]) for x in seen) <= 64
    with pytest.raises(DataError, match="seq_len"):
        BatchIterator(exs, 4, packing=True, seq_len=16)


def test_first_fit_matches_naive():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 300).tolist()
    order = rng.permutation(300).tolist()
    rows, caps = [], []
    for i in order:
        for r, c in enumerate(caps):
            if c >= lengths[i]:
                rows[r].append(i)
                caps[r] -= lengths[i]
                break
        else:
            rows.append([i])
            caps.append(64 - lengths[i])
    assert first_fit_pack(lengths, order, 64) == rows


def batches_equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_resume(packing):
    exs = make_examples(37)
    kw = dict(seed=5, packing=packing, seq_len=64 if packing else None)
    ref = BatchIterator(exs, 4, **kw)
    per_epoch = len(ref)
    expected = [next(ref) for _ in range(3 * per_epoch)]
    # Epochs are shuffled differently.
    assert not batches_equal(expected[0], expected[per_epoch])
    for k in (0, 2, per_epoch - 1, per_epoch, per_epoch + 1):
        it = BatchIterator(exs, 4, **kw)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.state()))  # JSON-able
        fresh = BatchIterator(exs, 4, **kw)
        fresh.restore(state)
        for j in range(k, min(k + per_epoch + 2, len(expected))):
            assert batches_equal(next(fresh), expected[j]), (k, j)
    with pytest.raises(DataError, match="seed"):
        BatchIterator(exs, 4, seed=6).restore(state)


@pytest.mark.parametrize("packing", [False, True])
def test_partial_last_batch_is_counted(packing):
    exs = make_examples(37)
    kw = dict(seed=5, packing=packing, seq_len=64 if packing else None)
    it = BatchIterator(exs, 4, **kw)
    batched = sum(len(unpack(next(it))) for _ in range(len(it)))
    assert batched + it.left_out_per_epoch == 37
    if not packing:
        assert it.left_out_per_epoch == 1
    assert BatchIterator(exs, 4, drop_last=False, **kw).left_out_per_epoch == 0


def test_no_shuffle_keeps_order():
    exs = make_examples(8)
    b = next(BatchIterator(exs, 4, shuffle=False))
    assert (b["input_ids"][:, 0] - 1000).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("packing", [False, True])
def test_process_slices(packing):
    exs = make_examples(41)
    kw = dict(seed=2, packing=packing, seq_len=64 if packing else None, buckets=[16, 32, 64] if not packing else None)
    glob = BatchIterator(exs, 8, **kw)
    glob_batches = [next(glob) for _ in range(2 * len(glob))]
    for P in (2, 4):
        its = [BatchIterator(exs, 8, process_index=i, process_count=P, **kw) for i in range(P)]
        assert len(its[0]) == len(glob)
        for g in glob_batches:
            parts = [next(it) for it in its]
            assert all(p["input_ids"].shape == (8 // P, g["input_ids"].shape[1]) for p in parts)
            for k in g:
                assert np.array_equal(np.concatenate([p[k] for p in parts]), g[k])  # union = global batch
            starts = [{int(x) for x in p["input_ids"][p["positions"] == 0] if x >= 1000} for p in parts]
            assert sum(len(s) for s in starts) == len(set().union(*starts))  # disjoint
    with pytest.raises(DataError, match="divisible"):
        BatchIterator(exs, 6, process_count=4)


def test_pair_batches(tok):
    rows = tasks.make_datasets()["prefs_eval"][:10]
    pairs, _ = tokenize_preference(rows, tok)
    b = next(BatchIterator(pairs, 4, shuffle=False, buckets=[16, 32], pad_id=tok.pad_token_id))
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (4, 32)
    assert b["margin"].shape == (4,) and b["margin"].dtype == np.float32
    for r in range(4):
        p = pairs[r]
        for name in ("chosen", "rejected"):
            m = b[f"{name}_loss_mask"][r] == 1
            assert np.array_equal(b[f"{name}_input_ids"][r][m], p[f"{name}_ids"])
            P = len(p["prompt_ids"])
            assert np.array_equal(b[f"{name}_input_ids"][r, :P], p["prompt_ids"])
    with pytest.raises(DataError, match="packing"):
        BatchIterator(pairs, 4, packing=True, seq_len=64)


def test_end_to_end_sft_batch(tok):
    rows = load_rows(tasks.quickstart_file("eval.jsonl"))
    exs, stats = tokenize_sft(rows, tok, max_length=32)
    assert stats.examples == 200 and stats.dropped == 0
    b = next(BatchIterator(exs, 16, seed=0, buckets=[32], pad_id=tok.pad_token_id))
    assert b["input_ids"].shape == (16, 32) and all(v.dtype == np.int32 for v in b.values())
    for r in range(16):
        ids = b["input_ids"][r]
        prompt = tok.decode(ids[: np.argmax(b["loss_mask"][r])].tolist(), skip_special_tokens=True)
        answer = tok.decode(ids[b["loss_mask"][r] == 1].tolist(), skip_special_tokens=True)
        assert tasks.check_answer(prompt, answer)


# ----------------------------------------------------------------------------- embedded assets


def test_embedded_tokenizer_loads_and_round_trips():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tasks.quickstart_dir())
    assert (t.pad_token, t.bos_token, t.eos_token) == ("<pad>", "<s>", "</s>")
    assert t.pad_token_id == 0 and len(t) < 128
    for row in tasks.make_datasets()["train"][:50]:
        text = row["prompt"] + row["completion"]
        ids = t(text)["input_ids"]
        assert ids[0] == t.bos_token_id and len(ids) == len(text) + 1  # one token per character
        assert t.decode(ids, skip_special_tokens=True) == text
    msgs = [{"role": "user", "content": "copy: abc"}]
    s = t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert s == "<s><|user|>copy: abc</s><|assistant|>"
    ids = t.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert t.decode(ids, skip_special_tokens=False) == s


def test_assets_are_generated_and_small():
    import os

    assert tasks.check_assets() == []  # regenerating gives the same bytes
    d = tasks.quickstart_dir()
    assert sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) < 2_000_000


def test_task_data_and_checker():
    data = {name: load_rows(tasks.quickstart_file(f"{name}.jsonl")) for name in ("train", "eval", "prefs_train", "prefs_eval")}
    assert (len(data["train"]), len(data["eval"]), len(data["prefs_eval"])) == (4000, 200, 200)
    train_prompts = set(data["train"]["prompt"]) | set(data["prefs_train"]["prompt"])
    assert not train_prompts & set(data["eval"]["prompt"])  # held out
    assert set(data["prefs_eval"]["prompt"]) == set(data["eval"]["prompt"])
    for row in data["eval"]:
        assert tasks.check_answer(row["prompt"], row["completion"])
    for row in data["prefs_train"]:
        assert tasks.check_answer(row["prompt"], row["chosen"])
        assert not tasks.check_answer(row["prompt"], row["rejected"])
    ops = [tasks.parse_prompt(p)[0] for p in data["train"]["prompt"]]
    assert 0.4 < ops.count("copy") / len(ops) < 0.6
    assert tasks.check_answer("reverse: abc\n", " cba</s>")
    assert not tasks.check_answer("reverse: abc\n", "abc")
    assert not tasks.check_answer("copy: abc\n", "abcd")
    with pytest.raises(ValueError, match="not a task prompt"):
        tasks.check_answer("hello", "x")
    s = tasks.score(["copy: ab\n", "reverse: ab\n"], ["ab", "ab"])
    assert s == {"exact_match": 0.5, "exact_match/copy": 1.0, "exact_match/reverse": 0.0}
    rng = random.Random(0)
    assert all(tasks.wrong_answer("reverse", "aba", rng) != "aba" for _ in range(50))  # palindrome


# ----------------------------------------------------------------------------- datasets as shipped


@pytest.fixture(scope="module")
def chatml():
    from tests.hf_models import chatml_tokenizer

    return chatml_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SKY = "What color is the sky?"


def decoded(tok, pair, key):
    return tok.decode(pair[key].tolist(), skip_special_tokens=False)


def test_every_trl_preference_layout_gives_the_same_pair(chatml):
    """Explicit/implicit prompt, strings-in-conversations, and UltraFeedback-binarized
    (a prompt string + whole conversations that repeat the user turn) tokenize alike."""
    conv = {"prompt": [user(SKY)], "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]}
    layouts = [
        conv,
        {"prompt": SKY, "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
        {"chosen": [user(SKY), assistant("It is blue.")], "rejected": [user(SKY), assistant("It is green.")]},
        {"prompt": SKY, "chosen": [user(SKY), assistant("It is blue.")],  # UltraFeedback-binarized
         "rejected": [user(SKY), assistant("It is green.")]},
    ]
    (ref,), _ = tokenize_preference([conv], chatml, on_bad_row="error")
    assert decoded(chatml, ref, "prompt_ids").endswith(f"user\n{SKY}<|im_end|>\n<|im_start|>assistant\n")
    assert decoded(chatml, ref, "chosen_ids") == "It is blue.<|im_end|>\n"
    for row in layouts[1:]:
        (p,), _ = tokenize_preference([row], chatml, on_bad_row="error")
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert p[key].tolist() == ref[key].tolist(), (row, key)


def test_prompt_disagreeing_with_the_conversation_head_is_a_row_problem(chatml):
    ok = {"prompt": SKY, "chosen": [user(SKY), assistant("It is blue.")], "rejected": [user(SKY), assistant("Green.")]}
    bad = {"prompt": "What color is grass?", "chosen": ok["chosen"], "rejected": ok["rejected"]}
    pairs, stats = tokenize_preference([ok, bad], chatml)
    assert len(pairs) == 1 and stats.drop_reasons == {"prompt_mismatch": 1}
    with pytest.raises(DataError) as e:
        tokenize_preference([ok, bad], chatml, on_bad_row="error")
    msg = str(e.value)
    assert "row 1" in msg and "'chosen'" in msg and "'prompt'" in msg and "template" not in msg
    # Implicit conversations whose user turns differ: their prompts differ, not the template's fault.
    grass = "What color is grass?"
    rows = [{"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(grass), assistant("Green.")]},
            {"chosen": [user(SKY), assistant("Blue."), user("Sure?"), assistant("Yes.")],
             "rejected": [user(SKY), assistant("Blue."), user("Really?"), assistant("No.")]}]
    _, stats = tokenize_preference(rows, chatml)
    assert stats.drop_reasons == {"no_shared_prompt": 1, "prompt_mismatch": 1}
    # A response that goes on with a user turn after the prompt names its column.
    row = {"prompt": [user(SKY)], "chosen": [user("Hm?"), assistant("Blue.")], "rejected": [assistant("Green.")]}
    with pytest.raises(DataError, match="row 0.*'chosen'.*'user'") as e:
        tokenize_preference([row], chatml, on_bad_row="error")
    assert "template" not in str(e.value)


def test_template_is_blamed_only_when_it_rewrites_earlier_turns(chatml):
    import copy

    tok = copy.deepcopy(chatml)  # a template that renders the prompt differently once a reply follows
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] + ('!' if loop.last else '') }}"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    row = {"prompt": [user(SKY)], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]}
    with pytest.raises(DataError, match="chat template is not prefix-stable"):
        tokenize_preference([row], tok)


def test_column_mapping(chatml, tok):
    import datasets

    rows = [{"question": "copy: ab\n", "response_j": "ab", "response_k": "ba", "prompt": "ignored"}]
    canonical = [{"prompt": "copy: ab\n", "chosen": "ab", "rejected": "ba"}]
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    (ref,), _ = tokenize_preference(canonical, tok)
    for source in (rows, datasets.Dataset.from_list(rows)):
        (p,), stats = tokenize_preference(source, tok, columns=columns)
        assert stats.format == "preference"
        assert all(p[k].tolist() == ref[k].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    with pytest.raises(DataError, match="'promt' is not one of our column names; did you mean 'prompt'"):
        tokenize_preference(rows, tok, columns={"promt": "question"})
    with pytest.raises(DataError, match="data.columns.chosen='respone_j'.*no column 'respone_j'.*did you mean "
                                        "'response_j'"):
        tokenize_preference(rows, tok, columns={**columns, "chosen": "respone_j"})
    # Row errors name the dataset's columns through the mapping.
    with pytest.raises(DataError, match="row 0.*data.columns: prompt='question', chosen='response_j'"):
        tokenize_preference([{**rows[0], "response_j": None}], tok, columns=columns, on_bad_row="error")
    # SFT data too.
    (ex,), _ = tokenize_sft([{"q": "copy: ab\n", "a": "ab"}], tok, columns={"prompt": "q", "completion": "a"})
    assert targets(tok, ex) == "ab</s>"


def test_column_mapping_in_the_config_names_unknown_keys():
    from jaxalign.config import load_config
    from jaxalign.errors import ConfigError

    cfg = load_config(None, ["model.config=x", "data.columns={prompt: question, system: sys}"])
    assert cfg.data.columns == {"prompt": "question", "system": "sys"}
    with pytest.raises(ConfigError, match="unknown key 'data.columns.rejectd'; did you mean 'data.columns.rejected'"):
        load_config(None, ["model.config=x", "data.columns={rejectd: response_k}"])


def test_system_prompt(chatml, tok):
    default = "You are a helpful AI assistant named SmolLM"
    row = {"prompt": SKY, "chosen": "It is blue.", "rejected": "It is green."}
    (p,), _ = tokenize_preference([row], chatml)  # plain strings stay plain text
    assert decoded(chatml, p, "prompt_ids") == SKY
    (p,), _ = tokenize_preference([row], chatml, system_prompt="Be brief.")  # becomes a conversation
    assert decoded(chatml, p, "prompt_ids").startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert decoded(chatml, p, "chosen_ids") == "It is blue.<|im_end|>\n"
    (p,), _ = tokenize_preference([{**row, "system": "Be terse."}], chatml, system_prompt="Be brief.")  # the row wins
    assert "Be terse." in decoded(chatml, p, "prompt_ids") and "Be brief." not in decoded(chatml, p, "prompt_ids")
    own = {"prompt": [{"role": "system", "content": "Own."}, user(SKY)], "chosen": [assistant("Blue.")],
           "rejected": [assistant("Green.")]}
    (p,), _ = tokenize_preference([own], chatml, system_prompt="Be brief.")  # a conversation keeps its own
    assert "Own." in decoded(chatml, p, "prompt_ids") and "Be brief." not in decoded(chatml, p, "prompt_ids")
    (p,), _ = tokenize_preference([own], chatml)
    assert default not in decoded(chatml, p, "prompt_ids")
    # SFT: messages and prompt/completion get it; plain text has no user turn to put it before.
    (ex,), _ = tokenize_sft([{"messages": [user(SKY), assistant("Blue.")]}], chatml, system_prompt="Be brief.")
    assert chatml.decode(ex["input_ids"].tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert targets(chatml, ex) == "Blue.<|im_end|>\n"
    (ex,), _ = tokenize_sft([{"prompt": SKY, "completion": "Blue."}], chatml, system_prompt="Be brief.")
    assert "Be brief." in chatml.decode(ex["input_ids"].tolist()) and targets(chatml, ex) == "Blue.<|im_end|>\n"
    _, stats = tokenize_sft([{"text": "just text"}], tok, system_prompt="Be brief.")
    assert stats.drop_reasons == {"system_prompt_on_text": 1}


def test_score_gap_filter_and_stats(tok):
    rows = [{"prompt": "copy: ab\n", "chosen": "ab", "rejected": "ba", "score_chosen": 9.0, "score_rejected": 2.0},
            {"prompt": "copy: cd\n", "chosen": "cd", "rejected": "dc", "score_chosen": 5.0, "score_rejected": 4.5},
            {"prompt": "copy: ef\n", "chosen": "ef", "rejected": "fe", "score_chosen": 7.0, "score_rejected": 4.0}]
    pairs, stats = tokenize_preference(rows, tok, min_score_gap=1.0, on_bad_row="error")  # a filter, not an error
    assert [p["score_gap"] for p in pairs] == [7.0, 3.0]
    assert stats.drop_reasons == {"score_gap_below_min": 1} and stats.mean_score_gap == 5.0
    pairs, stats = tokenize_preference(rows, tok)
    assert len(pairs) == 3 and stats.mean_score_gap == pytest.approx(3.5)
    renamed = [{"p": r["prompt"], "c": r["chosen"], "r": r["rejected"], "sc": r["score_chosen"],
                "sr": r["score_rejected"]} for r in rows]
    columns = {"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": "sc", "score_rejected": "sr"}
    pairs, _ = tokenize_preference(renamed, tok, columns=columns, min_score_gap=1.0)
    assert [p["score_gap"] for p in pairs] == [7.0, 3.0]
    with pytest.raises(DataError, match="min_score_gap.*'score_chosen' and 'score_rejected' columns"):
        tokenize_preference([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows], tok, min_score_gap=1.0)
    _, stats = tokenize_preference([{**rows[0], "score_chosen": "high"}], tok)
    assert stats.drop_reasons == {"bad_type": 1}


@pytest.mark.parametrize("columns,fmt", [
    (["prompt", "completion", "label"], "unpaired_preference"),
    (["prompt"], "prompt_only"),
])
def test_detect_unpaired_and_prompt_only(columns, fmt):
    assert detect_format(columns) == fmt
    assert detect_format(["prompt", "completion", "label"], kind="sft") == "prompt_completion"
    assert detect_format(["prompt", "chosen", "rejected"], kind="prompt") == "prompt_only"


def test_unpaired_feedback(chatml, tok):
    from jaxalign.data import tokenize_unpaired

    rows = [{"prompt": "copy: ab\n", "completion": "ab", "label": True},
            {"prompt": "copy: cd\n", "completion": "dc", "label": False},
            {"prompt": "copy: ef\n", "completion": "ef", "label": "yes"}]
    examples, stats = tokenize_unpaired(rows, tok)
    assert stats.format == "unpaired_preference" and stats.drop_reasons == {"bad_type": 1}
    assert [e["label"] for e in examples] == [True, False]
    assert tok.decode(examples[1]["completion_ids"].tolist(), skip_special_tokens=False) == "dc</s>"
    with pytest.raises(DataError, match="row 2.*'label' must be true or false"):
        tokenize_unpaired(rows, tok, on_bad_row="error")
    # Conversations and a system prompt, as for pairs.
    (ex,), _ = tokenize_unpaired([{"prompt": [user(SKY)], "completion": [assistant("Blue.")], "label": True}], chatml,
                                 system_prompt="Be brief.")
    assert decoded(chatml, ex, "prompt_ids").startswith("<|im_start|>system\nBe brief.")
    assert decoded(chatml, ex, "completion_ids") == "Blue.<|im_end|>\n"
    # Paired rows split into a desirable and an undesirable example.
    examples, stats = tokenize_unpaired([{"prompt": "copy: ab\n", "chosen": "ab", "rejected": "ba"}], tok)
    assert stats.examples == 2 and [e["label"] for e in examples] == [True, False]
    assert [tok.decode(e["completion_ids"].tolist(), skip_special_tokens=True) for e in examples] == ["ab", "ba"]


def test_prompts_for_online_methods(chatml, plain_tok):
    from jaxalign.data import tokenize_prompts

    def texts(rows, **kw):
        examples, stats = tokenize_prompts(rows, chatml, max_prompt_length=256, **kw)
        return [e["text"] for e in examples], stats

    (plain,), _ = texts([{"prompt": SKY}])
    assert plain == SKY  # a string stays text (encoded with special tokens)
    (brief,), _ = texts([{"prompt": SKY}], system_prompt="Be brief.")  # a system prompt makes it a user turn
    assert brief.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + SKY)
    assert brief.endswith("<|im_start|>assistant\n")
    (terse,), _ = texts([{"prompt": SKY, "system": "Be terse."}], system_prompt="Be brief.")  # the row wins
    assert "Be terse." in terse and "Be brief." not in terse
    # Preference rows: the prompt column, else the shared head of chosen/rejected (UltraFeedback and implicit).
    uf = {"prompt": SKY, "chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]}
    implicit = {"chosen": [user(SKY), assistant("Blue.")], "rejected": [user(SKY), assistant("Green.")]}
    (a, b), _ = texts([uf, implicit], system_prompt="Be brief.")
    assert a == b == brief
    # data.columns, and bad rows counted or named.
    (mapped,), _ = texts([{"question": SKY}], columns={"prompt": "question"}, system_prompt="Be brief.")
    assert mapped == brief
    ok, stats = texts([{"prompt": SKY}, {"prompt": " "}, {"text": "x"}, {"prompt": [assistant("Hi.")]}])
    assert ok == [SKY] and stats.drop_reasons == {"missing_prompt": 2, "prompt_ends_with_assistant": 1}
    with pytest.raises(DataError, match="row 1: field 'prompt' is missing or empty.*data.columns: prompt='q'"):
        tokenize_prompts([{"q": SKY}, {"q": ""}], chatml, max_prompt_length=256, columns={"prompt": "q"},
                         on_bad_row="error")
    with pytest.raises(DataError, match="system prompt needs|chat_template"):
        tokenize_prompts([{"prompt": SKY}], plain_tok, max_prompt_length=256, system_prompt="Be brief.",
                         on_bad_row="error")


def test_pair_batches_carry_each_sides_scored_positions():
    """`{side}_score_at` `[B, K]`: the positions t whose next token the loss mask marks
    (`shifted_targets_mask`'s rule), in order, then -1. K follows the global batch (one width for
    both sides and every process), rounded up to a multiple of max(16, T // 8), at most T."""
    from jaxalign.algos.logprobs import shifted_targets_mask
    from jaxalign.data.batching import pad_pairs, score_width

    rng = np.random.default_rng(0)
    ids = lambda lo, hi: rng.integers(3, 99, int(rng.integers(lo, hi + 1)))  # noqa: E731
    pairs = [{"prompt_ids": ids(0, 40), "chosen_ids": ids(1, 60), "rejected_ids": ids(1, 20)} for _ in range(24)]
    kw = dict(shuffle=False, buckets=[32, 64, 128], num_epochs=1)
    its = [BatchIterator(pairs, 8, **kw)] + [BatchIterator(pairs, 8, process_index=i, process_count=2, **kw)
                                             for i in range(2)]
    for g, *parts in zip(*its):
        t = g["chosen_input_ids"].shape[1]
        k = g["chosen_score_at"].shape[1]
        assert k == score_width(int(np.max((g["chosen_loss_mask"] | g["rejected_loss_mask"]).sum(1))), t)
        assert k % max(16, t // 8) == 0 or k == t
        for side in ("chosen", "rejected"):
            assert np.array_equal(np.concatenate([p[f"{side}_score_at"] for p in parts]), g[f"{side}_score_at"])
            mask = np.asarray(shifted_targets_mask(g[f"{side}_loss_mask"], g[f"{side}_segment_ids"]))
            for row, at in zip(mask, g[f"{side}_score_at"]):
                n = int(row.sum())
                assert at[:n].tolist() == np.flatnonzero(row).tolist() and np.all(at[n:] == -1)
    no_prompt = {"prompt_ids": np.array([], np.int64), "chosen_ids": np.array([5, 6, 7]), "rejected_ids": np.array([8])}
    b = pad_pairs([no_prompt, None], 16, 0)
    assert b["chosen_score_at"].tolist() == [[0, 1] + [-1] * 14, [-1] * 16]  # token 0 has nothing to predict it
    assert b["rejected_score_at"].tolist() == [[-1] * 16, [-1] * 16]


@pytest.mark.parametrize("fn, kwargs, message", [
    ("tokenize_prompts", {"max_prompt_length": 8, "truncation": "drop"}, "prompt truncation must be 'left' or 'skip'"),
    ("tokenize_prompts", {"max_prompt_length": 8, "on_bad_row": "skip"}, "on_bad_row must be 'drop' or 'error'"),
    ("tokenize_sft", {"truncation": "left"}, "truncation must be 'truncate' or 'drop'"),
    ("tokenize_sft", {"max_length": 1}, "max_length must be at least 2"),
])
def test_bad_tokenize_options_are_named(fn, kwargs, message):
    """Each tokenizer's options are checked before any row is read, naming the valid values."""
    import jaxalign.data as data

    with pytest.raises(DataError, match=message):
        getattr(data, fn)([{"prompt": "1+1="}], None, **kwargs)
