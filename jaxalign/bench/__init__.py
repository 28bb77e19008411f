"""Throughput and memory benchmarks: `jaxalign bench forward | sft | dpo | generate | memory | rl`.

Every benchmark but `rl` prints jaxalign's numbers next to its peer measured in the same run
(transformers, TRL, Tunix on the same weights and inputs, each in a fresh process), so the
ratio is what to read. `rl` has no peer: it splits one GRPO and one PPO iteration into its
phases (generate, score, experience, advantages, update) and reports where the time goes.
One JSON line per result; `--out` appends them to a file.
"""

from __future__ import annotations

import argparse
import json
import os

from jaxalign.bench.common import (BENCH_SHAPE, DEVICE_PEAK_TFLOPS, chip_peak_tflops, make_bench_checkpoint,
                                   train_flops_per_token)
from jaxalign.bench.dpo import bench_dpo
from jaxalign.bench.generate import bench_generate
from jaxalign.bench.memory import VARIANTS, bench_memory
from jaxalign.bench.rl import PHASES, bench_rl
from jaxalign.bench.train import bench_forward, bench_sft

__all__ = ["BENCH_SHAPE", "DEVICE_PEAK_TFLOPS", "PHASES", "VARIANTS", "bench_dpo", "bench_forward", "bench_generate",
           "bench_memory", "bench_rl", "bench_sft", "chip_peak_tflops", "make_bench_checkpoint",
           "train_flops_per_token"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="which", required=True)
    checkpoint = "HF model dir (default: the random 56M Llama-shaped bench model)"
    fwd = sub.add_parser("forward", help="load time and forward tokens/s vs transformers")
    fwd.add_argument("--batch", type=int, default=8)
    fwd.add_argument("--seq", type=int, default=256)
    fwd.add_argument("--iters", type=int, default=5)
    fwd.add_argument("--checkpoint", default=None, help=checkpoint)
    fwd.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    sft = sub.add_parser("sft", help="SFT train-step tokens/s, MFU, memory vs TRL's SFTTrainer")
    sft.add_argument("--batch", type=int, default=8)
    sft.add_argument("--seq", type=int, default=256)
    sft.add_argument("--iters", type=int, default=5)
    sft.add_argument("--checkpoint", default=None, help=checkpoint)
    sft.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    sft.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    sft.add_argument("--no-trl", action="store_true", help="skip TRL's SFTTrainer reference")
    dpo = sub.add_parser("dpo", help="DPO train-step pairs/s vs TRL's DPOTrainer (full fine-tune, frozen reference)")
    dpo.add_argument("--batch", type=int, default=4, help="pairs per step")
    dpo.add_argument("--prompt-len", type=int, default=64)
    dpo.add_argument("--response-len", type=int, default=64)
    dpo.add_argument("--iters", type=int, default=3)
    dpo.add_argument("--checkpoint", default=None, help=checkpoint)
    dpo.add_argument("--no-trl", action="store_true", help="skip TRL's DPOTrainer reference")
    gen = sub.add_parser("generate", help="sampling tokens/s (prefill + decode) vs transformers and Tunix")
    gen.add_argument("--batches", type=_ints, default=[1, 8, 32], help="comma-separated batch sizes")
    gen.add_argument("--prompt-len", type=int, default=64)
    gen.add_argument("--new-tokens", type=_ints, default=[64, 256],
                     help="comma-separated lengths to generate; the first and last give decode ms/step")
    gen.add_argument("--iters", type=int, default=2)
    gen.add_argument("--checkpoint", default=None, help=checkpoint)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute, every peer")
    gen.add_argument("--peers", default="transformers,tunix",
                     help="comma-separated peers: transformers, tunix (skipped with a note when not installed)")
    mem = sub.add_parser("memory", help="memory of one training step: full, LoRA-bf16, QLoRA-NF4, + double quant")
    mem.add_argument("--batch", type=int, default=4)
    mem.add_argument("--seq", type=int, default=256)
    mem.add_argument("--checkpoint", default=None, help=checkpoint)
    mem.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    rl = sub.add_parser("rl", help="one GRPO and one PPO iteration split into phases: generate, score, experience, "
                                   "advantages, update (ms, share of the iteration, generation tokens/s)")
    rl.add_argument("--prompts", type=int, default=8, help="prompts per GRPO iteration")
    rl.add_argument("--group", type=int, default=4,
                    help="GRPO samples per prompt (PPO: one sample for each of prompts x group prompts)")
    rl.add_argument("--prompt-len", type=int, default=32)
    rl.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per response (no early stop)")
    rl.add_argument("--iters", type=int, default=2, help="iterations timed after the first (compiling) one")
    rl.add_argument("--epochs", type=int, default=1, help="passes over each rollout in the update phase")
    rl.add_argument("--minibatches", type=int, default=2, help="optimizer steps per epoch")
    rl.add_argument("--grpo-beta", type=float, default=0.04,
                    help="GRPO's KL-to-reference loss weight (0: no reference forward in the experience phase)")
    rl.add_argument("--algos", default="grpo,ppo", help="comma-separated, of: grpo, ppo")
    rl.add_argument("--recompute-old-logprobs", action="store_true",
                    help="run the policy's old-log-prob forward even with one update per rollout and the KL in "
                         "the loss, where training skips it (to measure the saving)")
    rl.add_argument("--checkpoint", default=None, help=checkpoint)
    rl.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    for p in (sft, dpo):
        p.add_argument("--peak-tflops", type=float, default=None,
                       help="chip peak for MFU (default: the chip's dense bf16 peak when its kind is known)")
    for p in (fwd, sft, dpo, gen, mem, rl):
        p.add_argument("--out", default=None, help="append the JSON result(s) to this file")


def _checkpoint(path: str | None) -> str | None:
    """A model path as users give it (HF dir, .gguf, example:NAME) -> an HF directory."""
    if path is None:
        return None
    from jaxalign.config import builtin_path
    from jaxalign.models.gguf import resolve

    return resolve(builtin_path(path))


def run(args: argparse.Namespace) -> list[dict]:
    checkpoint = _checkpoint(args.checkpoint)
    if args.which == "forward":
        results = [bench_forward(args.batch, args.seq, args.iters, not args.no_torch, checkpoint)]
    elif args.which == "sft":
        results = [bench_sft(args.batch, args.seq, args.iters, not args.no_trl, args.compute_dtype, args.peak_tflops,
                             checkpoint, args.remat)]
    elif args.which == "dpo":
        results = [bench_dpo(args.batch, args.prompt_len, args.response_len, args.iters, not args.no_trl, checkpoint,
                             args.peak_tflops)]
    elif args.which == "generate":
        results = bench_generate(checkpoint, args.batches, args.prompt_len, args.new_tokens, args.iters,
                                 [p for p in args.peers.split(",") if p], args.dtype)
    elif args.which == "rl":
        results = bench_rl(checkpoint, args.prompts, args.group, args.prompt_len, args.new_tokens, args.iters,
                           tuple(a for a in args.algos.split(",") if a), args.epochs, args.minibatches, args.grpo_beta,
                           args.compute_dtype, args.recompute_old_logprobs)
    else:
        results = [bench_memory(args.batch, args.seq, checkpoint, tuple(args.variants.split(",")))]
    for result in results:
        line = json.dumps(result)
        print(line)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return results
