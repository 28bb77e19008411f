"""Training-side benchmarks: `jaxalign bench forward` (forward pass vs transformers) and
`jaxalign bench sft` (one SFT step vs TRL's SFTTrainer)."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np

from jaxalign.bench.common import (chip_peak_tflops, gemm_tflops, in_fresh_process, make_bench_checkpoint,
                                   peak_memory_bytes, step_timer, timed, timed_with_faults, train_flops_per_token)
from jaxalign.models.model import resolve_compute_dtype

def bench_forward(batch: int, seq: int, iters: int, with_torch: bool, checkpoint: str | None = None) -> dict:
    """Load time and forward tokens/s of the bench model, jaxalign vs transformers (PyTorch)."""
    import jaxalign as ja

    tmp = None
    if checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = make_bench_checkpoint(tmp.name)
    t0 = time.perf_counter()
    model = ja.load_model(checkpoint, dtype="float32")
    jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t0
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    compile_s, step_s = timed(lambda: model.logits(ids, mask).block_until_ready(), warmup=2, iters=iters)
    result = {
        "benchmark": "forward", "device": jax.devices()[0].device_kind, "params": model.num_params(),
        "batch": batch, "seq": seq, "load_s": round(load_s, 3), "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s, 1),
    }
    if with_torch:
        import torch
        import transformers

        t0 = time.perf_counter()
        tm = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        torch_load = time.perf_counter() - t0
        tids, tmask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

        def torch_step():
            with torch.no_grad():
                tm(input_ids=tids, attention_mask=tmask)

        _, torch_step_s = timed(torch_step, warmup=2, iters=iters)
        result.update(
            torch_threads=torch.get_num_threads(), torch_load_s=round(torch_load, 3),
            torch_tokens_per_s=round(batch * seq / torch_step_s, 1),
            speedup_vs_torch=round(torch_step_s / step_s, 2),
        )
    if tmp is not None:
        tmp.cleanup()
    return result


def bench_sft(batch: int, seq: int, iters: int, with_trl: bool, compute_dtype: str, peak_tflops: float | None,
              checkpoint: str | None = None, remat: str = "none") -> dict:
    """SFT train-step throughput of jaxalign's jitted step vs TRL's SFTTrainer, same model and batch."""
    import jax.numpy as jnp

    import jaxalign as ja
    from jaxalign.algos.sft import sft_sums
    from jaxalign.config import OptimSection
    from jaxalign.train.optim import make_optimizer
    from jaxalign.train.step import init_state, make_train_step

    tmp = None
    if checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = make_bench_checkpoint(tmp.name)
    compute_dtype = resolve_compute_dtype(compute_dtype, "float32")
    peak_tflops = peak_tflops or chip_peak_tflops(jax.devices()[0].device_kind)
    model = ja.load_model(checkpoint, dtype="float32", compute_dtype=compute_dtype, remat=remat)
    config = model.config
    optimizer, schedule = make_optimizer(OptimSection(learning_rate=1e-5), 1000)
    loss_fn = lambda p, b, r: sft_sums(p, config, b)  # noqa: E731
    step = jax.jit(make_train_step(loss_fn, optimizer, schedule, lambda p, _: p), donate_argnums=0)
    state = init_state(model.params, optimizer, 0)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)).astype(np.int32)
    data = {"input_ids": ids, "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    data = jax.tree.map(jnp.asarray, data)
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step(holder["state"], None, data)
        jax.block_until_ready(metrics["loss"])

    compile_s, step_s, faults = timed_with_faults(run_step, warmup=2, iters=iters)
    tokens_per_s = batch * seq / step_s
    flops = train_flops_per_token(config, seq)
    result = {
        "benchmark": "sft", "device": jax.devices()[0].device_kind, "params": config.num_params(),
        "compute_dtype": compute_dtype, "batch": batch, "seq": seq, "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(tokens_per_s * flops / 1e12, 4), "peak_memory_gb": round(peak_memory_bytes() / 2**30, 3),
        "page_faults_per_step": round(faults), "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    # Roofline on this device: the step's model FLOPs at the measured rate of the model's
    # largest matmul (hidden x vocab over the batch's tokens).
    gemm = gemm_tflops(batch * seq, config.hidden_size, config.vocab_size, compute_dtype)
    result["gemm_tflops_per_s"] = round(gemm, 4)
    result["step_s_at_gemm_rate"] = round(batch * seq * flops / (gemm * 1e12), 4)
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = round(tokens_per_s * flops / (peak_tflops * 1e12), 4)
    del holder, state
    if with_trl:
        result.update(in_fresh_process(_trl_sft_tokens_per_s, checkpoint, ids, iters, remat != "none"))
        result["speedup_vs_trl"] = round(result["tokens_per_s"] / result["trl_tokens_per_s"], 2)
    if tmp is not None:
        tmp.cleanup()
    return result


def _trl_sft_tokens_per_s(checkpoint: str, ids: np.ndarray, iters: int, gradient_checkpointing: bool) -> dict:
    """TRL SFTTrainer (PyTorch, fp32) on the same checkpoint and token batch; timed per step
    (run by `bench_sft` in a fresh process). Gradient checkpointing is set to match
    jaxalign's remat (TRL turns it on by default), so both do the same arithmetic."""
    import datasets
    import torch
    import transformers
    from tokenizers import Tokenizer, models
    from trl import SFTConfig, SFTTrainer

    batch, seq = ids.shape
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
                                               pad_token="<pad>", eos_token="<unk>")
    rows = [{"input_ids": list(map(int, r))} for r in ids] * (2 + iters)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    timer, times = step_timer()

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_length=seq, max_steps=2 + iters,
                         learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                         dataloader_num_workers=0, packing=False, bf16=False, fp16=False, disable_tqdm=True,
                         gradient_checkpointing=gradient_checkpointing)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[timer])
        trainer.train()
    step_s = float(np.mean(times[2:]))
    return {"trl_step_s": round(step_s, 4), "trl_tokens_per_s": round(batch * seq / step_s, 1),
            "trl_gradient_checkpointing": gradient_checkpointing, "torch_threads": torch.get_num_threads()}
