"""What every pairwise objective (reward model, DPO family, KTO, online DPO) shares: loading
and checking preference data (`load_preference_examples`), the pair batch iterator
(`PairBatches`), one side's arrays (`side_arrays`), chosen and rejected through one forward
pass (`concat_sides`), running a jitted per-pair function over a dataset (`pair_runner`,
`per_pair_outputs`), masked metric sums and the length-bias metrics."""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data.batching import BATCH_KEYS, SCORE_AT, BatchIterator
from jaxalign.errors import DataError
from jaxalign.train import objective

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")


def load_preference_examples(cfg, tokenizer, which: str, max_prompt_length: int | None = None):
    """`(pairs, DataStats)` of the train or eval (`which`) preference data per `cfg.data`
    (`(None, None)` when that split is not configured).

    Pairs are `tokenize_preference`'s (`prompt_ids`, `chosen_ids`, `rejected_ids`, `margin`
    [, `score_gap`]), with `data.columns`, `data.system_prompt` and `data.min_score_gap`
    applied. Bad rows (missing or null column, empty response, chosen == rejected, implicit
    rows without a shared prompt, a prompt that disagrees with the head of chosen/rejected,
    a non-numeric margin) are dropped and counted in the stats' `drop_reasons`, or raise a
    `DataError` naming the row when `data.on_bad_row=error`.
    """
    from jaxalign.data import configured_rows, tokenize_preference

    d = cfg.data
    source = d.train if which == "train" else d.eval
    rows = configured_rows(d, which)
    if rows is None:
        return None, None
    pairs, stats = tokenize_preference(rows, tokenizer, max_length=d.max_length, max_prompt_length=max_prompt_length,
                                       truncation=d.truncation, on_bad_row=d.on_bad_row, columns=d.columns,
                                       system_prompt=d.system_prompt, min_score_gap=d.min_score_gap)
    if stats.dropped:
        log.warning("%s data %s: dropped %d of %d rows %s", which, source, stats.dropped, stats.rows, stats.drop_reasons)
    if not pairs:
        raise DataError(f"no usable preference pairs in {source}: every row was dropped ({stats.rows} rows; "
                        f"{stats.drops()}); fix the rows, or check data.max_length")
    return pairs, stats


class PairBatches(BatchIterator):
    """`BatchIterator` over preference pairs that also carries per-pair float fields of the
    examples (`extra_keys`, e.g. precomputed reference log-probs) as `[B]` float32 arrays
    (0 on all-padding rows)."""

    def __init__(self, examples, *args, extra_keys=(), **kwargs):
        super().__init__(examples, *args, **kwargs)
        self.extra_keys = tuple(extra_keys)

    def _materialize(self, batch):
        out = super()._materialize(batch)
        lo = self.process_index * self.local_batch_size
        local = batch[lo: lo + self.local_batch_size]
        for key in self.extra_keys:
            out[key] = np.array([float(self.examples[row[0]][key]) if row else 0.0 for row in local], np.float32)
        return out


def check_batch_size(cfg, mesh) -> None:
    """`objective.check_batch_size` for batches of pairs."""
    objective.check_batch_size(cfg.train, mesh, " (pairs)")


def pair_iterator(cfg, pairs, tokenizer, *, train: bool, extra_keys=(), iterator=PairBatches) -> PairBatches:
    """Batches of `cfg.train.batch_size` pairs (train: shuffled, endless; eval: in order, one
    pass, last batch filled with all-padding rows); `iterator`: `PairBatches` or a subclass."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    common = dict(batch_size=cfg.train.batch_size, pad_id=pad, buckets=cfg.data.buckets, seq_len=cfg.data.max_length,
                  process_index=jax.process_index(), process_count=jax.process_count(), extra_keys=extra_keys)
    if train:
        return iterator(pairs, seed=cfg.train.seed, shuffle=True, **common)
    return iterator(pairs, shuffle=False, drop_last=False, num_epochs=1, **common)


def side_arrays(batch: dict, side: str) -> dict:
    """One side's sequence arrays of a pair batch: `{side}_*` `BATCH_KEYS` `[B, T]` and, when the
    batch has them, the scored positions `{side}_score_at` `[B, K]`, without the prefix."""
    keys = BATCH_KEYS + ((SCORE_AT,) if f"{side}_{SCORE_AT}" in batch else ())
    return {k: batch[f"{side}_{k}"] for k in keys}


def concat_sides(batch: dict, sides: tuple[str, str] = SIDES) -> dict:
    """`chosen_*` and `rejected_*` (or other `sides`) arrays (`side_arrays`) -> one batch of
    `2B` rows (the first side's rows first)."""
    first, second = (side_arrays(batch, s) for s in sides)
    return {k: jnp.concatenate([first[k], second[k]], axis=0) for k in first}


def pair_runner(fn: Callable, mesh) -> Callable:
    """`fn(params, batch) -> {name: [B]}` jitted once with replicated outputs (every process
    gets every row's values); pass the result to `per_pair_outputs`."""
    if mesh is None:
        return jax.jit(fn)
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def per_pair_outputs(runner: Callable, params, batches, mesh, num_pairs: int) -> dict[str, np.ndarray]:
    """Run `runner` (from `pair_runner`) over `batches` of pairs in dataset order and return
    `{name: [num_pairs]}` host arrays; padding rows past the end are dropped."""
    from jaxalign.train.loop import to_global

    chunks: dict[str, list] = {}
    for batch in batches:
        arrays = to_global(batch, mesh) if mesh is not None else {k: jnp.asarray(v) for k, v in batch.items()}
        for k, v in runner(params, arrays).items():
            chunks.setdefault(k, []).append(np.asarray(jax.device_get(v)))
    return {k: np.concatenate(v)[:num_pairs] for k, v in chunks.items()}


def response_lengths(batch: dict) -> tuple[jax.Array, jax.Array]:
    """Response tokens `[B]` of each side (the loss_mask counts; 0 on padding rows)."""
    return tuple(jnp.sum(batch[f"{s}_loss_mask"], axis=1).astype(jnp.float32) for s in SIDES)


def masked_sums(values: dict[str, jax.Array], valid) -> dict[str, tuple[jax.Array, jax.Array]]:
    """`{name: [B] values}` -> `{name: (sum over valid rows, number of valid rows)}`."""
    n = jnp.sum(valid).astype(jnp.float32)
    return {k: (jnp.sum(jnp.where(valid, v.astype(jnp.float32), 0.0)), n) for k, v in values.items()}


def length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) -> dict[str, float]:
    """`ja.losses.length_bias_metrics` without its duplicate `accuracy` entry."""
    from jaxalign.algos.preference_losses import length_bias_metrics

    out = length_bias_metrics(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths)
    out.pop("accuracy", None)
    return out
