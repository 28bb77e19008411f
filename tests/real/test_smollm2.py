"""SmolLM2-135M-Instruct end to end: parity with transformers, the chat template, and short
LoRA / QLoRA / DPO / GRPO runs through the same loop users run (sized for 2 CPU cores)."""

import copy
import os

import numpy as np
import pytest
import torch
import transformers

import jaxalign as ja
from jaxalign.algos.constitutional import write_rows
from jaxalign.config import load_config
from jaxalign.data import arithmetic
from jaxalign.data.formats import render_chat, tokenize_sft
from jaxalign.train.loop import train
from jaxalign.train.metrics import read_metrics
from tests.real.conftest import addition_rows

CHATS = [[{"role": "user", "content": arithmetic.make_prompt(23, 48)}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]
FAST = ["train.async_checkpoints=false", "train.log_every=1", "model.seed=0"]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' own GGUF loading of the same file (its dequantizer, its name map)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference64(reference):
    """The reference in float64: its logits are then exact to well under our fp32 error on any CPU
    (torch's fp32 kernels differ between CPUs by ~1e-3 over 30 layers; XLA's did not)."""
    return copy.deepcopy(reference).double()


@pytest.fixture(scope="module")
def model(smollm2_dir):
    return ja.load_model(smollm2_dir)


def chat_batch(tokenizer, chats):
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="np")
    return enc.input_ids, enc.attention_mask


def test_config_of_the_real_model(model):
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings


def test_logits_match_transformers_with_left_padding(model, reference64, hf_tokenizer):
    ids, mask = chat_batch(hf_tokenizer, CHATS)
    assert (mask == 0).any()  # one row is left-padded
    ours = np.asarray(model.logits(ids, mask))
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        theirs = reference64(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(pos)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4 * np.abs(theirs[real]).max()


def test_greedy_chat_generation_equals_transformers(model, reference, hf_tokenizer):
    ids, mask = chat_batch(hf_tokenizer, CHATS)
    n = 24
    out = ja.generate(model, ids, mask, 0, max_new_tokens=n, greedy=True,
                      eos_token_ids=hf_tokenizer.eos_token_id, pad_token_id=hf_tokenizer.pad_token_id)
    ours = np.asarray(out.tokens)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                                    do_sample=False, eos_token_id=hf_tokenizer.eos_token_id,
                                    pad_token_id=hf_tokenizer.pad_token_id).numpy()[:, ids.shape[1]:]
    for row_ours, row_theirs in zip(ours, theirs):
        k = len(row_theirs)
        assert row_ours[:k].tolist() == row_theirs.tolist()
    answer = hf_tokenizer.decode(ours[0], skip_special_tokens=True)
    assert answer.strip() != "71"  # the untrained model does not just answer: room for alignment


def test_chat_template_and_tokenizer_match_transformers_gguf_tokenizer(smollm2_gguf, hf_tokenizer):
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                     gguf_file=os.path.basename(smollm2_gguf))
    for chat in CHATS + [CHATS[0] + [{"role": "assistant", "content": "71"}]]:
        ours = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=chat[-1]["role"] == "user")
        assert ours == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=chat[-1]["role"] == "user")
        assert render_chat(hf_tokenizer, chat, add_generation_prompt=chat[-1]["role"] == "user") == ours
        assert hf_tokenizer(ours, add_special_tokens=False).input_ids == ref(ours, add_special_tokens=False).input_ids
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.pad_token_id is not None


def test_completion_only_sft_masks_exactly_the_assistant_turns(hf_tokenizer):
    row = {"messages": [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"},
                        {"role": "user", "content": "And 2 plus 2?"}, {"role": "assistant", "content": "4 it is"}]}
    (ex,), _ = tokenize_sft([row], hf_tokenizer, max_length=256)
    ids, m = ex["input_ids"], ex["loss_mask"].astype(bool)
    targets = [hf_tokenizer.decode(ids[s:e]) for s, e in _runs(m)]
    # The turn ends where the template ends it: "<|im_end|>\n" (generation stops at <|im_end|>).
    assert targets == ["3<|im_end|>\n", "4 it is<|im_end|>\n"]
    assert hf_tokenizer.decode(ids) == render_chat(hf_tokenizer, row["messages"])


