"""KTO (`algorithm: kto`): Kahneman-Tversky optimization on unpaired feedback (Ethayarajh et
al. 2024, arXiv:2402.01306) with TRL's KTOTrainer loss (`ja.losses.kto`).

Data: `prompt` + `completion` + `label` rows (`jaxalign.data.tokenize_unpaired`), or paired
preference rows, each split into a desirable (chosen) and an undesirable (rejected) example.

Batches (`KTOBatches`): each local batch of B examples gives `completion_*` `[B, T]` (prompt i
+ its completion; loss_mask marks the completion) and `kl_*` `[B, T]` (prompt i + the
completion of example i-1, cyclically: TRL's mismatched pairs, cut to the largest bucket),
padded to one T with the preference-pair layout (`pad_pairs`, scored positions `*_score_at`
included), plus `label` float32 `[B]` (1 = desirable). The policy scores the completions with
gradients and the KL pairs without (TRL: no_grad); the reference scores both in one forward
pass.

Reference: as DPO's (`dpo.live_reference`, `dpo.split_reference`): adapters_off under LoRA
(the same arrays, adapters switched off), else a frozen copy of the initial weights. The
reference point z0 = max(0, mean π(y'|x) - ref(y'|x)) over the batch's KL pairs
(`ja.losses.kto_reference_point`), per (micro)batch over every device, without gradient.

Metrics (TRL's names, as (sum, count)): loss, kl (z0), rewards/chosen and logps/chosen (means
over the desirable examples), rewards/rejected and logps/rejected (undesirable),
rewards/margins (their difference, for batches holding both). Eval: the same on the eval data.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos.dpo import (live_reference, pair_logps, per_token_nll, reference_hooks, sequence_logps,
                                split_reference)
from jaxalign.algos.preference_losses import kto, kto_reference_point
from jaxalign.algos.pairs import SIDES, PairBatches, check_batch_size, masked_sums, pair_iterator, side_arrays
from jaxalign.data.batching import BATCH_KEYS, SCORE_AT, bucket_for, pad_pairs, pairs_score_width
from jaxalign.errors import ConfigError, DataError
from jaxalign.peft import lora

log = logging.getLogger(__name__)

KTO_SIDES = ("completion", "kl")


class KTOBatches(PairBatches):
    """Batches of unpaired examples (`prompt_ids`, `completion_ids`, `label`) with their KL
    pairs (see the module docstring). The bucket follows the longest sequence of either side
    in the global batch, so every process gets the same T."""

    def _kl_pairs(self, rows: list[list[int]]) -> list[dict | None]:
        """Pair dicts (prompt i, completion i, completion i-1 cut to fit) of one process's rows."""
        real = [self.examples[r[0]] for r in rows if r]
        pairs: list[dict | None] = []
        for j, ex in enumerate(real):
            room = self.seq_len - len(ex["prompt_ids"])
            pairs.append({"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["completion_ids"],
                          "rejected_ids": real[j - 1]["completion_ids"][:room]})
        return pairs + [None] * (len(rows) - len(real))

    def _materialize(self, batch):
        n = self.local_batch_size
        slices = [self._kl_pairs(batch[i: i + n]) for i in range(0, len(batch), n)]
        every = [p for s in slices for p in s if p is not None]
        length = bucket_for(max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                                for p in every), self.buckets)
        padded = pad_pairs(slices[self.process_index], length, self.pad_id, pairs_score_width(every, length))
        out = {f"{side}_{k}": padded[f"{pair_side}_{k}"] for side, pair_side in zip(KTO_SIDES, SIDES)
               for k in (*BATCH_KEYS, SCORE_AT)}
        local = batch[self.process_index * n: (self.process_index + 1) * n]
        out["label"] = np.array([float(self.examples[r[0]]["label"]) if r else 0.0 for r in local], np.float32)
        self.seen_shapes.add(out["completion_input_ids"].shape)
        return out


