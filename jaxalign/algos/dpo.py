"""Direct preference optimization (`algorithm: dpo`) and its family (IPO, hinge/SLiC, robust,
cDPO via label smoothing, SimPO, ORPO, ...): `ja.losses.dpo` on sequence log-probs.

ORPO (`dpo.loss_type: orpo`, Hong et al. 2024) is a member of the family rather than an
algorithm of its own: the same pairs, batches and single forward pass, reference-free, on
length-averaged log-probs; its loss is the chosen reply's NLL per token plus
`-beta log sigmoid(log odds ratio)` (`beta` is the paper's lambda, as in TRL's ORPOConfig),
and it logs TRL's `log_odds_ratio` (mean log σ of it) and `log_odds_chosen` (the mean log odds
ratio) next to `nll_loss` and the rewards (β × average log-prob).

Sequence log-probs: chosen and rejected go through ONE forward pass (concatenated along
the batch, `[2B, T]`); each response's log-prob is the sum over its tokens of the chunked
label log-probs (`jaxalign.algos.logprobs.token_logprobs`: `[B, T, V]` f32 logits never
exist at once), length-averaged for `ipo` / `simpo` / `orpo` as TRL does
(`ja.losses.LENGTH_NORMALIZED_LOSS_TYPES`). Pair batches carry each side's scored positions
(`score_at` `[B, K]`, K ~ the longest response, not T), so the LM head and log-softmax run
on the response tokens only (`token_logprobs_at`), as TRL's fused LM head does.

Reference log-probs (`cfg.dpo.reference`):
  adapters_off  LoRA on: the same params with adapters switched off (`lora.disable`);
                no extra weights (a second forward pass per step, without gradients).
  frozen_copy   no LoRA: a frozen copy of the initial params, trained alongside as a
                non-trainable tree (params = {"policy", "reference"}): ONE extra copy of
                the weights in device memory (no optimizer state for it).
  precomputed   a pass of the initial model over the train and eval pairs before training
                stores each pair's `ref_chosen_logps` / `ref_rejected_logps` with it; no
                reference weights or forward passes during training.
  auto          none for reference-free types (simpo, orpo), adapters_off under LoRA, else frozen_copy.

Metrics (TRL's names, as (sum, count) over pairs): rewards/chosen, rewards/rejected
(β·(π − ref), SimPO: β·π), rewards/accuracies (chosen reward > rejected), rewards/margins,
logps/chosen, logps/rejected (the log-probs given to the loss). Eval (host-side, one pass):
the same plus loss and length bias of the implicit reward (`length_correlation`,
`accuracy_chosen_shorter`, `accuracy_chosen_longer`, `frac_chosen_shorter`).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos.logprobs import shifted_targets_mask, token_logprobs, token_logprobs_at
from jaxalign.algos.pairs import (SIDES, check_batch_size, concat_sides, length_bias, load_preference_examples,
                                   masked_sums, pair_iterator, pair_runner, per_pair_outputs)
from jaxalign.data.batching import SCORE_AT
from jaxalign.errors import ConfigError, DataError
from jaxalign.peft import lora

log = logging.getLogger(__name__)

REFERENCES = ("adapters_off", "frozen_copy", "precomputed", "none")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
ORPO_METRICS = ("log_odds_ratio", "log_odds_chosen")


def sequence_logps(params, config, batch: dict, chunk_size: int | None = None):
    """Summed response log-probs and response lengths of a batch of sequences.

    batch: `input_ids`, `positions`, `segment_ids`, `loss_mask` `[N, T]` (loss_mask marks
    the response tokens), optionally `score_at` `[N, K]` (the batch builders' prediction
    positions of those tokens, -1 = none): then the LM head runs on those K positions only.
    Returns `(logps [N] f32, lengths [N] f32)`.
    """
    if SCORE_AT in batch:
        logp, _, _ = token_logprobs_at(params, config, batch, batch[SCORE_AT], chunk_size=chunk_size)
        m = batch[SCORE_AT] >= 0
    else:
        logp, _, _ = token_logprobs(params, config, batch, chunk_size=chunk_size)
        m = shifted_targets_mask(batch["loss_mask"], batch["segment_ids"])
    return jnp.sum(jnp.where(m, logp, 0.0), axis=1), jnp.sum(m, axis=1).astype(jnp.float32)


def per_token_nll(logps, lengths):
    """Negative log-likelihood per response token `[N]` from `sequence_logps`' sums and lengths
    (0 for an empty response): the NLL term of RPO, ORPO and KTO's `nll_alpha`."""
    return -logps / jnp.maximum(lengths, 1.0)


