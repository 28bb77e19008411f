"""The jitted training step: value-and-grad over microbatches, optimizer update, checks.

Objectives return `{name: (sum, count)}` pairs (see `jaxalign.algos`); sums are
accumulated over microbatches and divided once at the end, so K microbatches of B/K
give exactly the gradients of one batch of B.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, dict, jax.Array], dict]


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: trainable leaves (f32 masters); rng: raw key data (uint32)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def split_microbatches(batch: dict, k: int) -> dict:
    """[B, ...] leaves -> [k, B/k, ...]; microbatch j takes rows j, j+k, j+2k, ... so every
    data shard contributes equally to every microbatch."""

    def split(x):
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def accumulate(loss_fn: LossFn, combine: Callable, params, frozen, batch: dict, rng, grad_accum: int):
    """Summed grads and `{name: (sum, count)}` over `grad_accum` microbatches."""

    def sum_loss(p, mb, key):
        sums = loss_fn(combine(p, frozen), mb, key)
        return sums["loss"][0], sums

    grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
    if grad_accum == 1:
        (_, sums), grads = grad_fn(params, batch, rng)
        return grads, sums
    micro = split_microbatches(batch, grad_accum)
    keys = jax.random.split(rng, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    zero_sums = jax.eval_shape(lambda: grad_fn(params, first, keys[0])[0][1])
    init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums))

    def body(carry, xs):
        g_acc, s_acc = carry
        mb, key = xs
        (_, sums), g = grad_fn(params, mb, key)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

    (grads, sums), _ = jax.lax.scan(body, init, (micro, keys))
    return grads, sums


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    combine: Callable, grad_accum: int = 1):
    """`step(state, frozen, batch) -> (state, metrics)` (not yet jitted).

    Non-finite loss or gradients leave the state unchanged and report `finite = 0`; the
    loop then stops or skips per config.
    """

    def step(state: TrainState, frozen, batch: dict):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        grads, sums = accumulate(loss_fn, combine, state.params, frozen, batch, step_rng, grad_accum)
        count = jnp.maximum(sums["loss"][1], 1)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.global_norm(grads)
        metrics = {name: s / jnp.maximum(c, 1) for name, (s, c) in sums.items()}
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def apply(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A non-finite step leaves params and optimizer state as they were (a branch, not
        # an elementwise select over every parameter and moment).
        params, opt_state = jax.lax.cond(finite, apply, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(rng),
        )
        metrics.update(
            grad_norm=grad_norm, learning_rate=schedule(state.step), finite=finite.astype(jnp.int32),
        )
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn, combine: Callable):
    """`eval_step(params, frozen, batch) -> {name: (sum, count)}` (not yet jitted)."""

    def eval_step(params, frozen, batch):
        return loss_fn(combine(params, frozen), batch, jax.random.key(0))

    return eval_step
