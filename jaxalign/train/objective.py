"""What an algorithm hands the training loop.

An algorithm module (`jaxalign.algos.<name>`) has `build(cfg, model, tokenizer) -> Objective`:
pure loss math plus its batches; the loop (`jaxalign.train.loop`) does everything else.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Iterable

from jaxalign.errors import ConfigError

# algorithm name -> module holding `build`
ALGORITHMS = {
    "sft": "jaxalign.algos.sft",
    "reward": "jaxalign.algos.reward",
    "dpo": "jaxalign.algos.dpo",
    "ppo": "jaxalign.algos.ppo",
    "grpo": "jaxalign.algos.ppo",
    "rloo": "jaxalign.algos.ppo",
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
    trained; default: LoRA adapters when present, else everything); bind_params(get) is
    called once with a function returning the current full params (for iterators that
    sample from the model being trained); export_params(params) -> the model params to
    export (default: params as they are). lora_dropout: whether training steps apply LoRA
    dropout (`lora.dropout`); RL turns it off, its old log-probs are computed without it."""

    loss_fn: Callable[[Any, dict, Any], dict]
    train_batches: Any
    eval_batches: Callable[[], Iterable[dict]] | None = None
    eval_fn: Callable[[Any, dict], dict] | None = None
    evaluate_extra: Callable[[Any], dict] | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    init_params: Callable[[Any], Any] | None = None
    trainable_mask: Callable[[Any], Any] | None = None
    bind_params: Callable[[Callable[[], Any]], None] | None = None
    export_params: Callable[[Any], Any] | None = None
    lora_dropout: bool = True


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