def _runs(mask):
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.fixture(scope="module")
def lora_sft_run(smollm2_dir, tmp_path_factory):
    """A short LoRA SFT run on addition chats (completion-only loss), with eval at step 0 and the end."""
    tmp = tmp_path_factory.mktemp("sft")
    overrides = [f"model.path={smollm2_dir}", f"output_dir={tmp / 'run'}",
                 f"data.train={write_rows(str(tmp / 'train.jsonl'), addition_rows('sft', 64))}",
                 f"data.eval={write_rows(str(tmp / 'eval.jsonl'), addition_rows('eval', 16))}",
                 "data.max_length=64", "data.buckets=[64]", "lora.rank=8", "lora.alpha=16",
                 "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                 "optim.learning_rate=2e-3", "optim.schedule=constant", "train.steps=12", "train.batch_size=8",
                 "train.eval_every=12", "train.save_every=12", *FAST]
    train(load_config(None, ["algorithm=sft", *overrides]))
    return tmp / "run"


def test_lora_sft_lowers_held_out_loss(lora_sft_run):
    evals = [r for r in read_metrics(str(lora_sft_run)) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[-1]["eval/loss"] < 0.7 * evals[0]["eval/loss"], evals


def test_export_reloads_in_transformers_with_equal_logits(lora_sft_run, hf_tokenizer):
    final = str(lora_sft_run / "final")
    ids, mask = chat_batch(hf_tokenizer, CHATS)
    ours = np.asarray(ja.load_model(final).logits(ids, mask))
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() <= 1e-4 * np.abs(theirs[real]).max()


def test_lora_adapter_loads_in_peft_on_the_converted_model(lora_sft_run, smollm2_dir, hf_tokenizer):
    import peft

    ids, mask = chat_batch(hf_tokenizer, CHATS[:1])
    merged = np.asarray(ja.load_model(str(lora_sft_run / "final")).logits(ids, mask))
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=torch.tensor(ids)).logits.numpy()
        peft_model = peft.PeftModel.from_pretrained(base, str(lora_sft_run / "adapter")).eval()
        theirs = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - before).max() > 1e-2  # the adapter changes the model
    assert np.abs(merged - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_qlora_nf4_loads_and_trains(smollm2_dir, tmp_path):
    overrides = [f"model.path={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
                 f"data.train={write_rows(str(tmp_path / 'train.jsonl'), addition_rows('qlora', 32))}",
                 "data.max_length=64", "data.buckets=[64]", "quantization.method=nf4", "lora.rank=8",
                 "optim.learning_rate=2e-3", "optim.schedule=constant", "train.steps=6", "train.batch_size=8",
                 "train.export=false", *FAST]
    train(load_config(None, ["algorithm=sft", *overrides]))
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_dpo_steps_move_the_implicit_reward(smollm2_dir, tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["completion"],
             "rejected": [{"role": "assistant", "content": f"{r['a']} + {r['b']} = {r['answer'] + 10}"}]}
            for r in addition_rows("dpo", 16)]
    overrides = [f"model.path={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
                 f"data.train={write_rows(str(tmp_path / 'prefs.jsonl'), rows)}", "data.max_length=64",
                 "data.buckets=[64]", "lora.rank=8", "optim.learning_rate=1e-3", "optim.schedule=constant",
                 "train.steps=4", "train.batch_size=8", "train.export=false", *FAST]
    train(load_config(None, ["algorithm=dpo", *overrides]))
    logs = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(logs) == 4 and all(np.isfinite(r["loss"]) for r in logs)
    assert logs[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # policy == reference at the start
    assert logs[-1]["rewards/margins"] > 0


def test_orpo_steps_on_ultrafeedback_layout_rows(smollm2_dir, tmp_path):
    """ORPO (no reference) on rows laid out like UltraFeedback-binarized: a prompt string plus
    whole chosen / rejected conversations that repeat the user turn (SmolLM2's ChatML template)."""
    rows = []
    for r in addition_rows("orpo", 8):
        question = r["prompt"][0]["content"]
        wrong = {"role": "assistant", "content": str(r["answer"] + 10)}
        rows.append({"prompt": question, "chosen": r["prompt"] + r["completion"], "rejected": r["prompt"] + [wrong]})
    overrides = [f"model.path={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
                 f"data.train={write_rows(str(tmp_path / 'prefs.jsonl'), rows)}", "data.max_length=64",
                 "data.buckets=[64]", "data.on_bad_row=error", "dpo.loss_type=orpo", "lora.rank=8",
                 "optim.learning_rate=1e-3", "optim.schedule=constant", "train.steps=2", "train.batch_size=8",
                 "train.export=false", *FAST]
    train(load_config(None, ["algorithm=dpo", *overrides]))
    logs = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) for r in logs)
    assert logs[0]["loss"] == pytest.approx(logs[0]["nll_loss"] - 0.1 * logs[0]["log_odds_ratio"], rel=1e-5)
    assert logs[-1]["log_odds_chosen"] > logs[0]["log_odds_chosen"]