def kto_outputs(params, config, batch: dict, *, reference: str, k, chunk_size: int | None = None) -> dict:
    """Per-example KTO quantities `[B]` of a KTO batch: `loss` (weighted, + `k.nll_alpha` x the
    NLL of desirable examples), `rewards` (β·(π - ref)), `logps` (π, summed over the
    completion), `nll` (-π per completion token), `valid` (non-padding rows), and `kl` (z0, scalar).

    params: the model params (adapters_off) or `{"policy", "reference"}` (frozen_copy); k: the
    `KTOSection`.
    """
    policy, ref_params = split_reference(params, reference)
    completions = side_arrays(batch, "completion")
    logps, lengths = sequence_logps(policy, config, completions, chunk_size)
    valid = lengths > 0
    if k.loss_type == "apo_zero_unpaired":  # no reference point: the KL pairs are not scored
        ref_logps, _ = sequence_logps(jax.lax.stop_gradient(ref_params), config, completions, chunk_size)
        z0 = jnp.zeros((), jnp.float32)
    else:
        kl_logps, _ = sequence_logps(jax.lax.stop_gradient(policy), config, side_arrays(batch, "kl"), chunk_size)
        ref_logps, ref_kl_logps, _, _ = pair_logps(ref_params, config, batch, chunk_size, KTO_SIDES)
        z0 = kto_reference_point(kl_logps, ref_kl_logps, valid)
    good = batch["label"] > 0.5
    losses, rewards = kto(logps, jax.lax.stop_gradient(ref_logps), good, z0, beta=k.beta,
                          desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
                          loss_type=k.loss_type)
    nll = per_token_nll(logps, lengths)
    if k.nll_alpha:
        losses = losses + k.nll_alpha * jnp.where(good, nll, 0.0)
    return {"loss": losses, "rewards": rewards, "logps": logps, "valid": valid, "kl": z0, "nll": nll}


def kto_sums(params, config, batch: dict, *, reference: str, k, chunk_size: int | None = None) -> dict:
    """`{name: (sum, count)}`: the loss over the valid examples and TRL's KTO metrics."""
    o = kto_outputs(params, config, batch, reference=reference, k=k, chunk_size=chunk_size)
    good = batch["label"] > 0.5
    rewards, logps = jax.lax.stop_gradient(o["rewards"]), jax.lax.stop_gradient(o["logps"])
    sums = masked_sums({"loss": o["loss"]}, o["valid"])
    sums.update(masked_sums({"rewards/chosen": rewards, "logps/chosen": logps,
                             "nll_loss": jax.lax.stop_gradient(o["nll"])}, o["valid"] & good))
    sums.update(masked_sums({"rewards/rejected": rewards, "logps/rejected": logps}, o["valid"] & ~good))
    (rc, nc), (rr, nr) = sums["rewards/chosen"], sums["rewards/rejected"]
    both = (nc > 0) & (nr > 0)
    margin = rc / jnp.maximum(nc, 1.0) - rr / jnp.maximum(nr, 1.0)
    sums["rewards/margins"] = (jnp.where(both, margin, 0.0), both.astype(jnp.float32))
    sums["kl"] = (o["kl"], jnp.ones((), jnp.float32))
    return sums


def load_unpaired_examples(cfg, tokenizer, which: str):
    """`(examples, DataStats)` of the train or eval (`which`) data per `cfg.data` for KTO
    (`(None, None)` when that split is not configured); see `tokenize_unpaired`."""
    from jaxalign.data import configured_rows, tokenize_unpaired

    d = cfg.data
    rows = configured_rows(d, which)
    if rows is None:
        return None, None
    examples, stats = tokenize_unpaired(rows, tokenizer, max_length=d.max_length,
                                        max_prompt_length=cfg.kto.max_prompt_length, truncation=d.truncation,
                                        on_bad_row=d.on_bad_row, columns=d.columns, system_prompt=d.system_prompt,
                                        min_score_gap=d.min_score_gap)
    source = d.train if which == "train" else d.eval
    if stats.dropped:
        log.warning("%s data %s: dropped %d of %d rows %s", which, source, stats.dropped, stats.rows,
                    stats.drop_reasons)
    if not examples:
        raise DataError(f"no usable KTO examples in {source}: every row was dropped ({stats.rows} rows; "
                        f"{stats.drops()}); fix the rows, or check data.max_length")
    return examples, stats


