"""Online DPO (`algorithm: online_dpo`; Guo et al. 2024, TRL's OnlineDPOTrainer): DPO on
pairs the current policy samples, ranked by a judge, one optimizer step per sample.

Each loop step `k` (`Objective.sample_batch`, called with the current params):

    prompts          -> sample x 2        -> judge                 -> pairs             -> reference    -> DPO step
    train.batch_size    KV-cache sampler,    reward model, reward     higher score =       log-probs of    `dpo_sums`,
    of data.train       fold_in(seed, k)     functions or a judge     chosen; equal        both samples    any loss_type
    (`rollout_prompts`) (`rollout.sample`)   model (`judge_scores`)   scores: dropped

The prompts, sampling and reward come from the RL pieces (`rollout`, `rl_loop`): the `ppo`
section's rollout keys (max_prompt_length, response_length, temperature, top_k, top_p,
reward_model / reward_adapter / reward_fn, missing_eos_penalty, eval_temperature). The loss is the
`dpo` section's, with the reference DPO resolves (`dpo.resolve_reference`), held as DPO holds
it (`dpo.reference_hooks`, `dpo.split_reference`). The reference's log-probs are computed once
per sample, with the experience (the reference does not change), and handed to the loss as
DPO's precomputed ones. A pair whose two scores are equal says nothing: its rows get no loss
(zero loss mask) and it is counted in `judge/tie_fraction`.

Resume: step `k`'s prompts and sampling key depend only on the seed and `k`, so the iterator
state is `rl_loop.RolloutBatches`' (one optimizer step per rollout) and a resumed run repeats
the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos import rlaif
from jaxalign.algos.advantages import FixedKLController
from jaxalign.algos.constitutional import read_text_arg
from jaxalign.algos.dpo import dpo_sums, reference_hooks, resolve_reference, split_reference
from jaxalign.algos.preference_losses import dpo as dpo_loss
from jaxalign.algos.ppo import check_rollout, load_reward, load_rl_prompts, rollout_metric
from jaxalign.algos.rl_loop import RolloutBatches, UpdateSchedule, rollout_prompts
from jaxalign.algos.rollout import (Prompts, RewardFunctions, RolloutSettings, decode_responses, experience_forward,
                                    process_sum, prompt_batch, sample, score, to_global, to_local)
from jaxalign.config import PPOSection, builtin_path
from jaxalign.data.batching import SCORE_AT, score_positions
from jaxalign.errors import ConfigError, DataError
from jaxalign.models.config import ModelConfig
from jaxalign.peft import lora
from jaxalign.sampling import pad_token_id, stop_token_ids
from jaxalign.train.objective import Objective, check_batch_size

log = logging.getLogger(__name__)

# ppo keys of PPO / GRPO / RLOO that online DPO does not read (setting one is an error).
UNUSED_PPO_KEYS = ("value_model", "group_size", "num_minibatches", "ppo_epochs", "kl_coef", "kl_estimator",
                   "adaptive_kl", "target_kl", "kl_horizon", "beta", "cliprange", "epsilon_high", "loss_type",
                   "cliprange_value", "vf_coef", "gamma", "lam", "whiten_scores", "whiten_rewards",
                   "whiten_advantages", "scale_rewards", "drop_uniform_groups", "eval_reward_fn", "kl_in",
                   "overlong_cache", "overlong_penalty_factor")

# metrics.jsonl names of the per-sample statistics (TRL's OnlineDPOTrainer names where it has them).
METRICS = {"scores": "objective/scores", "scores_margin": "objective/scores_margin",
           "rlhf_reward": "objective/rlhf_reward", "eos_fraction": "val/contain_eos_token",
           "tie_fraction": "judge/tie_fraction", "preference": "judge/preference",
           "position_consistent": "judge/position_consistent"}


def metric_name(stat: str) -> str:
    """The metrics.jsonl name of per-sample statistic `stat`."""
    return METRICS.get(stat) or rollout_metric(stat)


def stat_names(model_judge: bool, live_reference: bool, reward_names: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Per-sample statistics (means over all processes): scores (after the missing-EOS penalty)
    and scores_margin (chosen - rejected, ties included, as TRL) for scoring judges; the judge
    model's preference (P(chosen better)) and position consistency; tie_fraction (pairs
    dropped); kl (per-sequence sum of log pi - log ref), non_score_reward (-beta kl) and
    rlhf_reward (score + non_score_reward) with a reference; response length, EOS fraction,
    times, index; `rewards/<name>` per reward function."""
    names = ["preference", "position_consistent"] if model_judge else ["scores", "scores_margin"]
    names += ["tie_fraction", "response_length", "eos_fraction"]
    if live_reference:
        names += ["kl", "non_score_reward"] + ([] if model_judge else ["rlhf_reward"])
    names += ["time_rollout_s", "time_train_s", "index"]
    return tuple(names) + tuple(f"rewards/{name}" for name in reward_names)


