"""The optimizer: AdamW with warmup then cosine / linear / constant decay, global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxalign.config import OptimSection
from jaxalign.parallel.rules import path_str


def learning_rate_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then the chosen decay
    down to `min_lr_ratio * learning_rate` at `total_steps`."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). Weight decay applies to matrices only (see `decay_mask`)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


def decay_mask(params):
    """True for matrices (kernels, embeddings and adapters under them); False for norms and biases."""

    def is_matrix(path, _):
        parts = path_str(path).split(".")
        return "kernel" in parts or "embedding" in parts

    return jax.tree_util.tree_map_with_path(is_matrix, params)