def pair_logps(params, config, batch: dict, chunk_size: int | None = None, sides: tuple[str, str] = SIDES):
    """`(chosen_logps [B], rejected_logps [B], chosen_lengths [B], rejected_lengths [B])` of a
    preference batch (or of two other `sides`), from one forward pass over both concatenated."""
    logps, lengths = sequence_logps(params, config, concat_sides(batch, sides), chunk_size)
    b = batch[f"{sides[0]}_input_ids"].shape[0]
    return logps[:b], logps[b:], lengths[:b], lengths[b:]


def resolve_reference(cfg, has_lora: bool) -> str:
    """The reference source actually used (one of `REFERENCES`), per `cfg.dpo` and LoRA."""
    from jaxalign.algos.preference_losses import REFERENCE_FREE_LOSS_TYPES

    d = cfg.dpo
    ref = d.reference
    if d.precompute_ref_logps:
        if ref not in ("auto", "precomputed"):
            raise ConfigError(f"dpo.precompute_ref_logps=true conflicts with dpo.reference={ref!r}; set one of them")
        ref = "precomputed"
    if d.loss_type in REFERENCE_FREE_LOSS_TYPES:
        if ref not in ("auto",):
            log.warning("dpo.loss_type=%s is reference-free: dpo.reference=%s is ignored", d.loss_type, ref)
        return "none"
    return live_reference(ref, has_lora, "dpo")


def live_reference(ref: str, has_lora: bool, section: str) -> str:
    """A reference held during training: `auto` is adapters_off under LoRA, else frozen_copy;
    adapters_off without LoRA is an error naming `section`'s key."""
    if ref == "auto":
        return "adapters_off" if has_lora else "frozen_copy"
    if ref == "adapters_off" and not has_lora:
        raise ConfigError(f"{section}.reference=adapters_off needs LoRA adapters (lora.rank > 0); without LoRA use "
                          "frozen_copy (one extra copy of the weights)"
                          + (" or precomputed" if section == "dpo" else ""))
    return ref


def split_reference(params, reference: str):
    """`(policy params, reference params)` of the trained tree: adapters_off gives the same
    arrays with adapters switched off, frozen_copy the `{"policy", "reference"}` halves, other
    sources no reference params (None). Reference params are stop-gradient'ed."""
    if reference == "frozen_copy":
        return params["policy"], jax.lax.stop_gradient(params["reference"])
    if reference == "adapters_off":
        return params, jax.lax.stop_gradient(lora.disable(params))
    return params, None


def reference_hooks(reference: str, model_params) -> tuple[dict, str]:
    """`Objective` hooks for `reference` (frozen_copy: params = {"policy", "reference"}, only the
    policy trained and exported) and a line on the reference's device memory."""
    if reference == "frozen_copy":
        def init_params(params):
            return {"policy": params, "reference": _copy_tree(params)}

        def trainable_mask(params):
            return {"policy": lora.trainable(params["policy"]),
                    "reference": jax.tree.map(lambda _: False, params["reference"])}

        def export_params(params):
            return params["policy"]

        memory = f"one extra copy of the weights ({_tree_bytes(model_params) / 2**20:.1f} MiB)"
        return dict(init_params=init_params, trainable_mask=trainable_mask, export_params=export_params), memory
    return {}, {"adapters_off": "none (same arrays, adapters switched off)",
                "precomputed": "none (reference log-probs precomputed with the pairs)"}.get(reference, "none")


