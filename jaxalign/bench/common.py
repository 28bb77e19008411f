"""What every benchmark shares: the bench model, timing, chip peaks, FLOP counts, memory
readings, and running a peer in a fresh process."""

from __future__ import annotations

import re
import time

import jax

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


def timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(first-call seconds, mean seconds per call after warmup)."""
    return timed_with_faults(fn, warmup, iters)[:2]


def timed_with_faults(fn, warmup: int, iters: int) -> tuple[float, float, float]:
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


# Dense bf16 peak TFLOP/s per chip from the vendors' spec sheets (the sparsity figures
# halved): (regex searched in `jax.Device.device_kind`, TFLOP/s); the first match wins.
DEVICE_PEAK_TFLOPS = (
    (r"H100 PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),  # SXM
    (r"A100", 312.0),  # SXM and PCIe, 40 and 80 GB
    (r"^TPU v4$", 275.0),
    (r"^TPU v5( lite|e)$", 197.0),  # v5e
    (r"^TPU v5p?$", 459.0),  # v5p (some runtimes report "TPU v5")
)


def chip_peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a chip by its `device_kind` (None when not in `DEVICE_PEAK_TFLOPS`)."""
    return next((tflops for pattern, tflops in DEVICE_PEAK_TFLOPS if re.search(pattern, device_kind)), None)


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
    _, s = timed(lambda: f(a, b).block_until_ready(), warmup=2, iters=iters)
    return 2 * m * k * n / s / 1e12


def peak_memory_bytes() -> int:
    """Peak device memory where the backend reports it (GPU/TPU), else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned interpreter, so the reference runs without this process's
    XLA thread pools or heap alongside it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def step_timer():
    """`(callback, times)`: a transformers `TrainerCallback` that appends each optimizer step's
    wall seconds to the list `times` (for timing TRL's trainers step by step)."""
    import transformers

    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    return StepTimer(), times
