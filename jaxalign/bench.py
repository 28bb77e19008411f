"""Throughput benchmarks: `jaxalign bench forward` (and more as trainers land).

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
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return first, (time.perf_counter() - t0) / iters


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="which", required=True)
    fwd = sub.add_parser("forward", help="load time and forward tokens/s vs transformers")
    fwd.add_argument("--batch", type=int, default=8)
    fwd.add_argument("--seq", type=int, default=256)
    fwd.add_argument("--iters", type=int, default=5)
    fwd.add_argument("--checkpoint", default=None, help="HF model dir (default: random 56M Llama)")
    fwd.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    fwd.add_argument("--out", default=None, help="append the JSON result to this file")


def run(args: argparse.Namespace) -> dict:
    if args.which == "forward":
        result = bench_forward(args.batch, args.seq, args.iters, not args.no_torch, args.checkpoint)
    else:
        raise SystemExit(f"unknown benchmark {args.which!r}")
    line = json.dumps(result)
    print(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return result