def dpo_pair_outputs(params, config, batch: dict, *, reference: str, d, chunk_size: int | None = None) -> dict:
    """Per-pair DPO quantities `[B]` for a preference batch.

    params: the model params (reference adapters_off / precomputed / none) or
    `{"policy", "reference"}` (frozen_copy). For precomputed, the batch carries
    `ref_chosen_logps` / `ref_rejected_logps` `[B]` (sums over response tokens). d: the
    `DPOSection`. Returns losses, chosen/rejected rewards, the log-probs given to the loss
    (length-averaged for ipo/simpo), response lengths, `valid` (non-padding rows) and
    `nll_loss`: the chosen reply's negative log-likelihood per token, which `d.rpo_alpha`
    adds to the loss (RPO, Pang et al. 2024: -alpha log p(chosen | prompt) / |chosen|). With
    `d.margin_from_scores` the batch carries `score_gap` `[B]` (the sigmoid loss's offset).
    """
    from jaxalign.algos.preference_losses import LENGTH_NORMALIZED_LOSS_TYPES, dpo, orpo_log_odds

    policy, ref_params = split_reference(params, reference)
    pc, pr, lc, lr = pair_logps(policy, config, batch, chunk_size)
    nll = per_token_nll(pc, lc)
    if reference == "none":
        rc = rr = None
    elif reference == "precomputed":
        rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        rc, rr, _, _ = pair_logps(ref_params, config, batch, chunk_size)
        rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    if d.loss_type in LENGTH_NORMALIZED_LOSS_TYPES:
        nc, nr = jnp.maximum(lc, 1.0), jnp.maximum(lr, 1.0)
        pc, pr = pc / nc, pr / nr
        if rc is not None:
            rc, rr = rc / nc, rr / nr
    margin = d.margin_from_scores * batch["score_gap"] if d.margin_from_scores else None
    losses, r_chosen, r_rejected = dpo(pc, pr, rc, rr, beta=d.beta, loss_type=d.loss_type,
                                       label_smoothing=d.label_smoothing, simpo_gamma=d.simpo_gamma,
                                       discopop_tau=d.discopop_tau, margin=margin)
    nll_weight = 1.0 if d.loss_type == "orpo" else d.rpo_alpha  # ORPO = chosen NLL + its odds-ratio term
    if nll_weight:
        losses = losses + nll_weight * nll
    valid = (lc > 0) & (lr > 0)
    out = {"loss": losses, "rewards/chosen": r_chosen, "rewards/rejected": r_rejected,
           "logps/chosen": pc, "logps/rejected": pr, "chosen_length": lc, "rejected_length": lr, "valid": valid,
           "nll_loss": nll}
    if d.loss_type == "orpo":
        log_odds = orpo_log_odds(pc, pr)
        out.update({"log_odds_ratio": jax.nn.log_sigmoid(log_odds), "log_odds_chosen": log_odds})
    return out


def dpo_sums(params, config, batch: dict, *, reference: str, d, chunk_size: int | None = None) -> dict:
    """`{name: (sum, count)}` over the valid pairs: loss and TRL's reward/logp metrics."""
    o = dpo_pair_outputs(params, config, batch, reference=reference, d=d, chunk_size=chunk_size)
    rc, rr = jax.lax.stop_gradient(o["rewards/chosen"]), jax.lax.stop_gradient(o["rewards/rejected"])
    values = {"loss": o["loss"], "rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": rc > rr,
              "rewards/margins": rc - rr, "logps/chosen": jax.lax.stop_gradient(o["logps/chosen"]),
              "logps/rejected": jax.lax.stop_gradient(o["logps/rejected"]),
              "nll_loss": jax.lax.stop_gradient(o["nll_loss"]),
              **{k: jax.lax.stop_gradient(o[k]) for k in ORPO_METRICS if k in o}}
    return masked_sums(values, o["valid"])


