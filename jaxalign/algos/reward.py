"""Reward modeling (`algorithm: reward`): a scalar head on the decoder trained on preference
pairs with the Bradley–Terry loss `-log σ(r_chosen - r_rejected - margin)`
(`ja.losses.reward_pairwise`, optional reward centering from `cfg.reward`).

Data: TRL preference formats (explicit `prompt` + `chosen` + `rejected`, or implicit
`chosen` + `rejected` sharing a prompt; text or conversations; optional `margin`), via
`jaxalign.data.tokenize_preference`. Chosen and rejected sequences of a batch go through
ONE forward pass (concatenated along the batch axis, `[2B, T]`), and each is scored at its
last real token (`jaxalign.models.heads.sequence_scores`).

Init: a causal-LM `model.path` gets a fresh head ~ N(0, 1/sqrt(D+1)) and loses its
`lm_head` (`Objective.init_params`); a *ForSequenceClassification checkpoint keeps its
head. Under LoRA the adapters and the head are trained. Export: the loop's `final/` is a
`*ForSequenceClassification` checkpoint (`AutoModelForSequenceClassification` loads it) and,
under LoRA, `adapter/` a PEFT SEQ_CLS adapter with the head.

Eval (host-side, one pass over the eval pairs): loss, accuracy, margin, mean chosen /
rejected score, and length bias: `length_correlation` (Pearson r of score vs response
length over all responses), `accuracy_chosen_shorter` / `accuracy_chosen_longer`
(accuracy on pairs whose chosen response is shorter / longer), `frac_chosen_shorter`.

This module also holds what reward and DPO share: loading/checking preference data
(`load_preference_examples`), the pair batch iterator (`PairBatches`), and running a
jitted per-pair function over a dataset (`per_pair_outputs`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.data.batching import BatchIterator
from jaxalign.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
_HH_ASSISTANT = "\n\nAssistant:"


# ----------------------------------------------------------------------------- data


def check_shared_prompts(rows, on_bad_row: str):
    """Rows of the implicit preference format whose chosen and rejected texts share no prompt.

    Implicit rows take the prompt from the common prefix of chosen and rejected: when the
    two have no shared prefix (text: nothing before the last common whitespace;
    conversations: no common leading message), or, for hh-rlhf style texts, when the shared
    prefix stops inside the human turn (the prompts differ), there is no prompt to condition
    on. Returns `(kept_rows, {reason: count})`; with `on_bad_row="error"` raises a
    `DataError` naming the first such row instead.
    """
    from jaxalign.data import split_implicit_messages, split_implicit_prompt
    from jaxalign.data.formats import is_conversational

    kept, dropped = [], {}
    for i, row in enumerate(rows):
        c, r = row.get("chosen"), row.get("rejected")
        reason = None
        if isinstance(c, str) and isinstance(r, str) and c != r:
            prompt, _, _ = split_implicit_prompt(c, r)
            if not prompt.strip():
                reason, why = "no_shared_prompt", "chosen and rejected share no prompt (no common prefix)"
            elif _HH_ASSISTANT in c and _HH_ASSISTANT in r and not prompt.endswith(_HH_ASSISTANT):
                reason, why = "prompt_mismatch", "chosen and rejected have different prompts (their human turns differ)"
        elif is_conversational(c) and is_conversational(r) and list(c) != list(r):
            prompt, _, _ = split_implicit_messages(list(c), list(r))
            if not prompt:
                reason, why = "no_shared_prompt", "chosen and rejected conversations share no leading message"
        if reason is None:
            kept.append(row)
            continue
        if on_bad_row == "error":
            raise DataError(f"row {i}: {why} (format implicit_preference); fix the row or pass on_bad_row='drop'")
        dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


def load_preference_examples(cfg, tokenizer, which: str, max_prompt_length: int | None = None):
    """`(pairs, DataStats)` of the train or eval (`which`) preference data per `cfg.data`
    (`(None, None)` when that split is not configured).

    Pairs are `tokenize_preference`'s (`prompt_ids`, `chosen_ids`, `rejected_ids`, `margin`).
    Bad rows (missing or null column, empty response, chosen == rejected, implicit rows
    without a shared prompt, a non-numeric margin) are dropped and counted in the stats'
    `drop_reasons`, or raise a `DataError` naming the row when `data.on_bad_row=error`.
    """
    from jaxalign.data import configured_rows, detect_format, tokenize_preference

    d = cfg.data
    source = d.train if which == "train" else d.eval
    rows = configured_rows(d, which)
    if rows is None:
        return None, None
    fmt = detect_format(rows, kind="preference")
    pre_dropped: dict[str, int] = {}
    if fmt == "implicit_preference":
        rows, pre_dropped = check_shared_prompts(rows, d.on_bad_row)
        if not rows:
            raise DataError(f"every row of {source} was dropped: {pre_dropped}; implicit preference rows need "
                            "chosen and rejected texts that share their prompt")
    pairs, stats = tokenize_preference(rows, tokenizer, max_length=d.max_length, max_prompt_length=max_prompt_length,
                                       truncation=d.truncation, format=fmt, on_bad_row=d.on_bad_row)
    for reason, n in pre_dropped.items():
        stats.rows += n
        stats.dropped += n
        stats.drop_reasons[reason] = stats.drop_reasons.get(reason, 0) + n
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
    from jaxalign.algos.sft import data_parallel_size

    dp = data_parallel_size(mesh) if mesh is not None else 1
    if cfg.train.batch_size % (dp * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (pairs) must be divisible by data x fsdp ({dp}) x "
                          f"train.grad_accum ({cfg.train.grad_accum})")


def pair_iterator(cfg, pairs, tokenizer, *, train: bool, extra_keys=()) -> PairBatches:
    """Batches of `cfg.train.batch_size` pairs (train: shuffled, endless; eval: in order, one
    pass, last batch filled with all-padding rows)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    common = dict(batch_size=cfg.train.batch_size, pad_id=pad, buckets=cfg.data.buckets, seq_len=cfg.data.max_length,
                  process_index=jax.process_index(), process_count=jax.process_count(), extra_keys=extra_keys)
    if train:
        return PairBatches(pairs, seed=cfg.train.seed, shuffle=True, **common)
    return PairBatches(pairs, shuffle=False, drop_last=False, num_epochs=1, **common)


