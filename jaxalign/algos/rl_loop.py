"""One RL iteration (PPO, GRPO, RLOO) as explicit stages, each a function of arrays, params
and a frozen settings dataclass:

    prompts -> rollout -----------> score ------------> experience -----------> advantages ------> updates
               KV-cache sampler,    reward model or     old and reference       GAE (PPO) or       epochs x
               current policy       reward functions,   log-probs, values       group baselines    minibatches
               (`sample`)           missing-EOS and     (`experience_forward`)  (`advantages`)     (`minibatch_indices`)
                                    overlong penalties
                                    (`score`)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos.advantages import (explained_variance, gae, grpo_advantages, kl_penalty, rloo_advantages,
                                       whiten)
from jaxalign.algos.rollout import (Prompts, RewardFunctions, RewardModel, RolloutSettings, call_reward_fn,
                                    decode_responses, experience_forward, process_sum, prompt_batch, sample, score,
                                    to_global, to_local)
from jaxalign.errors import DataError
from jaxalign.models.config import ModelConfig
from jaxalign.peft import lora

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- settings


def kl_placement(algorithm: str, kl_in: str) -> tuple[bool, bool]:
    """(in the reward, in the loss): where `ppo.kl_in` puts the KL to the reference (`kl_coef`
    x KL in the reward, `beta` x KL in the loss); auto: PPO the reward, GRPO the loss, RLOO both."""
    if kl_in == "auto":
        return algorithm != "grpo", algorithm != "ppo"
    return kl_in == "reward", kl_in == "loss"


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
    """Static settings of `advantages` (the `ppo.*` keys of the same names; `kind` is
    `ppo.kl_estimator`)."""

    algorithm: str
    kind: str = "k1"
    kl_in: str = "auto"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    group_size: int = 1
    scale_rewards: str = "group"
    whiten_scores: bool = False

    @property
    def kl_in_reward(self) -> bool:
        """Whether `kl_coef` x KL goes into the rewards (`kl_placement`)."""
        return kl_placement(self.algorithm, self.kl_in)[0]


@dataclasses.dataclass(frozen=True)
class ExperienceSettings:
    """What `collect` needs besides params and models. `prompts_per_rollout` counts all
    processes (`rows / group_size`); `reference_logprobs`: keep the reference's log-probs in
    the rows (a KL term in the loss); `row_norm`: add each row's share of the rollout's
    response tokens (`loss_type: dapo`); `overlong_cache`, `overlong_factor`: DAPO's overlong
    penalty in `rollout.score` (`ppo.overlong_cache`, `ppo.overlong_penalty_factor`);
    `recompute_logprobs`: the policy's log-probs of the rollout by a forward pass (the "old"
    log-probs). Without it the sampler's log-probs stand in for the rollout's KL statistic and
    the rows' old_logprobs (for a loss whose old log-probs are the current ones, one update
    per rollout), and entropy and sampler_logprob_error are not measured here."""

    rollout: RolloutSettings
    advantages: AdvantageSettings
    seed: int
    prompts_per_rollout: int
    missing_eos_penalty: float = 0.0
    overlong_cache: int = 0
    overlong_factor: float = 1.0
    drop_uniform_groups: bool = False
    reference_logprobs: bool = False
    row_norm: bool = False
    chunk_size: int | None = None
    recompute_logprobs: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    """The frozen parts of a rollout: the policy's and value model's configs, the reward, the
    tokenizer that decodes completions, the mesh, and the reference: `reference` params (a
    frozen copy of the initial policy), or `adapters_off` (the policy with LoRA off), or
    neither (no KL to a reference)."""

    config: ModelConfig
    value_config: ModelConfig | None
    reward: RewardModel | RewardFunctions
    tokenizer: Any
    mesh: Any = None
    reference: Any = None
    adapters_off: bool = False

    def reference_of(self, policy):
        """The reference params for the current `policy` (None: none needed)."""
        return lora.disable(policy) if self.adapters_off else self.reference


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    """How one rollout's rows become optimizer steps: `epochs` passes over this process's
    `rows`, each in `num_minibatches` shuffled minibatches of `minibatch_rows`;
    `rollout_size` is the rollout's rows over all processes."""

    rows: int
    minibatch_rows: int
    epochs: int
    num_minibatches: int
    seed: int
    rollout_size: int

    @property
    def steps(self) -> int:
        return self.epochs * self.num_minibatches