def _copy_tree(tree):
    """A real copy (new device buffers, same shardings) of every array in `tree`."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, tree)


def _tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def precompute_reference(cfg, params, config, mesh, datasets, tokenizer) -> None:
    """Store `ref_chosen_logps` / `ref_rejected_logps` (sums over response tokens under
    `params`) in each pair of each list in `datasets`, in place: one batched pass each, in
    dataset order."""
    chunk = cfg.train.logprob_chunk

    def fn(p, batch):
        c, r, _, _ = pair_logps(p, config, batch, chunk)
        return {"c": c, "r": r}

    runner = pair_runner(fn, mesh)
    for pairs in datasets:
        out = per_pair_outputs(runner, params, pair_iterator(cfg, pairs, tokenizer, train=False), mesh, len(pairs))
        if not (np.all(np.isfinite(out["c"])) and np.all(np.isfinite(out["r"]))):
            raise ConfigError("the reference model gives non-finite log-probs on the data; check the model checkpoint")
        for pair, c, r in zip(pairs, out["c"], out["r"]):
            pair["ref_chosen_logps"], pair["ref_rejected_logps"] = float(c), float(r)


def build(cfg, model, tokenizer):
    """The DPO objective: pairs from `cfg.data`, `cfg.dpo` loss and reference, host eval."""
    from jaxalign.train.objective import Objective

    check_batch_size(cfg, model.mesh)
    if cfg.data.train is None:
        raise ConfigError("data.train is not set; give preference data (prompt/chosen/rejected or chosen/rejected)")
    d = cfg.dpo
    if d.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0, got {d.beta}")
    if d.loss_type == "orpo" and d.rpo_alpha:
        raise ConfigError("dpo.rpo_alpha adds the chosen NLL that dpo.loss_type=orpo already has (weight 1); "
                          "set dpo.rpo_alpha=0")
    from jaxalign.algos.preference_losses import dpo

    try:  # validates loss_type / label_smoothing eagerly, with a clear message
        zero = jnp.zeros((1,), jnp.float32)
        dpo(zero, zero, zero, zero, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
            simpo_gamma=d.simpo_gamma, discopop_tau=d.discopop_tau)
    except ValueError as e:
        raise ConfigError(f"{e} (see the dpo section of the config)") from None
    has_lora = lora.has_lora(model.params)
    reference = resolve_reference(cfg, has_lora)
    config, mesh, chunk = model.config, model.mesh, cfg.train.logprob_chunk

    pairs, stats = load_preference_examples(cfg, tokenizer, "train", d.max_prompt_length)
    eval_pairs, eval_stats = load_preference_examples(cfg, tokenizer, "eval", d.max_prompt_length)
    extra_keys: tuple[str, ...] = ()
    if d.margin_from_scores:
        for which, ps in (("train", pairs), ("eval", eval_pairs or [])):
            missing = sum("score_gap" not in p for p in ps)
            if missing:
                raise DataError(f"dpo.margin_from_scores needs score_chosen and score_rejected on every pair; "
                                f"{missing} of {len(ps)} data.{which} pairs have none (map yours with data.columns)")
        extra_keys = ("score_gap",)
    if reference == "precomputed":
        precompute_reference(cfg, model.params, config, mesh, [p for p in (pairs, eval_pairs) if p], tokenizer)
        extra_keys += REF_KEYS
    train_batches = pair_iterator(cfg, pairs, tokenizer, train=True, extra_keys=extra_keys)

    def loss_fn(params, batch, rng):
        return dpo_sums(params, config, batch, reference=reference, d=d, chunk_size=chunk)

    hooks, memory = reference_hooks(reference, model.params)
    evaluate_extra = None
    if eval_pairs:
        def per_pair(params, batch):
            o = dpo_pair_outputs(params, config, batch, reference=reference, d=d, chunk_size=chunk)
            o.pop("valid")
            return o

        runner = pair_runner(per_pair, mesh)

        def evaluate_extra(params):
            o = per_pair_outputs(runner, params,
                                 pair_iterator(cfg, eval_pairs, tokenizer, train=False, extra_keys=extra_keys),
                                 mesh, len(eval_pairs))
            rc, rr = o["rewards/chosen"], o["rewards/rejected"]
            return {"loss": float(np.mean(o["loss"])), "rewards/chosen": float(np.mean(rc)),
                    "rewards/rejected": float(np.mean(rr)), "rewards/accuracies": float(np.mean(rc > rr)),
                    "rewards/margins": float(np.mean(rc - rr)), "logps/chosen": float(np.mean(o["logps/chosen"])),
                    "logps/rejected": float(np.mean(o["logps/rejected"])), "nll_loss": float(np.mean(o["nll_loss"])),
                    **{k: float(np.mean(o[k])) for k in ORPO_METRICS if k in o},
                    **length_bias(rc, rr, o["chosen_length"], o["rejected_length"])}

    summary: dict[str, Any] = {
        "train data": {**stats.as_dict(), "left_out_per_epoch": train_batches.left_out_per_epoch},
        "batch shapes (local pairs, T)": train_batches.shapes,
        "dpo": f"loss_type={d.loss_type} beta={d.beta} label_smoothing={d.label_smoothing} reference={reference}"
               + (f" margin_from_scores={d.margin_from_scores}" if d.margin_from_scores else ""),
        "reference memory": memory,
    }
    if eval_stats is not None:
        summary["eval data"] = eval_stats.as_dict()
    return Objective(loss_fn=loss_fn, train_batches=train_batches, evaluate_extra=evaluate_extra, summary=summary,
                     **hooks)
