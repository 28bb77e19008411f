"""`jaxalign bench`: accelerator defaults (compute dtype "auto", the chip peak table behind MFU) and
every benchmark run at tiny sizes, checking what it reports (never how fast)."""

import os

import jax
import pytest

import jaxalign as ja
from jaxalign import bench
from jaxalign.bench import common
from jaxalign.config import describe, load_config
from jaxalign.models.model import resolve_compute_dtype

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart")


@pytest.mark.parametrize("backend, want", [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")])
def test_auto_compute_dtype_is_bf16_on_accelerators(monkeypatch, backend, want):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert resolve_compute_dtype("auto", "float32") == want
    assert resolve_compute_dtype("fp32", "bfloat16") == "float32"  # explicit values are honoured
    assert resolve_compute_dtype("bf16", "float32") == "bfloat16"
    assert resolve_compute_dtype(None, "bfloat16") == "bfloat16"  # None: the params' dtype


def test_config_default_is_auto_and_resolves_to_f32_masters_on_cpu(hf_model):
    cfg = load_config(QUICKSTART + "/sft.yaml")
    assert cfg.model.compute_dtype == "auto" and cfg.model.dtype == "float32"
    assert 'model.compute_dtype = "auto"  # activation dtype of the forward pass; auto: bfloat16 on GPU/TPU' in describe(
        ["model"])
    assert load_config(QUICKSTART + "/qlora.yaml").model.compute_dtype == "float32"  # explicit: kept
    _, path = hf_model("llama")
    model = ja.load_model(path, dtype="float32", compute_dtype="auto")
    assert (model.config.dtype, model.config.param_dtype) == ("float32", "float32")  # this machine is a CPU


@pytest.mark.parametrize("kind, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4 lite", None), ("TPU v6 lite", None), ("cpu", None),
])
def test_chip_peak_tflops_by_device_kind(kind, tflops):
    assert bench.chip_peak_tflops(kind) == tflops


def test_bench_sft_reports_mfu_against_the_known_chip_peak(hf_model, monkeypatch):
    """Without --peak-tflops the chip's table entry is used (here the CPU is given one); an
    explicit peak wins."""
    _, path = hf_model("llama")
    monkeypatch.setattr(common, "DEVICE_PEAK_TFLOPS", ((r"^cpu$", 2.0),))
    result = bench.bench_sft(2, 16, 1, False, "auto", None, checkpoint=path)
    flops = bench.train_flops_per_token(ja.load_model(path, dtype="float32").config, 16)
    assert result["peak_tflops"] == 2.0 and result["compute_dtype"] == "float32"
    assert result["mfu"] == round(result["tokens_per_s"] * flops / 2e12, 4)
    assert bench.bench_sft(2, 16, 1, False, "float32", 4.0, checkpoint=path)["peak_tflops"] == 4.0


def test_bench_dpo_feeds_trl_the_same_pairs(hf_model):
    """TRL's DPOTrainer gets the same number of tokens per pair as jaxalign's step (its word-level
    tokenizer maps each id to itself, and the EOS it appends replaces one given id)."""
    _, path = hf_model("llama")
    result = bench.bench_dpo(2, 8, 6, 1, True, checkpoint=path)
    assert result["tokens_per_pair"] == 2 * (8 + 6) == result["trl_tokens_per_pair"]
    assert result["step_s"] > 0 and result["trl_step_s"] > 0 and result["speedup_vs_trl"] > 0


def test_bench_generate_matches_transformers_greedy_tokens(hf_model):
    _, path = hf_model("llama")
    (row,) = bench.bench_generate(path, [2], 8, [2, 6], 1, ["transformers"])
    assert row["same_first_6_greedy_tokens_as_transformers"] == 1.0
    assert set(row) >= {"jaxalign_tokens_per_s@2", "transformers_tokens_per_s@6", "speedup_vs_transformers@6",
                        "jaxalign_decode_ms_per_step", "decode_fraction_of_bound"}