def concat_sides(batch: dict) -> dict:
    """`chosen_*` and `rejected_*` `[B, T]` arrays -> one `[2B, T]` batch (chosen rows first)."""
    keys = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in keys}


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


# ----------------------------------------------------------------------------- reward objective


def reward_pair_scores(params, config, batch: dict) -> dict[str, jax.Array]:
    """Scores of both sides of a preference batch in one forward pass.

    batch: `chosen_*` / `rejected_*` `[B, T]` (see `jaxalign.data.batching`). Returns
    `chosen`, `rejected` (scores `[B]` f32 at each sequence's last real token) and `valid`
    `[B]` bool (False on all-padding rows).
    """
    from jaxalign.models.heads import sequence_scores

    both = concat_sides(batch)
    scores = sequence_scores(params, config, both["input_ids"], both["attention_mask"], both["positions"],
                             both["segment_ids"])
    b = batch["chosen_input_ids"].shape[0]
    valid = (jnp.sum(batch["chosen_loss_mask"], axis=1) > 0) & (jnp.sum(batch["rejected_loss_mask"], axis=1) > 0)
    return {"chosen": scores[:b], "rejected": scores[b:], "valid": valid}


def reward_sums(params, config, batch: dict, center_rewards_coefficient: float = 0.0) -> dict:
    """`{name: (sum, count)}` over the valid pairs of a batch: loss (Bradley–Terry with the
    batch's `margin`, + centering), accuracy (chosen scored strictly higher), margin (mean
    r_c - r_r), chosen / rejected (mean scores)."""
    from jaxalign.losses import reward_pairwise

    out = reward_pair_scores(params, config, batch)
    rc, rr, valid = out["chosen"], out["rejected"], out["valid"]
    losses = reward_pairwise(rc, rr, batch.get("margin"), center_rewards_coefficient)
    return masked_sums({"loss": losses, "accuracy": rc > rr, "margin": rc - rr, "chosen": rc, "rejected": rr}, valid)


