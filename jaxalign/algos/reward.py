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

What reward models share with the DPO family, KTO and online DPO (pair data, batches,
per-pair runners) lives in `jaxalign.algos.pairs`.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos.pairs import (check_batch_size, concat_sides, length_bias, load_preference_examples, masked_sums,
                                  pair_iterator, pair_runner, per_pair_outputs, response_lengths)
from jaxalign.errors import ConfigError, DataError
from jaxalign.peft import lora

log = logging.getLogger(__name__)

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
    from jaxalign.algos.preference_losses import reward_pairwise

    out = reward_pair_scores(params, config, batch)
    rc, rr, valid = out["chosen"], out["rejected"], out["valid"]
    losses = reward_pairwise(rc, rr, batch.get("margin"), center_rewards_coefficient)
    return masked_sums({"loss": losses, "accuracy": rc > rr, "margin": rc - rr, "chosen": rc, "rejected": rr}, valid)



def margins_from_scores(pairs: list[dict], scale: float, source: str) -> None:
    """Set each pair's `margin` to `scale` x its `score_gap` (in place); a pair without scores,
    or with a margin column of its own, is a DataError naming `source`."""
    missing = sum("score_gap" not in p for p in pairs)
    if missing:
        raise DataError(f"reward.margin_from_scores needs score_chosen and score_rejected on every pair; {missing} of "
                        f"{len(pairs)} {source} pairs have none (map yours with data.columns)")
    if any(p.get("margin") for p in pairs):
        raise DataError(f"{source} has a margin column and reward.margin_from_scores is set: use one of them")
    for p in pairs:
        p["margin"] = scale * float(p["score_gap"])


def build(cfg, model, tokenizer):
    """The reward-model objective: pairs from `cfg.data`, the Bradley–Terry loss, a fresh
    score head on a causal-LM checkpoint, host-side eval with length-bias metrics."""
    from jaxalign.algos.preference_losses import reward_pairwise
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
    if r.margin_from_scores < 0:
        raise ConfigError(f"reward.margin_from_scores must be >= 0, got {r.margin_from_scores}")
    pairs, stats = load_preference_examples(cfg, tokenizer, "train", r.max_prompt_length)
    eval_pairs, eval_stats = load_preference_examples(cfg, tokenizer, "eval", r.max_prompt_length)
    if r.margin_from_scores:
        for which, ps in (("train", pairs), ("eval", eval_pairs or [])):
            margins_from_scores(ps, r.margin_from_scores, f"data.{which}")
    train_batches = pair_iterator(cfg, pairs, tokenizer, train=True)
    config, mesh, coef = model.config, model.mesh, r.center_rewards_coefficient

    def loss_fn(params, batch, rng):
        return reward_sums(params, config, batch, coef)

    fresh = not heads.has_score_head(model.params)

    def init_params(params):
        return heads.add_score_head(params, config, jax.random.key(cfg.model.seed + 3), r.head_init_std, mesh)

    trainable_mask = None
    if lora.has_lora(model.params):
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