def test_bench_memory_qlora_needs_less_than_lora_bf16_and_full(hf_model):
    _, path = hf_model("llama", hidden_size=128, intermediate_size=256)
    result = bench.bench_memory(2, 16, path)
    by = {r["variant"]: r for r in result["variants"]}
    assert list(by) == list(bench.VARIANTS) and all(r["loss_finite"] for r in by.values())
    assert by["qlora_nf4"]["weights_gb"] < by["lora_bf16"]["weights_gb"] < by["full"]["weights_gb"]
    assert by["qlora_nf4"]["xla_step_gb"] < by["lora_bf16"]["xla_step_gb"] < by["full"]["xla_step_gb"]
    assert by["lora_bf16"]["trainable_params"] == by["qlora_nf4"]["trainable_params"] < by["full"]["trainable_params"]


def _bench_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="jaxalign")
    bench.add_arguments(parser.add_subparsers(dest="command").add_parser("bench"))
    return parser


def test_cli_parser_accepts_bench_rl():
    args = _bench_parser().parse_args(["bench", "rl"])
    assert (args.which, args.prompts, args.group, args.prompt_len, args.new_tokens, args.iters) == (
        "rl", 8, 4, 32, 32, 2)
    assert (args.algos, args.checkpoint, args.epochs, args.minibatches) == ("grpo,ppo", None, 1, 2)
    args = _bench_parser().parse_args(["bench", "rl", "--prompts", "2", "--group", "3", "--algos", "ppo",
                                       "--checkpoint", "example:smollm2", "--iters", "5", "--out", "x.jsonl"])
    assert (args.prompts, args.group, args.algos, args.checkpoint, args.iters, args.out) == (
        2, 3, "ppo", "example:smollm2", 5, "x.jsonl")
    assert not args.recompute_old_logprobs
    assert _bench_parser().parse_args(["bench", "rl", "--recompute-old-logprobs"]).recompute_old_logprobs


def test_bench_rl_times_every_phase_and_they_add_up(hf_model, tmp_path, capsys):
    """`jaxalign bench rl` on a tiny model: one JSON line per algorithm with every phase's ms
    (positive) and share, and the phases add up to the iteration."""
    import json

    _, path = hf_model("llama")
    out = tmp_path / "rl.jsonl"
    args = _bench_parser().parse_args(["bench", "rl", "--checkpoint", path, "--prompts", "2", "--group", "2",
                                       "--prompt-len", "8", "--new-tokens", "4", "--iters", "1", "--out", str(out)])
    results = bench.run(args)
    assert [r["algorithm"] for r in results] == ["grpo", "ppo"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    assert "| grpo |" in capsys.readouterr().err  # the table
    for r in results:
        assert r["benchmark"] == "rl" and r["sequences"] == 4 and r["update_steps"] == 2
        assert all(r[f"{ph}_ms"] > 0 and 0 < r[f"{ph}_fraction"] < 1 for ph in bench.PHASES), r
        total = sum(r[f"{ph}_ms"] for ph in bench.PHASES)
        assert abs(total - r["iteration_ms"]) <= 0.05 * r["iteration_ms"] + 0.1, r
        assert abs(sum(r[f"{ph}_fraction"] for ph in bench.PHASES) - 1) < 0.05
        assert r["generate_tokens_per_s"] > 0 and r["first_iteration_s"] > 0
    grpo, ppo = results
    assert (grpo["prompts"], grpo["samples_per_prompt"], ppo["prompts"], ppo["samples_per_prompt"]) == (2, 2, 4, 1)
    assert grpo["reward"] == "jaxalign.data.arithmetic:reward" and ppo["value_model"] is not None


def test_bench_rl_skips_the_old_logprob_forward_as_training_does(hf_model):
    """With one update per rollout GRPO (KL in the loss) skips the policy's experience forward,
    PPO (KL in the reward) does not; --recompute-old-logprobs runs it for GRPO too."""
    _, path = hf_model("llama")
    argv = ["bench", "rl", "--checkpoint", path, "--prompts", "2", "--group", "2", "--prompt-len", "8",
            "--new-tokens", "4", "--iters", "1", "--minibatches", "1"]
    grpo, ppo = bench.run(_bench_parser().parse_args(argv))
    assert grpo["update_steps"] == ppo["update_steps"] == 1
    assert not grpo["old_logprobs_forward"] and ppo["old_logprobs_forward"]
    (forced,) = bench.run(_bench_parser().parse_args(argv + ["--algos", "grpo", "--recompute-old-logprobs"]))
    assert forced["old_logprobs_forward"]