def length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) -> dict[str, float]:
    """`ja.losses.length_bias_metrics` without its duplicate `accuracy` entry."""
    from jaxalign.losses import length_bias_metrics

    out = length_bias_metrics(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths)
    out.pop("accuracy", None)
    return out


def build(cfg, model, tokenizer):
    """The reward-model objective: pairs from `cfg.data`, the Bradley–Terry loss, a fresh
    score head on a causal-LM checkpoint, host-side eval with length-bias metrics."""
    from jaxalign.losses import reward_pairwise
    from jaxalign.models import heads
    from jaxalign.train.objective import Objective

    check_batch_size(cfg, model.mesh)
    if cfg.data.train is None:
        raise ConfigError("data.train is not set; give preference data (prompt/chosen/rejected or chosen/rejected)")
    r = cfg.reward
    if r.center_rewards_coefficient < 0:
        raise ConfigError(f"reward.center_rewards_coefficient must be >= 0, got {r.center_rewards_coefficient}")
    if r.head_init_std is not None and r.head_init_std < 0:
        raise ConfigError(f"reward.head_init_std must be >= 0, got {r.head_init_std}")
    pairs, stats = load_preference_examples(cfg, tokenizer, "train", r.max_prompt_length)
    eval_pairs, eval_stats = load_preference_examples(cfg, tokenizer, "eval", r.max_prompt_length)
    train_batches = pair_iterator(cfg, pairs, tokenizer, train=True)
    config, mesh, coef = model.config, model.mesh, r.center_rewards_coefficient

    def loss_fn(params, batch, rng):
        return reward_sums(params, config, batch, coef)

    fresh = not heads.has_score_head(model.params)

    def init_params(params):
        return heads.add_score_head(params, config, jax.random.key(cfg.model.seed + 3), r.head_init_std, mesh)

    trainable_mask = None
    if cfg.lora.rank > 0:
        from jaxalign.peft import lora

        def trainable_mask(params):  # adapters and the whole score head
            mask = lora.trainable_mask({k: v for k, v in params.items() if k != "score"})
            return {**mask, "score": jax.tree.map(lambda _: True, params["score"])}

    evaluate_extra = None
    if eval_pairs:
        def per_pair(params, batch):
            out = reward_pair_scores(params, config, batch)
            lc, lr = response_lengths(batch)
            losses = reward_pairwise(out["chosen"], out["rejected"], batch["margin"], coef)
            return {"chosen": out["chosen"], "rejected": out["rejected"], "loss": losses,
                    "chosen_length": lc, "rejected_length": lr}

        runner = pair_runner(per_pair, mesh)

        def evaluate_extra(params):
            o = per_pair_outputs(runner, params, pair_iterator(cfg, eval_pairs, tokenizer, train=False), mesh,
                                 len(eval_pairs))
            rc, rr = o["chosen"], o["rejected"]
            return {"loss": float(np.mean(o["loss"])), "accuracy": float(np.mean(rc > rr)),
                    "margin": float(np.mean(rc - rr)), "chosen": float(np.mean(rc)), "rejected": float(np.mean(rr)),
                    **length_bias(rc, rr, o["chosen_length"], o["rejected_length"])}

    summary: dict[str, Any] = {
        "train data": {**stats.as_dict(), "left_out_per_epoch": train_batches.left_out_per_epoch},
        "batch shapes (local pairs, T)": train_batches.shapes,
        "score head": ("new, N(0, %.4g)" % (r.head_init_std if r.head_init_std is not None
                                           else heads.default_head_std(config))) if fresh else "from the checkpoint",
    }
    if eval_stats is not None:
        summary["eval data"] = eval_stats.as_dict()
    return Objective(loss_fn=loss_fn, train_batches=train_batches, evaluate_extra=evaluate_extra, summary=summary,
                     init_params=init_params, trainable_mask=trainable_mask)
