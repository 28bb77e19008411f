"""Throughput benchmarks: `jaxalign bench forward` and `jaxalign bench sft`.

Every benchmark prints jaxalign's numbers next to a reference measured in the same run
(PyTorch + transformers on the same weights), so the ratio is what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

# The Llama-shaped ~56M-parameter model of the project's benchmarks.
BENCH_SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)


def make_bench_checkpoint(path: str, dtype: str = "float32") -> str:
    """Write a random Llama-shaped ~56M-param checkpoint in HF format (no torch needed)."""
    from jaxalign.models.config import ModelConfig
    from jaxalign.models.model import init_model
    from jaxalign.nn.rope import RopeConfig

    s = BENCH_SHAPE
    cfg = ModelConfig(
        model_type="llama", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
        head_dim=s["hidden_size"] // s["num_attention_heads"], rope=RopeConfig(theta=10000.0),
        max_position_embeddings=s["max_position_embeddings"], param_dtype=dtype, dtype=dtype,
        bos_token_id=1, eos_token_id=2,
    )
    init_model(cfg, jax.random.key(0)).save_pretrained(path)
    return path


def _time(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(first-call seconds, mean seconds per call after warmup)."""
    return _time_and_faults(fn, warmup, iters)[:2]


def _time_and_faults(fn, warmup: int, iters: int) -> tuple[float, float, float]:
    """(first-call seconds, mean seconds per call after warmup, minor page faults per call
    after warmup: memory the process maps afresh on every call)."""
    import resource

    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    seconds = (time.perf_counter() - t0) / iters
    return first, seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / iters


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
    compile_s, step_s = _time(lambda: model.logits(ids, mask).block_until_ready(), warmup=2, iters=iters)
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

        _, torch_step_s = _time(torch_step, warmup=2, iters=iters)
        result.update(
            torch_threads=torch.get_num_threads(), torch_load_s=round(torch_load, 3),
            torch_tokens_per_s=round(batch * seq / torch_step_s, 1),
            speedup_vs_torch=round(torch_step_s / step_s, 2),
        )
    if tmp is not None:
        tmp.cleanup()
    return result


def train_flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: 6 N (matmul params, embeddings excluded) + 12 L H hd T
    (attention scores and values, forward + backward, no causal discount), as in PaLM/MaxText."""
    n = config.num_params() - config.vocab_size * config.hidden_size * (1 if not config.tie_word_embeddings else 0)
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq
    return 6 * n + attention


def gemm_tflops(m: int, k: int, n: int, dtype: str, iters: int = 5) -> float:
    """Measured TFLOP/s of one jitted [m, k] x [k, n] matmul: the arithmetic ceiling a
    training step of that size can approach on this device."""
    import jax.numpy as jnp

    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    f = jax.jit(jnp.dot)
    _, s = _time(lambda: f(a, b).block_until_ready(), warmup=2, iters=iters)
    return 2 * m * k * n / s / 1e12


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU/TPU), else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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

    compile_s, step_s, faults = _time_and_faults(run_step, warmup=2, iters=iters)
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
        result["mfu"] = round(tokens_per_s * flops / (peak_tflops * 1e12), 4)
    del holder, state
    if with_trl:
        result.update(_in_fresh_process(_trl_sft_tokens_per_s, checkpoint, ids, iters, remat != "none"))
        result["speedup_vs_trl"] = round(result["tokens_per_s"] / result["trl_tokens_per_s"], 2)
    if tmp is not None:
        tmp.cleanup()
    return result


def _in_fresh_process(fn, *args):
    """fn(*args) in a spawned interpreter, so the reference runs without this process's
    XLA thread pools or heap alongside it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


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
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=batch, max_length=seq, max_steps=2 + iters,
                         learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                         dataloader_num_workers=0, packing=False, bf16=False, fp16=False, disable_tqdm=True,
                         gradient_checkpointing=gradient_checkpointing)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Timer()])
        trainer.train()
    step_s = float(np.mean(times[2:]))
    return {"trl_step_s": round(step_s, 4), "trl_tokens_per_s": round(batch * seq / step_s, 1),
            "trl_gradient_checkpointing": gradient_checkpointing, "torch_threads": torch.get_num_threads()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="which", required=True)
    fwd = sub.add_parser("forward", help="load time and forward tokens/s vs transformers")
    fwd.add_argument("--batch", type=int, default=8)
    fwd.add_argument("--seq", type=int, default=256)
    fwd.add_argument("--iters", type=int, default=5)
    fwd.add_argument("--checkpoint", default=None, help="HF model dir (default: random 56M Llama)")
    fwd.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    fwd.add_argument("--out", default=None, help="append the JSON result to this file")
    sft = sub.add_parser("sft", help="SFT train-step tokens/s, MFU, memory vs TRL's SFTTrainer")
    sft.add_argument("--batch", type=int, default=8)
    sft.add_argument("--seq", type=int, default=256)
    sft.add_argument("--iters", type=int, default=5)
    sft.add_argument("--checkpoint", default=None, help="HF model dir (default: random 56M Llama)")
    sft.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    sft.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    sft.add_argument("--peak-tflops", type=float, default=None, help="chip peak for MFU (H100 bf16 dense: 989)")
    sft.add_argument("--no-trl", action="store_true", help="skip TRL's SFTTrainer reference")
    sft.add_argument("--out", default=None, help="append the JSON result to this file")


def run(args: argparse.Namespace) -> dict:
    if args.which == "forward":
        result = bench_forward(args.batch, args.seq, args.iters, not args.no_torch, args.checkpoint)
    elif args.which == "sft":
        result = bench_sft(args.batch, args.seq, args.iters, not args.no_trl, args.compute_dtype, args.peak_tflops,
                           args.checkpoint, args.remat)
    else:
        raise SystemExit(f"unknown benchmark {args.which!r}")
    line = json.dumps(result)
    print(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return result
