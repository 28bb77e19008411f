"""`jaxalign bench dpo`: one DPO training step (policy forward + backward on chosen and
rejected, reference forward, AdamW) of jaxalign next to TRL's DPOTrainer on the same pairs.

Both sides train every weight against a frozen copy of the start model as reference (TRL's
default without PEFT), sigmoid loss, fp32, the same pair batch: `batch` pairs of a
`prompt_len`-token prompt and two `response_len`-token replies.
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np

from jaxalign.bench.common import (chip_peak_tflops, in_fresh_process, make_bench_checkpoint, peak_memory_bytes,
                                   step_timer, timed_with_faults, train_flops_per_token)
from jaxalign.data.batching import score_positions


def _pairs(vocab_size: int, batch: int, prompt_len: int, response_len: int) -> dict[str, np.ndarray]:
    """Random prompt / chosen / rejected ids, away from the low ids where special tokens live."""
    rs = np.random.RandomState(0)
    low = min(100, vocab_size // 4)
    ids = lambda n: rs.randint(low, vocab_size, (batch, n)).astype(np.int32)  # noqa: E731
    return {"prompt": ids(prompt_len), "chosen": ids(response_len), "rejected": ids(response_len)}


def _side_batch(prompt: np.ndarray, response: np.ndarray, side: str) -> dict[str, np.ndarray]:
    ids = np.concatenate([prompt, response], axis=1)
    b, t = ids.shape
    loss = np.zeros_like(ids)
    loss[:, prompt.shape[1]:] = 1
    ones = np.ones_like(ids)
    return {f"{side}_input_ids": ids, f"{side}_attention_mask": ones, f"{side}_loss_mask": loss,
            f"{side}_positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), f"{side}_segment_ids": ones,
            f"{side}_score_at": score_positions(loss, ones, response.shape[1])}


def dpo_flops_per_pair(config, prompt_len: int, response_len: int) -> float:
    """Model FLOPs of one pair: policy forward + backward (3 passes) and reference forward (1)
    over both sequences, at 2 FLOPs per matmul parameter and token plus attention; the LM head
    counts only at the `response_len` scored positions of each sequence (the only ones it runs on)."""
    t = prompt_len + response_len
    head = 6 * config.vocab_size * config.hidden_size
    body = train_flops_per_token(config, t) - head
    return 2 * (t * body + response_len * head) * 4 / 3


def bench_dpo(batch: int, prompt_len: int, response_len: int, iters: int, with_trl: bool,
              checkpoint: str | None = None, peak_tflops: float | None = None) -> dict:
    """DPO train-step pairs/s and tokens/s of jaxalign's jitted step vs TRL's DPOTrainer."""
    import jax.numpy as jnp

    import jaxalign as ja
    from jaxalign.algos.dpo import dpo_sums
    from jaxalign.config import DPOSection, OptimSection
    from jaxalign.train.optim import make_optimizer
    from jaxalign.train.step import init_state, make_train_step

    peak_tflops = peak_tflops or chip_peak_tflops(jax.devices()[0].device_kind)
    tmp = None
    if checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = make_bench_checkpoint(tmp.name)
    model = ja.load_model(checkpoint, dtype="float32")
    config = model.config
    optimizer, schedule = make_optimizer(OptimSection(learning_rate=1e-6), 1000)
    d = DPOSection()
    loss_fn = lambda p, b, r: dpo_sums(p, config, b, reference="frozen_copy", d=d)  # noqa: E731
    combine = lambda policy, reference: {"policy": policy, "reference": reference}  # noqa: E731
    step = jax.jit(make_train_step(loss_fn, optimizer, schedule, combine), donate_argnums=0)
    reference = jax.tree.map(jnp.copy, model.params)
    holder = {"state": init_state(model.params, optimizer, 0)}
    pairs = _pairs(config.vocab_size, batch, prompt_len, response_len)
    data = {**_side_batch(pairs["prompt"], pairs["chosen"], "chosen"),
            **_side_batch(pairs["prompt"], pairs["rejected"], "rejected")}
    data = jax.tree.map(jnp.asarray, data)

    def run_step():
        holder["state"], metrics = step(holder["state"], reference, data)
        jax.block_until_ready(metrics["loss"])

    compile_s, step_s, _ = timed_with_faults(run_step, warmup=2, iters=iters)
    tokens = 2 * batch * (prompt_len + response_len)
    result = {
        "benchmark": "dpo", "device": jax.devices()[0].device_kind, "params": config.num_params(),
        "batch_pairs": batch, "prompt_len": prompt_len, "response_len": response_len,
        "tokens_per_pair": 2 * (prompt_len + response_len), "compile_s": round(compile_s, 2), "step_s": round(step_s, 4), "pairs_per_s": round(batch / step_s, 2),
        "tokens_per_s": round(tokens / step_s, 1), "peak_memory_gb": round(peak_memory_bytes() / 2**30, 3),
    }
    flops = dpo_flops_per_pair(config, prompt_len, response_len) * batch
    result["model_tflops_per_s"] = round(flops / step_s / 1e12, 4)
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = round(flops / step_s / (peak_tflops * 1e12), 4)
    del holder, reference
    if with_trl:
        result.update(in_fresh_process(_trl_dpo_step_s, checkpoint, pairs, iters))
        result["speedup_vs_trl"] = round(result["trl_step_s"] / result["step_s"], 2)
    if tmp is not None:
        tmp.cleanup()
    return result


def _trl_dpo_step_s(checkpoint: str, pairs: dict[str, np.ndarray], iters: int) -> dict:
    """TRL's DPOTrainer (PyTorch, fp32, reference = a frozen copy, no gradient checkpointing,
    as jaxalign's step) on the same pairs, timed per optimizer step after 2 warm-up steps.
    Token ids reach TRL unchanged through a word-level tokenizer whose words are the ids; TRL
    appends EOS to each reply, so its replies are given one id shorter."""
    import datasets
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, model.config.vocab_size)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>")
    words = lambda row: " ".join(f"w{int(i)}" for i in row)  # noqa: E731
    batch = pairs["prompt"].shape[0]
    rows = [{"prompt": words(p), "chosen": " " + words(c[:-1]), "rejected": " " + words(r[:-1])}
            for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])] * (2 + iters)
    timer, times = step_timer()

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=2 + iters, learning_rate=1e-6,
                         logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                         bf16=False, fp16=False, disable_tqdm=True, gradient_checkpointing=False, max_length=None)
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[timer])
        trainer.train()
    step_s = float(np.mean(times[2:]))
    row = trainer.train_dataset[0]
    return {"trl_step_s": round(step_s, 4), "trl_pairs_per_s": round(batch / step_s, 2),
            "trl_tokens_per_pair": 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"]),
            "torch_threads": torch.get_num_threads()}