def check_kto_config(cfg) -> None:
    """ConfigError for KTO settings that cannot train."""
    k = cfg.kto
    if k.beta <= 0:
        raise ConfigError(f"kto.beta must be > 0, got {k.beta}")
    if k.nll_alpha < 0:
        raise ConfigError(f"kto.nll_alpha must be >= 0, got {k.nll_alpha}")
    if min(k.desirable_weight, k.undesirable_weight) < 0 or not (k.desirable_weight or k.undesirable_weight):
        raise ConfigError(f"kto.desirable_weight={k.desirable_weight} and kto.undesirable_weight="
                          f"{k.undesirable_weight} must be >= 0 and not both 0")
    if k.loss_type == "kto" and cfg.train.batch_size // jax.process_count() < 2:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} gives fewer than 2 examples per process: KTO's "
                          "reference point pairs each prompt with another example's completion; use at least 2")


def build(cfg, model, tokenizer):
    """The KTO objective: unpaired examples from `cfg.data`, `cfg.kto` loss and reference."""
    from jaxalign.train.objective import Objective

    check_batch_size(cfg, model.mesh)
    if cfg.data.train is None:
        raise ConfigError("data.train is not set; give unpaired feedback (prompt/completion/label) or preference pairs")
    check_kto_config(cfg)
    k = cfg.kto
    reference = live_reference(k.reference, lora.has_lora(model.params), "kto")
    config, chunk = model.config, cfg.train.logprob_chunk
    examples, stats = load_unpaired_examples(cfg, tokenizer, "train")
    eval_examples, eval_stats = load_unpaired_examples(cfg, tokenizer, "eval")
    train_batches = pair_iterator(cfg, examples, tokenizer, train=True, iterator=KTOBatches)

    def loss_fn(params, batch, rng):
        return kto_sums(params, config, batch, reference=reference, k=k, chunk_size=chunk)

    eval_batches = None
    if eval_examples:
        def eval_batches():
            return pair_iterator(cfg, eval_examples, tokenizer, train=False, iterator=KTOBatches)

    n_good = sum(e["label"] for e in examples)
    n_bad = len(examples) - n_good
    balance = (k.desirable_weight * n_good) / max(k.undesirable_weight * n_bad, 1e-9)
    if n_good and n_bad and not 1.0 <= balance <= 4 / 3:
        log.warning("kto: desirable_weight x %d desirable / (undesirable_weight x %d undesirable) = %.2f; the KTO "
                    "paper (and TRL) suggest weights that put it in [1, 4/3]", n_good, n_bad, balance)
    hooks, memory = reference_hooks(reference, model.params)
    summary: dict[str, Any] = {
        "train data": {**stats.as_dict(), "desirable": n_good, "undesirable": n_bad,
                       "left_out_per_epoch": train_batches.left_out_per_epoch},
        "batch shapes (local examples, T)": train_batches.shapes,
        "kto": f"loss_type={k.loss_type} beta={k.beta} nll_alpha={k.nll_alpha} "
               f"desirable_weight={k.desirable_weight} undesirable_weight={k.undesirable_weight} reference={reference}",
        "reference memory": memory,
    }
    if eval_stats is not None:
        summary["eval data"] = eval_stats.as_dict()
    return Objective(loss_fn=loss_fn, train_batches=train_batches, eval_batches=eval_batches, summary=summary,
                     **hooks)