def test_grpo_steps_run_with_a_checker_reward(smollm2_dir, tmp_path):
    rows = [{"prompt": r["prompt"]} for r in addition_rows("grpo", 8)]
    overrides = [f"model.path={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
                 f"data.train={write_rows(str(tmp_path / 'prompts.jsonl'), rows)}", "data.eval=null",
                 "ppo.reward_fn=jaxalign.data.arithmetic:just_the_number", "ppo.group_size=4", "ppo.num_minibatches=1",
                 "ppo.ppo_epochs=1", "ppo.max_prompt_length=64", "ppo.response_length=8", "ppo.temperature=1.0",
                 "lora.rank=8", "optim.learning_rate=1e-4", "train.steps=2", "train.batch_size=8",
                 "train.export=false", *FAST]
    train(load_config(None, ["algorithm=grpo", *overrides]))
    logs = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) for r in logs)
    assert any(k.startswith("rollout/") or k.startswith("objective/") or "reward" in k for k in logs[0])


def test_kto_steps_on_mapped_unpaired_rows_with_a_system_prompt(smollm2_dir, tmp_path):
    """KTO on unpaired feedback named differently (data.columns) with a system prompt: the right
    sum is desirable, a wrong one undesirable. Step 1 sees policy == reference (margin 0, loss
    0.5); after one update the desirable examples' implicit reward is above the undesirable's."""
    rows = []
    for i, r in enumerate(addition_rows("kto", 8)):
        answer = r["answer"] if i % 2 else r["answer"] + 10
        rows.append({"question": r["prompt"][0]["content"], "reply": str(answer), "good": bool(i % 2)})
    overrides = [f"model.path={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
                 f"data.train={write_rows(str(tmp_path / 'feedback.jsonl'), rows)}", "data.max_length=64",
                 "data.buckets=[64]", "data.on_bad_row=error", "data.system_prompt=Answer with the number only.",
                 "data.columns={prompt: question, completion: reply, label: good}", "lora.rank=8",
                 "optim.learning_rate=1e-3", "optim.schedule=constant", "train.steps=2", "train.batch_size=8",
                 "train.export=false", *FAST]
    train(load_config(None, ["algorithm=kto", *overrides]))
    logs = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) for r in logs)
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-4) and logs[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)
    assert logs[-1]["rewards/margins"] > 0


def test_online_dpo_steps_sample_judge_and_train(smollm2_dir, tmp_path):
    """Online DPO with the task checker as judge, prompts read from preference rows (the shared
    head of chosen/rejected): pairs are sampled, judged (ties dropped) and trained on."""
    rows = []
    for r in addition_rows("online_dpo", 8):
        wrong = {"role": "assistant", "content": str(r["answer"] + 10)}
        rows.append({"chosen": r["prompt"] + r["completion"], "rejected": r["prompt"] + [wrong]})
    overrides = [f"model.path={smollm2_dir}", f"output_dir={tmp_path / 'run'}",
                 f"data.train={write_rows(str(tmp_path / 'prefs.jsonl'), rows)}", "data.eval=null",
                 "ppo.reward_fn=jaxalign.data.arithmetic:reward", "ppo.max_prompt_length=64",
                 "ppo.response_length=6", "ppo.temperature=1.0", "lora.rank=8", "optim.learning_rate=1e-4",
                 "train.steps=2", "train.batch_size=8", "train.export=false", *FAST]
    train(load_config(None, ["algorithm=online_dpo", *overrides]))
    logs = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) for r in logs)
    assert all(0.0 <= r["judge/tie_fraction"] <= 1.0 for r in logs)