# ---------------------------------------------------------------------------- pairs


def pairs_from_scores(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows `2i`, `2i + 1` are prompt `i`'s two samples: (chosen `[b]`, rejected `[b]` row
    indices, kept `[b]` bool). Chosen is the higher-scored sample; equal scores are not kept."""
    s = np.asarray(scores).reshape(-1, 2)
    second = s[:, 1] > s[:, 0]
    base = 2 * np.arange(len(s))
    return base + second, base + 1 - second, s[:, 0] != s[:, 1]


def pair_rows(batch: dict[str, np.ndarray], chosen: np.ndarray, rejected: np.ndarray, kept: np.ndarray,
              prompt_length: int) -> dict[str, np.ndarray]:
    """DPO's `chosen_*` / `rejected_*` arrays `[b, P + N]` (input_ids, attention_mask,
    loss_mask = the response tokens, positions, segment_ids) and `*_score_at` `[b, N]` (the
    prediction positions of the response tokens, `score_positions`; N is fixed, so every step
    has one shape) of a `rollout.sample` batch's rows; a pair that is not `kept` gets an
    all-zero loss mask (no loss, not counted)."""
    mask = batch["attention_mask"]
    loss = np.zeros_like(mask)
    loss[:, prompt_length:] = batch["response_mask"]
    per_row = {"input_ids": batch["input_ids"], "attention_mask": mask, "loss_mask": loss,
               "positions": np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32), "segment_ids": mask}
    out = {}
    for side, idx in (("chosen", chosen), ("rejected", rejected)):
        for key, v in per_row.items():
            out[f"{side}_{key}"] = v[idx]
        out[f"{side}_loss_mask"] = out[f"{side}_loss_mask"] * kept[:, None].astype(np.int32)
        out[f"{side}_{SCORE_AT}"] = score_positions(out[f"{side}_loss_mask"], out[f"{side}_segment_ids"],
                                                    batch["response_mask"].shape[1])
    return out


# ---------------------------------------------------------------------------- the judge


def judge_scores(judge, batch: dict[str, np.ndarray], texts: list[str], tokenizer, prompt_length: int,
                 seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """(scores `[2b]`, statistics) of the local rows of a `rollout.sample` batch whose rows
    `2i`, `2i + 1` answer the same prompt. A reward model or `RewardFunctions` scores each
    completion (`rollout.score`; statistics: each function's mean); an `rlaif.Judge` compares
    each pair in both orders and gives the first P(first better), the second 1 - P
    (statistics: `preference`, P(chosen better), and `position_consistent`); principles are
    drawn with `seed`; identical completions tie (0.5 each)."""
    if not isinstance(judge, rlaif.Judge):
        raw, _, parts = score(batch, texts, judge, tokenizer, prompt_length)
        return raw, {f"rewards/{name}": float(np.mean(v)) for name, v in parts.items()}
    completions = decode_responses(tokenizer, batch, prompt_length)
    principles = judge.constitution.draw(len(texts) // 2, seed=seed, name=judge.settings.principle)
    r = judge.compare(texts[0::2], completions[0::2], completions[1::2], [p.judge_text for p in principles])
    same = np.asarray([a == b for a, b in zip(completions[0::2], completions[1::2])])
    p = np.where(same, 0.5, r["p"]).astype(np.float32)  # identical responses: a tie, whatever the rounding
    return np.stack([p, 1 - p], axis=1).reshape(-1), {"preference": float(np.mean(np.maximum(p, 1 - p))),
                                                      "position_consistent": float(np.mean(r["consistent"]))}


def load_judge(cfg, model, tokenizer, local_pairs: int):
    """The configured judge (one source, see `_check`): an `rlaif.Judge` (`online_dpo.judge`),
    else `ppo.load_reward`'s reward model or reward functions."""
    o, p = cfg.online_dpo, cfg.ppo
    if not o.judge:
        if p.reward_adapter and not lora.has_lora(model.params):
            raise ConfigError("ppo.reward_adapter (a LoRA adapter of the policy's base) needs lora.rank > 0")
        reward_model, reward_fn = load_reward(cfg, model, tokenizer)
        return reward_model if reward_model is not None else reward_fn
    from jaxalign.data import load_tokenizer
    from jaxalign.models import load_model

    settings = rlaif.JudgeSettings(template=read_text_arg(o.judge_template),
                                   chat="auto" if o.judge_chat is None else o.judge_chat,
                                   batch_size=local_pairs, principle=o.principle, seed=cfg.train.seed)
    path = builtin_path(o.judge)
    judge = rlaif.Judge(load_model(path, dtype=cfg.model.dtype, mesh=model.mesh), load_tokenizer(path), settings,
                        o.constitution)
    if o.principle is not None:
        judge.constitution.principle(o.principle)  # an unknown name fails here, not at the first step
    return judge


# ---------------------------------------------------------------------------- one sample


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """What `collect` needs besides params: the rollout settings, prompts per step (all
    processes), the seed, the missing-EOS penalty, the reference source (`dpo.REFERENCES`),
    whether the loss reads score gaps (`dpo.margin_from_scores`), the log-prob chunk."""

    rollout: RolloutSettings
    prompts_per_step: int
    seed: int
    reference: str
    missing_eos_penalty: float = 0.0
    score_gap: bool = False
    chunk_size: int | None = None


def collect(params, k: int, beta: float, *, prompts: Prompts, judge, config: ModelConfig, tokenizer, mesh,
            s: SampleSettings) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Step `k`'s pairs from `params` (the trained tree): (rows: this process's `chosen_*` /
    `rejected_*` arrays, `ref_chosen_logps` / `ref_rejected_logps` `[b]` (sums over the
    response), `score_gap` `[b]` when the loss reads it; stats: see `stat_names`)."""
    r = s.rollout
    policy, reference = split_reference(params, s.reference)
    ids, mask, texts = prompt_batch(prompts, rollout_prompts(k, len(prompts), s.prompts_per_step, s.seed), 2, r)
    batch = sample(policy, config, ids, mask, jax.random.fold_in(jax.random.key(s.seed), k), r, mesh)
    raw, judged = judge_scores(judge, batch, texts, tokenizer, r.prompt_length, s.seed * 1_000_003 + k)
    scores = raw - s.missing_eos_penalty * (1 - batch["eos"])
    g = functools.partial(to_global, mesh=mesh)
    logp, _, ref_logp, _ = experience_forward(policy, reference, None, g(batch["input_ids"]),
                                              g(batch["attention_mask"]), config=config, value_config=None,
                                              prompt_length=r.prompt_length, temperature=1.0,
                                              chunk_size=s.chunk_size)
    m = batch["response_mask"].astype(np.float32)
    seq_logp, seq_ref = (to_local(logp) * m).sum(1), (to_local(ref_logp) * m).sum(1)
    chosen, rejected, kept = pairs_from_scores(scores)
    rows = pair_rows(batch, chosen, rejected, kept, r.prompt_length)
    rows.update(ref_chosen_logps=seq_ref[chosen], ref_rejected_logps=seq_ref[rejected])
    if s.score_gap:
        rows["score_gap"] = (scores[chosen] - scores[rejected]).astype(np.float32)
    kl = seq_logp - seq_ref
    local = {"scores": scores.mean(), "scores_margin": (scores[chosen] - scores[rejected]).mean(),
             "tie_fraction": 1.0 - kept.mean(), "response_length": m.sum(1).mean(), "eos_fraction": batch["eos"].mean(),
             "kl": kl.mean(), "rlhf_reward": (scores - beta * kl).mean(), **judged}
    stats = dict(zip(local, process_sum(list(local.values())) / jax.process_count()))  # one all-gather
    stats["non_score_reward"] = -beta * stats["kl"]
    return rows, {key: float(v) for key, v in stats.items()}


# ---------------------------------------------------------------------------- eval


def win_rate(params, *, prompts: Prompts, judge, config: ModelConfig, tokenizer, mesh, s: SampleSettings,
             rows: int, greedy: bool, cache: dict) -> dict[str, float]:
    """The judge on the policy's vs the reference's response to each eval prompt (greedy, or
    sampled at `s.rollout.temperature` with key `seed`): `win_rate` (policy preferred; ties
    count half), `tie_fraction`, and for scoring judges the mean `score` of the policy's and
    the `reference_score` of the reference's responses. The reference's responses are sampled
    once (`cache`). `rows` prompts per process and batch."""
    policy, reference = split_reference(params, s.reference)
    r, n, pi, pc = s.rollout, len(prompts), jax.process_index(), jax.process_count()
    key = jax.random.key(s.seed)
    totals = np.zeros(5)
    for j, base in enumerate(range(0, n, rows * pc)):  # every process runs the same number of batches
        lo = base + pi * rows
        idx = list(range(lo, min(lo + rows, n)))
        real = len(idx)
        idx += [0] * (rows - real)  # fixed shape: filler rows, dropped
        ids, mask, texts = prompt_batch(prompts, idx, 1, r)
        mine = sample(policy, config, ids, mask, key, r, mesh, greedy=greedy)
        if j not in cache:
            cache[j] = sample(reference, config, ids, mask, key, r, mesh, greedy=greedy)
        both = {name: np.stack([mine[name], cache[j][name]], axis=1).reshape(-1, *mine[name].shape[1:])
                for name in mine}
        scores = judge_scores(judge, both, [t for t in texts for _ in range(2)], tokenizer, r.prompt_length,
                              s.seed + j)[0].reshape(-1, 2)[:real]
        totals += [(scores[:, 0] > scores[:, 1]).sum(), (scores[:, 0] == scores[:, 1]).sum(), scores[:, 0].sum(),
                   scores[:, 1].sum(), mine["response_mask"][:real].sum()]
    totals = process_sum(totals) / n
    out = {"win_rate": totals[0] + totals[1] / 2, "tie_fraction": totals[1], "response_length": totals[4]}
    if not isinstance(judge, rlaif.Judge):
        out.update(score=totals[2], reference_score=totals[3])
    return {k: float(v) for k, v in out.items()}


# ---------------------------------------------------------------------------- build


def _check(cfg, model, tokenizer) -> None:
    """ConfigError for settings online DPO cannot use (see the module docstring)."""
    p, d, t = cfg.ppo, cfg.dpo, cfg.train
    check_rollout(cfg, model, tokenizer)
    check_batch_size(t, model.mesh, " (prompts; each is sampled twice)")
    defaults = PPOSection()
    unused = [f"ppo.{k}" for k in UNUSED_PPO_KEYS if getattr(p, k) != getattr(defaults, k)]
    if unused:
        raise ConfigError(f"online_dpo does not use {', '.join(unused)} (settings of PPO/GRPO/RLOO): it "
                          "samples 2 completions per prompt and takes one DPO step (dpo.*) per sample; remove them")
    if p.reward_weights is not None and not p.reward_fn:
        raise ConfigError("ppo.reward_weights weighs the ppo.reward_fn list: set ppo.reward_fn or drop the weights")
    if d.precompute_ref_logps or d.reference == "precomputed":
        raise ConfigError("dpo.reference=precomputed cannot work online: the pairs are sampled during training; "
                          "use auto, adapters_off (LoRA) or frozen_copy")
    if d.max_prompt_length is not None:
        raise ConfigError("online_dpo cuts prompts to ppo.max_prompt_length; remove dpo.max_prompt_length")
    if d.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0, got {d.beta}")
    if d.loss_type == "orpo" and d.rpo_alpha:
        raise ConfigError("dpo.rpo_alpha adds the chosen NLL that dpo.loss_type=orpo already has; set dpo.rpo_alpha=0")
    try:  # loss_type / label_smoothing, with the loss's own message
        zero = jnp.zeros((1,), jnp.float32)
        dpo_loss(zero, zero, zero, zero, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                 simpo_gamma=d.simpo_gamma, discopop_tau=d.discopop_tau)
    except ValueError as e:
        raise ConfigError(f"{e} (see the dpo section of the config)") from None
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: online_dpo needs prompts (rows with a 'prompt' field)")
    sources = [f"ppo.{k}" for k in ("reward_model", "reward_adapter", "reward_fn") if getattr(p, k)]
    judge = cfg.online_dpo.judge
    sources += ["online_dpo.judge"] if judge else []
    if len(sources) != 1:
        raise ConfigError(f"online_dpo ranks each pair of samples with one judge: set exactly one of "
                          f"online_dpo.judge (a judge model), ppo.reward_model, ppo.reward_adapter or ppo.reward_fn "
                          f"(got {', '.join(sources) or 'none'})")
    if judge and not os.path.exists(builtin_path(judge)):
        raise ConfigError(f"online_dpo.judge={judge!r} does not exist; give a judge model (an HF checkpoint "
                          "directory with its tokenizer, a .gguf file or example:NAME)")


def build(cfg, model, tokenizer) -> Objective:
    """The online DPO objective: the judge, prompts and settings read once, `collect` behind
    `sample_batch`, DPO's loss on each sample's pairs and, with `data.eval`, the judge's win
    rate of the policy over the reference."""
    p, d, t, mesh = cfg.ppo, cfg.dpo, cfg.train, model.mesh
    _check(cfg, model, tokenizer)
    prompts, eval_prompts = load_rl_prompts(cfg, tokenizer)
    if len(prompts) < t.batch_size:
        raise DataError(f"{len(prompts)} prompts are fewer than one step samples (train.batch_size={t.batch_size})")
    local = t.batch_size // jax.process_count()
    judge = load_judge(cfg, model, tokenizer, local)
    reference = resolve_reference(cfg, lora.has_lora(model.params))
    stop = stop_token_ids(model.config, tokenizer)
    rollout = RolloutSettings(prompt_length=p.max_prompt_length, response_length=p.response_length,
                              temperature=float(p.temperature), top_k=p.top_k, top_p=float(p.top_p),
                              eos_token_ids=stop, pad_token_id=pad_token_id(model.config, tokenizer, stop))
    settings = SampleSettings(rollout=rollout, prompts_per_step=t.batch_size, seed=t.seed, reference=reference,
                              missing_eos_penalty=p.missing_eos_penalty or 0.0, score_gap=bool(d.margin_from_scores),
                              chunk_size=t.logprob_chunk)
    model_judge = isinstance(judge, rlaif.Judge)
    names = stat_names(model_judge, reference != "none",
                       tuple(judge.fns) if isinstance(judge, RewardFunctions) else ())
    batches = RolloutBatches(
        functools.partial(collect, prompts=prompts, judge=judge, config=model.config, tokenizer=tokenizer,
                          mesh=mesh, s=settings),
        UpdateSchedule(rows=local, minibatch_rows=local, epochs=1, num_minibatches=1, seed=t.seed,
                       rollout_size=t.batch_size),
        FixedKLController(d.beta), names, len(prompts))
    loss_reference = "none" if reference == "none" else "precomputed"  # computed with the pairs (`collect`)
    config, chunk = model.config, t.logprob_chunk

    def loss_fn(params, batch, rng):
        policy, _ = split_reference(params, reference)
        out = dpo_sums(policy, config, batch, reference=loss_reference, d=d, chunk_size=chunk)
        stats = batch["rollout_stats"]
        n = jnp.asarray(stats.shape[0], jnp.float32)
        out.update({metric_name(name): (jnp.sum(stats[:, i]), n) for i, name in enumerate(names)})
        return out

    evaluate_extra = None
    if eval_prompts is not None and reference != "none":
        eval_settings = dataclasses.replace(settings, rollout=dataclasses.replace(
            rollout, temperature=float(p.eval_temperature or 1.0)))
        evaluate_extra = functools.partial(win_rate, prompts=eval_prompts, judge=judge, config=config,
                                           tokenizer=tokenizer, mesh=mesh, s=eval_settings, rows=2 * local,
                                           greedy=p.eval_temperature == 0, cache={})
    elif eval_prompts is not None:
        log.warning("data.eval: the judge's win rate compares the policy with the reference, and dpo.loss_type=%s "
                    "has none; no eval", d.loss_type)
    hooks, memory = reference_hooks(reference, model.params)
    summary = {"prompts": prompts.stats.as_dict(),
               "online_dpo": f"{t.batch_size} prompts x 2 samples of {rollout.prompt_length} + "
                             f"{rollout.response_length} tokens per step; judge: "
                             + (f"model {cfg.online_dpo.judge}" if model_judge else type(judge).__name__)
                             + f"; loss_type={d.loss_type} beta={d.beta} reference={reference}",
               "reference memory": memory}
    if prompts.stats.truncated or prompts.stats.dropped:
        log.warning("prompts: %d truncated on the left to ppo.max_prompt_length=%d, %d skipped (%s)",
                    prompts.stats.truncated, p.max_prompt_length, prompts.stats.dropped, prompts.stats.drop_reasons)
    return Objective(loss_fn=loss_fn, train_batches=batches, sample_batch=batches.next,
                     evaluate_extra=evaluate_extra, summary=summary, **hooks)
