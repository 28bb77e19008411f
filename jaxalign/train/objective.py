"""What an algorithm hands the training loop.

An algorithm module (`jaxalign.algos.<name>`) has `build(cfg, model, tokenizer) -> Objective`:
pure loss math plus its batches; the loop (`jaxalign.train.loop`) does everything else.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterable

from jaxalign.errors import ConfigError
from jaxalign.parallel.rules import batch_size_multiple

# algorithm name -> module holding `build`
ALGORITHMS = {
    "sft": "jaxalign.algos.sft",
    "reward": "jaxalign.algos.reward",
    "dpo": "jaxalign.algos.dpo",
    "kto": "jaxalign.algos.kto",
    "ppo": "jaxalign.algos.ppo",
    "grpo": "jaxalign.algos.ppo",
    "rloo": "jaxalign.algos.ppo",
    "online_dpo": "jaxalign.algos.online_dpo",
}


@dataclasses.dataclass
class Objective:
    """loss_fn(params, batch, rng) -> {name: (sum, count)} with a "loss" entry; the loop
    minimizes sum/count over the global batch. train_batches: an iterator of host batches
    (dicts of numpy [B_local, ...]) with `state()` / `restore(state)`. eval_batches: a
    callable returning an iterable of eval batches; eval_fn(params, batch) -> sums like
    loss_fn (deterministic). evaluate_extra(params) -> dict of extra eval metrics (host).

    Optional hooks for objectives that train more than the model's own params (RL: policy
    + value model): init_params(model_params) -> the params tree the loop trains (applied
    once, right after build); trainable_mask(params) -> bool tree like params (True =
    trained; default: `lora.trainable`, LoRA adapters when present, else everything);
    sample_batch(params) -> the next host batch, for on-policy objectives (RL) whose batches
    are sampled from the model being trained: the loop calls it with the current full params
    instead of `next(train_batches)` (which still provides `state()` / `restore()`);
    export_params(params) -> the model params to export (default: params as they are).
    lora_dropout: whether training steps apply LoRA dropout (`lora.dropout`); RL turns it
    off, its old log-probs are computed without it."""

    loss_fn: Callable[[Any, dict, Any], dict]
    train_batches: Any
    eval_batches: Callable[[], Iterable[dict]] | None = None
    eval_fn: Callable[[Any, dict], dict] | None = None
    evaluate_extra: Callable[[Any], dict] | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    init_params: Callable[[Any], Any] | None = None
    trainable_mask: Callable[[Any], Any] | None = None
    sample_batch: Callable[[Any], dict] | None = None
    export_params: Callable[[Any], Any] | None = None
    lora_dropout: bool = True


def check_batch_size(train, mesh, unit: str = "") -> None:
    """ConfigError unless `train.batch_size` (`unit`: what a row is, e.g. " (pairs)") splits
    over the mesh's batch axes and `train.grad_accum` microbatches."""
    dp = batch_size_multiple(mesh)
    if train.batch_size % (dp * train.grad_accum):
        raise ConfigError(f"train.batch_size={train.batch_size}{unit} must be divisible by data x fsdp ({dp}) x "
                          f"train.grad_accum ({train.grad_accum})")


def get_builder(name: str):
    """The `build` function of algorithm `name`."""
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm {name!r} is not available; choose one of: {', '.join(ALGORITHMS)}")
    try:
        module = importlib.import_module(ALGORITHMS[name])
    except ModuleNotFoundError as e:
        if e.name != ALGORITHMS[name]:
            raise
        raise ConfigError(f"algorithm {name!r} is not implemented in this version of jaxalign") from e
    return module.build
