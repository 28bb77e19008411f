"""`jaxalign bench memory`: the memory one SFT training step needs, for full fine-tuning,
LoRA on a bf16 base, QLoRA on an NF4 base, and QLoRA with double quantization, on the same
model and batch. Each variant runs in a fresh process.

Two figures per variant: XLA's own accounting of the compiled step (arguments + outputs +
temporaries - donated buffers: exact and the same on every run, on any backend), and the
peak the device reports after running it (peak bytes in use on GPU/TPU; on CPU the process's
peak RSS, which also holds the Python runtime and the compiler).
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np

from jaxalign.algos.rollout import tree_bytes
from jaxalign.bench.common import in_fresh_process, make_bench_checkpoint, peak_memory_bytes

VARIANTS = ("full", "lora_bf16", "qlora_nf4", "qlora_nf4_double_quant")


def variant_params(checkpoint: str, variant: str, rank: int = 16):
    """The model's params as `variant` trains them: `(trainable, frozen, config)`."""
    import jaxalign as ja
    from jaxalign.peft import lora, quant

    model = ja.load_model(checkpoint, dtype="float32" if variant == "full" else "bfloat16", compute_dtype="float32")
    params = model.params
    if variant.startswith("qlora"):
        params = quant.quantize(params, "nf4", double_quant=variant.endswith("double_quant"))
    if variant != "full":
        params = lora.apply(params, rank, 2 * rank, "all-linear", jax.random.key(1))
    trainable, frozen = lora.split(params, lora.trainable(params))
    return trainable, frozen, model.config


def step_memory(checkpoint: str, variant: str, batch: int, seq: int) -> dict:
    """Compile and run two SFT steps of `variant`; its memory figures (run in a fresh process)."""
    import jax.numpy as jnp

    from jaxalign.algos.sft import sft_sums
    from jaxalign.config import OptimSection
    from jaxalign.peft import lora
    from jaxalign.train.optim import make_optimizer
    from jaxalign.train.step import init_state, make_train_step

    trainable, frozen, config = variant_params(checkpoint, variant)
    optimizer, schedule = make_optimizer(OptimSection(learning_rate=1e-5), 1000)
    step = jax.jit(make_train_step(lambda p, b, r: sft_sums(p, config, b), optimizer, schedule, lora.combine),
                   donate_argnums=0)
    weights_gb = (tree_bytes(frozen) + tree_bytes(trainable)) / 2**30  # before the step donates them
    trainable_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    state = init_state(trainable, optimizer, 0)
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)).astype(np.int32)
    data = jax.tree.map(jnp.asarray, {"input_ids": ids, "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                                      "segment_ids": np.ones_like(ids), "loss_mask": np.ones_like(ids)})
    compiled = step.lower(state, frozen, data).compile()
    m = compiled.memory_analysis()
    xla_bytes = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    for _ in range(2):
        state, metrics = compiled(state, frozen, data)
    loss = float(metrics["loss"])
    return {"variant": variant, "weights_gb": round(weights_gb, 4), "trainable_params": trainable_params,
            "optimizer_state_gb": round(tree_bytes(state.opt_state) / 2**30, 4),
            "xla_step_gb": round(xla_bytes / 2**30, 4), "xla_temp_gb": round(m.temp_size_in_bytes / 2**30, 4),
            "peak_gb": round(peak_memory_bytes() / 2**30, 3), "loss_finite": bool(np.isfinite(loss))}


def bench_memory(batch: int, seq: int, checkpoint: str | None = None, variants=VARIANTS) -> dict:
    """Memory of one training step for each variant, side by side, plus each variant's
    XLA-accounted step memory as a fraction of LoRA-bf16's."""
    tmp = None
    if checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = make_bench_checkpoint(tmp.name)
    rows = [in_fresh_process(step_memory, checkpoint, v, batch, seq) for v in variants]
    if tmp is not None:
        tmp.cleanup()
    result = {"benchmark": "memory", "device": jax.devices()[0].device_kind, "batch": batch, "seq": seq,
              "variants": rows}
    base = next((r["xla_step_gb"] for r in rows if r["variant"] == "lora_bf16"), None)
    if base:
        for r in rows:
            r["xla_step_vs_lora_bf16"] = round(r["xla_step_gb"] / base, 3)
    return result