def old_logprobs_are_current(schedule: UpdateSchedule, a: AdvantageSettings) -> bool:
    """Whether the PPO "old" log-probs need no forward pass of their own: one update per
    rollout, of the params that sampled it, and no KL in the reward (which reads them before
    the update). The update's own log-probs, gradient stopped, are then exactly the old ones
    (ratio 1, as TRL does then), and the experience pass runs only the reference and value."""
    return schedule.steps == 1 and not a.kl_in_reward


# ---------------------------------------------------------------------------- stages


def rollout_prompts(k: int, num_prompts: int, per_rollout: int, seed: int) -> np.ndarray:
    """This process's prompt indices for rollout `k`: slot `k mod (num_prompts //
    per_rollout)` of the epoch's permutation `default_rng([seed, epoch])`, split evenly over
    the processes."""
    epoch, slot = divmod(k, num_prompts // per_rollout)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    local = per_rollout // jax.process_count()
    lo = jax.process_index() * local
    return order[slot * per_rollout:(slot + 1) * per_rollout][lo:lo + local]


@functools.partial(jax.jit, static_argnames="s")
def advantages(logprobs, ref_logprobs, values, scores, response_mask, kl_coef, s: AdvantageSettings):
    """Per-token advantages `[B, N]`, returns `[B, N]`, KL `[B, N]` and rewards `[B, N]` of a rollout.

    PPO: `rewards_t = -kl_coef * KL_t` on every response token (`s.kl_in_reward`) plus the
    score on the last one (`t = length - 1`, the EOS when there is one; `whiten_scores`: the
    scores first normalized to mean 0, std 1 over the rollout); GAE by reverse scan;
    advantages whitened over the response tokens. GRPO / RLOO: per-sequence advantages from
    the group of `group_size` consecutive rows (GRPO scaled per `scale_rewards`) on `score -
    kl_coef * sum_t KL_t` (`s.kl_in_reward`; else on the score), broadcast over the response
    tokens. Everything is 0 outside `response_mask`.
    """
    m = response_mask.astype(jnp.float32)
    kl = kl_penalty(logprobs, ref_logprobs, kind=s.kind) * m
    if s.algorithm == "ppo":
        if s.whiten_scores:
            scores = whiten(scores, jnp.ones_like(scores))
        last = jnp.maximum(jnp.sum(m, axis=1).astype(jnp.int32) - 1, 0)
        rewards = -kl_coef * kl if s.kl_in_reward else jnp.zeros_like(kl)
        rewards = rewards.at[jnp.arange(m.shape[0]), last].add(scores)
        if s.whiten_rewards:
            rewards = whiten(rewards, m, shift_mean=False) * m
        adv, ret = gae(rewards, values * m, m, gamma=s.gamma, lam=s.lam)
        if s.whiten_advantages:
            adv = whiten(adv, m)
        return adv * m, ret * m, kl, rewards
    if s.kl_in_reward:
        scores = scores - kl_coef * jnp.sum(kl, axis=1)
    if s.algorithm == "grpo":
        seq = grpo_advantages(scores, s.group_size, scale_rewards=s.scale_rewards)
    else:
        seq = rloo_advantages(scores, s.group_size)
    return seq[:, None] * m, jnp.zeros_like(m), kl, jnp.zeros_like(m)


def uniform_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """`[B]` bool: rows whose group of `group_size` consecutive rows has all-equal scores."""
    return np.repeat(np.isclose(scores.reshape(-1, group_size).std(1), 0.0), group_size)


def collect(params, k: int, kl_coef: float, prompts: Prompts, models: Models,
            s: ExperienceSettings) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Rollout `k` from `params` (`{"policy", "value"?}`): (rows: this process's experience,
    numpy `[b, ...]`: input_ids/attention_mask, response_mask, old_logprobs, advantages, PPO
    old_values/returns, ref_logprobs, row_norm as configured; stats: the rollout's statistics,
    means over all processes, see `jaxalign.algos.ppo.rollout_stat_names`)."""
    r, a = s.rollout, s.advantages
    policy, g = params["policy"], functools.partial(to_global, mesh=models.mesh)
    ids, mask, texts = prompt_batch(prompts, rollout_prompts(k, len(prompts), s.prompts_per_rollout, s.seed),
                                    a.group_size, r)
    batch = sample(policy, models.config, ids, mask, jax.random.fold_in(jax.random.key(s.seed), k), r, models.mesh)
    raw, scores, parts = score(batch, texts, models.reward, models.tokenizer, r.prompt_length, s.missing_eos_penalty,
                               s.overlong_cache, s.overlong_factor)
    logp, entropy, ref_logp, values = experience_forward(
        policy if s.recompute_logprobs else None, models.reference_of(policy), params.get("value"),
        g(batch["input_ids"]), g(batch["attention_mask"]), config=models.config, value_config=models.value_config,
        prompt_length=r.prompt_length, temperature=r.temperature, chunk_size=s.chunk_size,
        sampler_logprobs=None if s.recompute_logprobs else g(batch["sampler_logprobs"]))
    adv, ret, kl, _ = advantages(logp, ref_logp, values, g(scores.astype(np.float32)), g(batch["response_mask"]),
                                 jnp.float32(kl_coef), a)
    m = batch["response_mask"].astype(np.float32)
    explained = float(explained_variance(values, ret, g(m))) if a.algorithm == "ppo" else None
    logp, ref_logp, values, adv, ret, kl = map(to_local, (logp, ref_logp, values, adv, ret, kl))

    rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "response_mask": batch["response_mask"], "old_logprobs": logp, "advantages": adv}
    per_row = {"score": raw, "reward": scores, "kl": kl.sum(1), "response_length": m.sum(1),
               "eos_fraction": batch["eos"], **{f"rewards/{name}": v for name, v in parts.items()}}
    if a.algorithm != "ppo":  # groups of consecutive rows; a group never spans two processes
        per_row["frac_reward_zero_std"] = zero_std = uniform_groups(scores, a.group_size)
        per_row["reward_std"] = np.repeat(scores.reshape(-1, a.group_size).std(1, ddof=1), a.group_size)
        if s.drop_uniform_groups:  # DAPO's dynamic sampling: no loss on groups without signal
            rows["response_mask"] = rows["response_mask"] * (~zero_std[:, None]).astype(np.int32)
    tokens = {"value_mean": (values * m).sum(), "return_mean": (ret * m).sum(), "tokens": m.sum(),
              "kept_tokens": rows["response_mask"].sum()}
    if s.recompute_logprobs:
        tokens["entropy"] = (to_local(entropy) * m).sum()
    totals = process_sum([*(np.mean(v) for v in per_row.values()), *tokens.values()])  # one all-gather
    stats = dict(zip(per_row, totals[:len(per_row)] / jax.process_count()))  # means of per-process means
    tok = dict(zip(tokens, totals[len(per_row):]))
    n = max(float(tok["tokens"]), 1.0)
    stats["kl_coef"] = kl_coef
    if s.recompute_logprobs:
        stats.update(entropy=tok["entropy"] / n,
                     sampler_logprob_error=float(np.abs((logp - batch["sampler_logprobs"]) * m).max()))
    if a.kl_in_reward:
        stats["non_score_reward"] = -kl_coef * stats["kl"]
    if a.algorithm == "ppo":
        rows.update(old_values=values, returns=ret)
        stats.update(explained_variance=explained, value_mean=tok["value_mean"] / n,
                     return_mean=tok["return_mean"] / n)
    if s.reference_logprobs:
        rows["ref_logprobs"] = ref_logp
    if s.row_norm:  # the rollout's tokens per sequence (see advantages.aggregate)
        rows["row_norm"] = np.full(len(raw), tok["kept_tokens"] / (len(raw) * jax.process_count()), np.float32)
    return rows, {key: float(v) for key, v in stats.items()}


def minibatch_indices(i: int, k: int, s: UpdateSchedule) -> np.ndarray:
    """Rows (sorted) of step `i` of rollout `k`: epoch `i // num_minibatches` visits the rows
    in `default_rng([seed, k, epoch]).permutation` order."""
    epoch, j = divmod(i, s.num_minibatches)
    order = np.random.default_rng([s.seed, k, epoch]).permutation(s.rows)
    return np.sort(order[j * s.minibatch_rows:(j + 1) * s.minibatch_rows])


def evaluate(policy, prompts: Prompts, models: Models, s: RolloutSettings, *, rows: int, seed: int,
             greedy: bool, eval_fn: Callable | None = None) -> dict[str, float]:
    """Mean score (before the missing-EOS and overlong penalties), response length and EOS fraction of
    responses to `prompts`, sampled in batches of `rows` per process with settings `s`
    (greedy: argmax); `reward_fn`: the mean of `eval_fn` when given."""
    n, pi, pc = len(prompts), jax.process_index(), jax.process_count()
    totals = np.zeros(4)
    for base in range(0, n, rows * pc):  # every process runs the same number of batches
        lo = base + pi * rows
        idx = list(range(lo, min(lo + rows, n)))
        real = len(idx)
        idx += [0] * (rows - real)  # fixed shape: filler rows, their scores dropped
        ids, mask, texts = prompt_batch(prompts, idx, 1, s)
        batch = sample(policy, models.config, ids, mask, jax.random.key(seed), s, models.mesh, greedy=greedy)
        raw = score(batch, texts, models.reward, models.tokenizer, s.prompt_length)[0][:real]
        extra = 0.0
        if eval_fn is not None:
            completions = decode_responses(models.tokenizer, batch, s.prompt_length)
            extra = call_reward_fn(eval_fn, texts[:real], completions[:real]).sum()
        totals += [raw.sum(), batch["response_mask"][:real].sum(), batch["eos"][:real].sum(), extra]
    totals = process_sum(totals)
    out = {"score": totals[0] / n, "response_length": totals[1] / n, "eos_fraction": totals[2] / n}
    if eval_fn is not None:
        out["reward_fn"] = totals[3] / n
    return out


# ---------------------------------------------------------------------------- the iteration


class RolloutBatches:
    """Minibatches of experience for the training loop, which calls `next(params)` with the
    current params every step: at a rollout boundary `collect(params, k, kl_coef)` builds
    rollout `k` (deterministic given the seed, `k` and the params), then `schedule.steps`
    minibatches of it follow (`minibatch_indices`), each with the rollout's statistics
    (`stat_names`) on every row as `rollout_stats`. The KL controller sees each rollout's KL.

    `state()` / `restore()`: resume exactly at a rollout boundary (checkpoints must fall on
    one); a checkpoint in the middle of a rollout (the last step of a run) resumes at the next.
    """

    def __init__(self, collect: Callable[[Any, int, float], tuple[dict, dict]], schedule: UpdateSchedule,
                 kl_controller, stat_names: tuple[str, ...], num_prompts: int):
        self.collect, self.schedule, self.kl = collect, schedule, kl_controller
        self.stat_names, self.num_prompts = stat_names, num_prompts
        self.k, self.i, self.rows, self.stats = 0, 0, None, None
        self._last_end: float | None = None

    def next(self, params) -> dict[str, np.ndarray]:
        """The next minibatch (host arrays of this process's rows)."""
        if self.rows is None:
            self._rollout(params)
        idx = minibatch_indices(self.i, self.k, self.schedule)
        batch = {key: v[idx] for key, v in self.rows.items()}
        batch["rollout_stats"] = np.tile(self.stats, (len(idx), 1))
        self.i += 1
        if self.i == self.schedule.steps:
            self.k, self.i, self.rows = self.k + 1, 0, None
        return batch

    def _rollout(self, params) -> None:
        start = time.time()
        train_s = start - self._last_end if self._last_end is not None else 0.0
        coef = float(self.kl.value)
        self.rows, stats = self.collect(params, self.k, coef)
        self.kl.update(stats["kl"], self.schedule.rollout_size)
        self._last_end = time.time()
        stats.update(time_rollout_s=self._last_end - start, time_train_s=train_s, index=self.k)
        log.info("rollout %d: %s", self.k, ", ".join(f"{key} {stats[key]:.4g}" for key in self.stat_names))
        self.stats = np.asarray([stats[key] for key in self.stat_names], np.float32)

    def state(self) -> dict:
        """`{"rollout", "step", "seed", "num_prompts", "kl_coef"}` (JSON-able)."""
        return {"rollout": self.k, "step": self.i, "seed": self.schedule.seed, "num_prompts": self.num_prompts,
                "kl_coef": float(self.kl.value)}

    def restore(self, state: dict) -> None:
        """Continue from a `state()`: at its rollout, or at the next one when it was saved mid-rollout."""
        for key, mine in (("seed", self.schedule.seed), ("num_prompts", self.num_prompts)):
            if key in state and int(state[key]) != mine:
                raise DataError(f"rollout iterator state has {key}={state[key]} but this run has {key}={mine}; "
                                "resume with the same prompts and seed")
        self.k, self.i, self.rows = int(state["rollout"]), int(state["step"]), None
        self.kl.value = float(state["kl_coef"])
        if self.i:
            log.warning("checkpoint is %d steps into rollout %d (its experience is not saved): resuming at "
                        "rollout %d", self.i, self.k, self.k + 1)
            self.k, self.i = self.k + 1, 0
