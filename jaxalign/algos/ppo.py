"""RL fine-tuning on the one training loop: PPO (InstructGPT-style RLHF), GRPO and RLOO.

One rollout (every `ppo_epochs x num_minibatches` optimizer steps), see `RolloutIterator`:

1. prompts (left-padded to `max_prompt_length`; longer ones truncated on the left or
   skipped) x `group_size` samples from the current policy at `temperature`
   (`jaxalign.algos.rollout.sample`: the jit-compiled KV-cache sampler);
2. a full forward pass over prompt + response: the policy's log-probs (the PPO "old"
   log-probs), the reference's (adapters off under LoRA, else a frozen copy of the
   initial policy) and, for PPO, the value model's per-token values;
3. scores: a reward model at the last response token, or a Python `reward_fn`;
   responses that end without EOS lose `missing_eos_penalty`;
4. advantages (`advantages`): PPO puts `-kl_coef * KL_t` on every response token and the
   score on the last one, then GAE(gamma, lam) and whitening; GRPO/RLOO normalize the
   scores within each group of `group_size` samples of one prompt and broadcast the
   advantage over the response tokens (RLOO's sequence reward is `score - kl_coef * KL`);
5. minibatches of that experience, shuffled per epoch; each loop step is one optimizer
   update on `rl_sums`: clipped policy loss (+ `vf_coef` x clipped value loss for PPO,
   + `beta` x k3 KL to the reference for GRPO/RLOO) as `(sum, count)`: PPO token means,
   GRPO aggregated per `loss_type`, RLOO one clipped ratio per sequence (as TRL);
6. the KL controller (fixed or adaptive) sees the rollout's KL (a mean over all processes).

The train state holds `{"policy": ..., "value": ...}` (value only for PPO); frozen parts
(a LoRA base, a quantized base) are shared by reference, never copied: see docs/rl.md for
how many copies of the base weights each setup keeps in device memory.
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

from jaxalign.algos.rollout import (Prompts, RewardFunctions, RewardModel, RolloutSettings, call_reward_fn,
                                    decode_responses, left_pad, load_prompts, load_reward_fn, process_sum,
                                    response_logprobs, response_values, sample, to_global, to_local)
from jaxalign.errors import ConfigError, DataError
from jaxalign.models.config import ModelConfig

log = logging.getLogger(__name__)

ALGORITHMS = ("ppo", "grpo", "rloo")


def rollout_stat_names(algorithm: str, kl: bool, reward_names: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Per-rollout statistics, logged as `rollout/<name>` (the rollout's value on every row;
    means over all processes): score (before the missing-EOS penalty), reward (after), kl (sum
    over the response of the per-token KL estimate, mean over sequences), entropy (per token),
    response_length, eos_fraction, sampler_logprob_error (max |sampler - recomputed| log-prob,
    this process's), times, index; GRPO/RLOO frac_reward_zero_std (groups whose rewards are
    all equal); `rewards/<name>` per reward function."""
    names = ["score", "reward", "entropy", "response_length", "eos_fraction", "sampler_logprob_error",
             "time_rollout_s", "time_train_s", "index"]
    if kl:
        names.insert(2, "kl")
        if algorithm in ("ppo", "rloo"):
            names[3:3] = ["kl_coef", "non_score_reward"]
    if algorithm == "ppo":
        names += ["explained_variance", "value_mean", "return_mean"]
    else:
        names.append("frac_reward_zero_std")
    return tuple(names) + tuple(f"rewards/{name}" for name in reward_names)


def task_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where the completion solves the bundled copy/reverse task prompt, else 0.0
    (`jaxalign.data.tasks.check_answer`; prompts that are not task prompts score 0)."""
    from jaxalign.data.tasks import check_answer

    scores = []
    for p, c in zip(prompts, completions):
        try:
            scores.append(float(check_answer(p, c)))
        except ValueError:
            scores.append(0.0)
    return scores


# ---------------------------------------------------------------------------- the loss


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Static settings of `rl_sums` (hashable)."""

    algorithm: str
    prompt_length: int
    temperature: float
    cliprange: float = 0.2
    cliprange_high: float | None = None
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    beta: float = 0.0
    loss_type: str = "bnpo"
    chunk_size: int | None = None
    stats: tuple[str, ...] = ()


def loss_type(algorithm: str, grpo_loss_type: str) -> str:
    """How `rl_sums` aggregates per-token terms (`rl.aggregate`): PPO the token mean, RLOO
    the sequence mean (its KL term; the policy loss is per sequence), GRPO `ppo.loss_type`."""
    return {"ppo": "bnpo", "rloo": "grpo"}.get(algorithm, grpo_loss_type)


def rl_sums(params, batch: dict, s: LossSettings, config: ModelConfig, value_config: ModelConfig | None) -> dict:
    """`{name: (sum, count)}` of one minibatch of experience. `loss`: PPO the token mean of
    `policy_loss + vf_coef * value_loss`; GRPO `policy_loss + beta * kl` per token, aggregated
    by `s.loss_type`; RLOO the per-sequence policy loss (`rl.sequence_policy_loss`) + beta x
    each sequence's mean KL, averaged over sequences.

    batch: input_ids/attention_mask `[B, P + N]`, response_mask/old_logprobs/advantages
    (+ old_values/returns for PPO, ref_logprobs when beta > 0) `[B, N]`, row_norm `[B]`
    (loss_type dapo), rollout_stats `[B, len(s.stats)]`.
    """
    from jaxalign import rl

    mask = batch["response_mask"].astype(jnp.float32)
    n = jnp.sum(mask)
    logp, entropy = response_logprobs(params["policy"], config, batch["input_ids"], batch["attention_mask"],
                                      s.prompt_length, temperature=s.temperature, chunk_size=s.chunk_size)
    row_norm = batch.get("row_norm")
    if s.algorithm == "rloo":  # advantages are per sequence, broadcast over its tokens
        pg = rl.sequence_policy_loss(logp, batch["old_logprobs"], batch["advantages"][:, 0], mask, s.cliprange,
                                     s.cliprange_high)
    else:
        pg = rl.ppo_policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask, s.cliprange,
                                s.cliprange_high, s.loss_type, row_norm)
    total = pg["loss"][0]
    out = {
        "policy_loss": pg["loss"],
        "clipfrac": pg["clipfrac"],
        "approx_kl": pg["approx_kl"],
        "ratio": pg["ratio"],
        "entropy": (jnp.sum(entropy * mask), n),
    }
    if s.algorithm == "ppo":
        values = response_values(params["value"], value_config, batch["input_ids"], batch["attention_mask"],
                                 s.prompt_length)
        vf = rl.ppo_value_loss(values, batch["old_values"], batch["returns"], mask, s.cliprange_value)
        total = total + s.vf_coef * vf["loss"][0]
        out.update(value_loss=vf["loss"], value_clipfrac=vf["clipfrac"])
    elif s.beta > 0:
        kl = rl.kl_penalty(logp, batch["ref_logprobs"], kind="k3")
        total = total + s.beta * rl.aggregate(kl, mask, s.loss_type, row_norm)[0]
        out["kl"] = (jnp.sum(kl * mask), n)
    out["loss"] = (total, pg["loss"][1])
    stats = batch["rollout_stats"]
    rows = jnp.asarray(stats.shape[0], jnp.float32)
    out.update({f"rollout/{name}": (jnp.sum(stats[:, i]), rows) for i, name in enumerate(s.stats)})
    return out


# ---------------------------------------------------------------------------- advantages


@functools.partial(jax.jit, static_argnames=("algorithm", "kind", "gamma", "lam", "whiten_rewards",
                                             "whiten_advantages", "group_size", "scale_rewards", "whiten_scores"))
def advantages(logprobs, ref_logprobs, values, scores, response_mask, kl_coef, *, algorithm: str, kind: str,
               gamma: float, lam: float, whiten_rewards: bool, whiten_advantages: bool, group_size: int,
               scale_rewards: str, whiten_scores: bool = False):
    """Per-token advantages `[B, N]`, returns `[B, N]`, KL `[B, N]` and rewards `[B, N]` of a rollout.

    PPO: `rewards_t = -kl_coef * KL_t` on every response token plus the score on the last
    one (`t = length - 1`, the EOS when there is one; `whiten_scores`: the scores first
    normalized to mean 0, std 1 over the rollout); GAE by reverse scan; advantages whitened
    over the response tokens. GRPO / RLOO: per-sequence advantages from the
    group of `group_size` consecutive rows (GRPO scaled per `scale_rewards`; RLOO on
    `score - kl_coef * sum_t KL_t`), broadcast over the response tokens. Everything is 0 outside `response_mask`.
    """
    from jaxalign import rl

    m = response_mask.astype(jnp.float32)
    kl = rl.kl_penalty(logprobs, ref_logprobs, kind=kind) * m
    if algorithm == "ppo":
        if whiten_scores:
            scores = rl.whiten(scores, jnp.ones_like(scores))
        last = jnp.maximum(jnp.sum(m, axis=1).astype(jnp.int32) - 1, 0)
        rewards = -kl_coef * kl
        rewards = rewards.at[jnp.arange(m.shape[0]), last].add(scores)
        if whiten_rewards:
            rewards = rl.whiten(rewards, m, shift_mean=False) * m
        adv, ret = rl.gae(rewards, values * m, m, gamma=gamma, lam=lam)
        if whiten_advantages:
            adv = rl.whiten(adv, m)
        return adv * m, ret * m, kl, rewards
    if algorithm == "grpo":
        seq = rl.grpo_advantages(scores, group_size, scale_rewards=scale_rewards)
    else:
        seq = rl.rloo_advantages(scores - kl_coef * jnp.sum(kl, axis=1), group_size)
    return seq[:, None] * m, jnp.zeros_like(m), kl, jnp.zeros_like(m)


# ---------------------------------------------------------------------------- the iterator


class RolloutIterator:
    """Minibatches of experience for the generic loop; generates a rollout from the current
    params every `epochs * num_minibatches` batches.

    `bind(get_params)`: the loop hands a function returning the current full params.
    `experience(params, k, kl_coef) -> (rows: dict of local numpy [R, ...], stats: dict)`
    builds rollout `k` (deterministic from the seed, `k` and the params). Epoch `e` of
    rollout `k` visits the rows in `default_rng([seed, k, e]).permutation` order.
    `state()` / `restore()`: resume exactly at a rollout boundary (checkpoints must fall on
    one: `train.save_every` is a multiple of the steps per rollout); a checkpoint in the
    middle of a rollout (the last step of a run) resumes at the next rollout.
    """

    def __init__(self, experience: Callable, *, rows: int, minibatch_rows: int, epochs: int, num_minibatches: int,
                 seed: int, num_prompts: int, kl_controller, stat_names: tuple[str, ...], rollout_size: int):
        self.experience, self.stat_names = experience, stat_names
        self.rows, self.minibatch_rows, self.rollout_size = rows, minibatch_rows, rollout_size
        self.epochs, self.num_minibatches = epochs, num_minibatches
        self.steps_per_rollout = epochs * num_minibatches
        self.seed, self.num_prompts = seed, num_prompts
        self.kl = kl_controller
        self.get_params: Callable[[], Any] | None = None
        self.k, self.i, self.exp, self.stats = 0, 0, None, None
        self._last_end: float | None = None

    def bind(self, get_params: Callable[[], Any]) -> None:
        self.get_params = get_params

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.exp is None:
            if self.get_params is None:
                raise RuntimeError("RolloutIterator needs the current params: call bind(get_params) first")
            start = time.time()
            train_s = start - self._last_end if self._last_end is not None else 0.0
            coef = float(self.kl.value)
            self.exp, stats = self.experience(self.get_params(), self.k, coef)
            self.kl.update(stats["kl"], self.rollout_size)
            self._last_end = time.time()
            stats.update(time_rollout_s=self._last_end - start, time_train_s=train_s, index=self.k)
            log.info("rollout %d: %s", self.k, ", ".join(f"{k} {stats[k]:.4g}" for k in self.stat_names))
            self.stats = np.asarray([stats[k] for k in self.stat_names], np.float32)
        epoch, j = divmod(self.i, self.num_minibatches)
        order = np.random.default_rng([self.seed, self.k, epoch]).permutation(self.rows)
        idx = np.sort(order[j * self.minibatch_rows:(j + 1) * self.minibatch_rows])
        batch = {k: v[idx] for k, v in self.exp.items()}
        batch["rollout_stats"] = np.tile(self.stats, (len(idx), 1))
        self.i += 1
        if self.i == self.steps_per_rollout:
            self.k, self.i, self.exp = self.k + 1, 0, None
        return batch

    def state(self) -> dict:
        """`{"rollout", "step", "seed", "num_prompts", "kl_coef"}` (JSON-able)."""
        return {"rollout": self.k, "step": self.i, "seed": self.seed, "num_prompts": self.num_prompts,
                "kl_coef": float(self.kl.value)}

    def restore(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_prompts", self.num_prompts)):
            if key in state and int(state[key]) != mine:
                raise DataError(f"rollout iterator state has {key}={state[key]} but this run has {key}={mine}; "
                                "resume with the same prompts and seed")
        self.k, self.i, self.exp = int(state["rollout"]), int(state["step"]), None
        self.kl.value = float(state["kl_coef"])
        if self.i:
            log.warning("checkpoint is %d steps into rollout %d (its experience is not saved): resuming at "
                        "rollout %d", self.i, self.k, self.k + 1)
            self.k, self.i = self.k + 1, 0


# ---------------------------------------------------------------------------- params


def _copy(tree):
    """A copy of every array of `tree` in new device buffers, same shardings."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def _place(tree, mesh):
    """Put new host/device arrays on the mesh by the sharding rules (arrays already there stay)."""
    from jaxalign.parallel.rules import named_shardings

    if mesh is None:
        return tree
    return jax.device_put(tree, named_shardings(tree, mesh))


def _is_lora(x) -> bool:
    from jaxalign.peft.lora import LoraWeight

    return isinstance(x, LoraWeight)


def _has_lora(tree) -> bool:
    from jaxalign.nn.seams import is_weight_type

    return any(_is_lora(x) for x in jax.tree.leaves(tree, is_leaf=is_weight_type))


def _bases(tree):
    """`tree` with every LoRA leaf replaced by its (frozen) base: the same arrays."""
    return jax.tree.map(lambda w: w.base if _is_lora(w) else w, tree, is_leaf=_is_lora)


def value_params(cfg, policy_params, policy_config: ModelConfig, reward: RewardModel | None, mesh):
    """(value params `{"model", "score"}`, value config) per `ppo.value_model`.

    policy: the policy's decoder with a fresh score head. reward: the reward model's decoder
    and score head; it reads the policy's token ids, so the reward model must share the
    policy's tokenizer (auto picks policy otherwise). Under LoRA (`lora.rank > 0`) the value
    model is fresh LoRA adapters (or, for a reward model that is itself an adapter, a copy of
    its adapters) on the *same* frozen base arrays; without LoRA it is a full trainable copy.
    """
    from jaxalign.models.heads import init_score_head
    from jaxalign.peft import lora

    r = cfg.lora
    kind = cfg.ppo.value_model
    if kind == "auto":
        kind = "reward" if reward is not None and not reward.retokenize else "policy"
    if kind == "reward" and reward is None:
        raise ConfigError("ppo.value_model=reward needs a reward model (ppo.reward_model or ppo.reward_adapter)")
    if kind == "reward" and reward.retokenize:
        raise ConfigError("ppo.value_model=reward: the reward model's tokenizer differs from the policy's, but the "
                          "critic reads the policy's token ids (only the reward's input is re-tokenized); set "
                          "ppo.value_model: policy")
    rng = jax.random.key(cfg.model.seed + 2)
    if kind == "policy":
        source, config = {"model": policy_params["model"]}, policy_config
        head = init_score_head(config, rng, std=0.0)  # V = 0 at first: early advantages = reward-to-go
    else:
        source, config = {"model": reward.params["model"]}, reward.config
        head = reward.params["score"]
    if r.rank == 0:
        return _copy({**source, "score": head}), config
    if _has_lora(source):
        if kind == "policy":  # fresh adapters on the policy's base arrays
            source = {"model": _bases(source["model"])}
        else:  # the reward model's adapters (copied) on its base arrays
            adapters = _copy(jax.tree.map(lambda w: (w.a, w.b) if _is_lora(w) else None, source, is_leaf=_is_lora))
            model = jax.tree.map(lambda w, ab: w.replace(a=ab[0], b=ab[1]) if _is_lora(w) else w,
                                 source, adapters, is_leaf=lambda x: _is_lora(x) or x is None)
            return _place({**model, "score": _copy(head)}, mesh), config
    wrapped = lora.apply(source, r.rank, r.alpha, r.targets, rng, dropout=r.dropout, use_rslora=r.use_rslora)
    return _place({**wrapped, "score": _copy(head)}, mesh), config


def trainable_mask(params):
    """Bool tree of `{"policy", "value"}`: LoRA `a`/`b` where a part has adapters, else every
    array; the value model's score head is always trained."""
    from jaxalign.peft import lora

    def part(tree):
        return lora.trainable_mask(tree) if _has_lora(tree) else jax.tree.map(lambda _: True, tree)

    out = {"policy": part(params["policy"])}
    if "value" in params:
        value = {k: v for k, v in params["value"].items() if k != "score"}
        out["value"] = {**part(value), "score": jax.tree.map(lambda _: True, params["value"]["score"])}
    return out


def base_weight_copies(policy, *others) -> float:
    """How many copies of the policy's base weights `policy` and `others` (reference, value
    model, reward model params; None skipped) keep in device memory: bytes of their distinct
    device buffers, LoRA adapters and score heads excluded, over the bytes of the policy's."""
    from jaxalign.algos.rollout import tree_bytes

    def base(tree):
        return _bases({k: v for k, v in tree.items() if k != "score"})

    unit = tree_bytes(base(policy))
    return tree_bytes([base(t) for t in (policy, *others) if t is not None]) / max(unit, 1)


# ---------------------------------------------------------------------------- build


def _check(cfg, algorithm: str, model, tokenizer, dp: int) -> None:
    from jaxalign.sampling import SamplingSettings

    p, t = cfg.ppo, cfg.train
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"jaxalign.algos.ppo builds {ALGORITHMS}, not {algorithm!r}")
    if not p.temperature > 0:
        raise ConfigError(f"ppo.temperature must be > 0 for RL rollouts (log-probs are of softmax(logits / "
                          f"temperature)), got {p.temperature}")
    try:
        SamplingSettings(max_new_tokens=p.response_length, temperature=p.temperature, top_k=p.top_k,
                         top_p=p.top_p).validate()
    except ConfigError as e:
        raise ConfigError(f"ppo: {e}") from None
    if not p.eval_temperature >= 0:
        raise ConfigError(f"ppo.eval_temperature must be >= 0 (0 = greedy), got {p.eval_temperature}")
    if p.max_prompt_length < 1:
        raise ConfigError(f"ppo.max_prompt_length must be >= 1, got {p.max_prompt_length}")
    budget = model.config.max_position_embeddings
    if p.max_prompt_length + p.response_length > budget:
        raise ConfigError(f"ppo.max_prompt_length ({p.max_prompt_length}) + ppo.response_length "
                          f"({p.response_length}) exceeds the model's context ({budget} positions)")
    sources = [k for k in ("reward_model", "reward_adapter", "reward_fn") if getattr(p, k)]
    if len(sources) != 1:
        raise ConfigError(f"set exactly one of ppo.reward_model, ppo.reward_adapter, ppo.reward_fn (got "
                          f"{sources or 'none'})")
    if p.reward_adapter and cfg.lora.rank == 0:
        raise ConfigError("ppo.reward_adapter (a reward model that is a LoRA adapter of the policy's base) needs "
                          "lora.rank > 0 (its base is the policy's frozen base)")
    if algorithm in ("grpo", "rloo") and p.group_size < 2:
        raise ConfigError(f"{algorithm} compares samples of the same prompt: ppo.group_size must be >= 2, "
                          f"got {p.group_size}")
    if p.group_size < 1 or p.num_minibatches < 1 or p.ppo_epochs < 1:
        raise ConfigError("ppo.group_size, ppo.num_minibatches and ppo.ppo_epochs must be positive")
    if t.batch_size % (dp * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by data x fsdp ({dp}) x "
                          f"train.grad_accum ({t.grad_accum})")
    rows = t.batch_size * p.num_minibatches
    if rows % p.group_size or (rows // p.group_size) % jax.process_count():
        raise ConfigError(f"a rollout is train.batch_size x ppo.num_minibatches = {rows} sequences: it must be a "
                          f"multiple of ppo.group_size ({p.group_size}) x processes ({jax.process_count()})")
    per = p.ppo_epochs * p.num_minibatches
    if t.save_every and t.save_every % per:
        raise ConfigError(f"train.save_every={t.save_every} must be a multiple of the optimizer steps per rollout "
                          f"(ppo.ppo_epochs x ppo.num_minibatches = {per}) so that checkpoints resume exactly")
    if p.reward_weights is not None and not p.reward_fn:
        raise ConfigError("ppo.reward_weights weighs the ppo.reward_fn list: set ppo.reward_fn or drop the weights")
    for name in ("cliprange", "epsilon_high", "cliprange_value", "kl_coef", "beta", "vf_coef"):
        if (getattr(p, name) or 0) < 0:
            raise ConfigError(f"ppo.{name} must be >= 0, got {getattr(p, name)}")
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {p.gamma}, {p.lam}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: rollouts need one to end responses")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        log.warning("the tokenizer's pad token is its EOS token; rollouts use the sampler's mask, never the "
                    "pad id, to find where responses end")


def _stop_ids(model, tokenizer) -> tuple[int, ...]:
    ids = [*model.config.eos_token_ids, tokenizer.eos_token_id]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _pad_id(model, tokenizer, stop: tuple[int, ...]) -> int:
    pad = tokenizer.pad_token_id
    if pad is None or not 0 <= pad < model.config.vocab_size:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else stop[0]
    return int(pad)


def load_reward(cfg, model, tokenizer) -> tuple[RewardModel | None, RewardFunctions | None]:
    """The configured reward: (RewardModel, None) or (None, the reward functions)."""
    from jaxalign.config import builtin_path

    p = cfg.ppo
    if p.reward_fn:
        return None, RewardFunctions(p.reward_fn, p.reward_weights)
    from jaxalign.models import heads

    if p.reward_adapter:
        params, config = heads.load_reward_adapter(_bases(model.params), model.config, builtin_path(p.reward_adapter))
        return RewardModel(params, config, model.mesh), None
    q = cfg.quantization
    return RewardModel.load(builtin_path(p.reward_model), model, tokenizer, dtype=cfg.model.dtype,
                            compute_dtype=cfg.model.compute_dtype, quantize=q.method, quant_block_size=q.block_size,
                            double_quant=q.double_quant), None


def build(cfg, model, tokenizer):
    """The PPO / GRPO / RLOO objective (dispatch on `cfg.algorithm`)."""
    from jaxalign import rl
    from jaxalign.algos.sft import data_parallel_size
    from jaxalign.config import builtin_path
    from jaxalign.data import load_rows
    from jaxalign.peft import lora
    from jaxalign.train.objective import Objective

    algorithm, p, t = cfg.algorithm, cfg.ppo, cfg.train
    mesh = model.mesh
    dp = data_parallel_size(mesh) if mesh is not None else 1
    _check(cfg, algorithm, model, tokenizer, dp)
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: RL needs prompts (rows with a 'prompt' field)")
    prompts = load_prompts(load_rows(builtin_path(cfg.data.train), split=cfg.data.train_split), tokenizer,
                           max_prompt_length=p.max_prompt_length, truncation=p.prompt_truncation)
    rows = t.batch_size * p.num_minibatches
    per_rollout = rows // p.group_size
    if len(prompts) < per_rollout:
        raise DataError(f"{len(prompts)} prompts are fewer than one rollout needs ({per_rollout} = train.batch_size "
                        f"x ppo.num_minibatches / ppo.group_size)")
    eval_prompts = None
    if cfg.data.eval is not None:
        eval_rows = load_rows(builtin_path(cfg.data.eval), split=cfg.data.eval_split)
        if cfg.data.max_eval_examples is not None:
            eval_rows = list(eval_rows)[: cfg.data.max_eval_examples]
        eval_prompts = load_prompts(eval_rows, tokenizer, max_prompt_length=p.max_prompt_length,
                                    truncation=p.prompt_truncation)

    stop = _stop_ids(model, tokenizer)
    settings = RolloutSettings(prompt_length=p.max_prompt_length, response_length=p.response_length,
                               temperature=float(p.temperature), top_k=p.top_k, top_p=float(p.top_p),
                               eos_token_ids=stop, pad_token_id=_pad_id(model, tokenizer, stop))
    reward_model, reward_fn = load_reward(cfg, model, tokenizer)
    config = model.config
    use_lora = _has_lora(model.params)
    need_ref = algorithm == "ppo" or p.beta > 0 or (algorithm == "rloo" and p.kl_coef > 0)
    reference = None if use_lora or not need_ref else _copy(model.params)  # frozen initial policy

    value_config = None
    if algorithm == "ppo":
        value, value_config = value_params(cfg, model.params, config, reward_model, mesh)

        def init_params(params):
            return {"policy": params, "value": value}
    else:
        def init_params(params):
            return {"policy": params}

    chunk = t.logprob_chunk
    forward = jax.jit(functools.partial(_experience_forward, config=config, value_config=value_config,
                                        prompt_length=settings.prompt_length, temperature=settings.temperature,
                                        chunk_size=chunk))
    adv_kwargs = dict(algorithm=algorithm, kind=p.kl_estimator, gamma=float(p.gamma), lam=float(p.lam),
                      whiten_rewards=p.whiten_rewards, whiten_advantages=p.whiten_advantages,
                      group_size=p.group_size, scale_rewards=p.scale_rewards, whiten_scores=p.whiten_scores)
    aggregation = loss_type(algorithm, p.loss_type)
    pi, pc = jax.process_index(), jax.process_count()
    local_prompts = per_rollout // pc
    rollouts_per_epoch = len(prompts) // per_rollout

    def score(batch, texts):
        """(scores [b], {reward function name: its scores [b]})."""
        if reward_model is not None:
            return reward_model(batch, settings.prompt_length), {}
        return reward_fn(texts, decode_responses(tokenizer, batch, settings.prompt_length))

    def prompt_batch(source: Prompts, idx, group: int):
        ids, mask = left_pad([source.ids[i] for i in idx], settings.prompt_length, settings.pad_token_id)
        texts = [source.texts[i] for i in idx for _ in range(group)]
        return np.repeat(ids, group, axis=0), np.repeat(mask, group, axis=0), texts

    def experience(params, k: int, kl_coef: float):
        """Rollout k: the local rows of the experience and host statistics."""
        epoch, slot = divmod(k, rollouts_per_epoch)
        order = np.random.default_rng([t.seed, epoch]).permutation(len(prompts))
        idx = order[slot * per_rollout:(slot + 1) * per_rollout][pi * local_prompts:(pi + 1) * local_prompts]
        ids, mask, texts = prompt_batch(prompts, idx, p.group_size)
        policy = params["policy"]
        batch = sample(policy, config, ids, mask, jax.random.fold_in(jax.random.key(t.seed), k), settings, mesh)
        ref = (lora.disable(policy) if use_lora else reference) if need_ref else None
        g = functools.partial(to_global, mesh=mesh)
        logp, entropy, ref_logp, values = forward(policy, ref, params.get("value"), g(batch["input_ids"]),
                                                  g(batch["attention_mask"]))
        raw, parts = score(batch, texts)
        scores = raw - (p.missing_eos_penalty or 0.0) * (1 - batch["eos"])
        adv, ret, kl, _ = advantages(logp, ref_logp, values, g(scores.astype(np.float32)),
                                     g(batch["response_mask"]), jnp.float32(kl_coef), **adv_kwargs)
        m = batch["response_mask"].astype(np.float32)
        if algorithm == "ppo":
            explained = float(rl.explained_variance(values, ret, g(m)))
        logp, entropy, ref_logp, values, adv, ret, kl = map(to_local, (logp, entropy, ref_logp, values, adv, ret, kl))
        exp = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
               "response_mask": batch["response_mask"], "old_logprobs": logp, "advantages": adv}
        per_row = {"score": raw, "reward": scores, "kl": kl.sum(1), "response_length": m.sum(1),
                   "eos_fraction": batch["eos"], **{f"rewards/{name}": v for name, v in parts.items()}}
        if algorithm != "ppo":  # groups of consecutive rows; a group never spans two processes
            zero_std = np.repeat(np.isclose(scores.reshape(-1, p.group_size).std(1), 0.0), p.group_size)
            per_row["frac_reward_zero_std"] = zero_std
            if p.drop_uniform_groups:  # DAPO's dynamic sampling: no loss on groups without signal
                exp["response_mask"] = exp["response_mask"] * (~zero_std[:, None]).astype(np.int32)
        tokens = {"entropy": (entropy * m).sum(), "value_mean": (values * m).sum(), "return_mean": (ret * m).sum(),
                  "tokens": m.sum(), "kept_tokens": exp["response_mask"].sum()}
        totals = process_sum([*(np.mean(v) for v in per_row.values()), *tokens.values()])  # one all-gather
        stats = dict(zip(per_row, totals[:len(per_row)] / pc))  # means of equal-sized per-process means
        tok = dict(zip(tokens, totals[len(per_row):]))
        n = max(float(tok["tokens"]), 1.0)
        stats.update(kl_coef=kl_coef, entropy=tok["entropy"] / n,
                     sampler_logprob_error=float(np.abs((logp - batch["sampler_logprobs"]) * m).max()))
        if algorithm in ("ppo", "rloo"):
            stats["non_score_reward"] = -kl_coef * stats["kl"]
        if algorithm == "ppo":
            exp.update(old_values=values, returns=ret)
            stats.update(explained_variance=explained, value_mean=tok["value_mean"] / n,
                         return_mean=tok["return_mean"] / n)
        if algorithm != "ppo" and p.beta > 0:
            exp["ref_logprobs"] = ref_logp
        if aggregation == "dapo":  # the rollout's tokens per sequence (see rl.aggregate)
            exp["row_norm"] = np.full(len(raw), tok["kept_tokens"] / (len(raw) * pc), np.float32)
        return exp, {k: float(v) for k, v in stats.items()}

    stat_names = rollout_stat_names(algorithm, need_ref, tuple(reward_fn.fns) if reward_fn is not None else ())
    kl_ctl = (rl.AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
              else rl.FixedKLController(p.kl_coef))
    iterator = RolloutIterator(experience, rows=rows // pc, minibatch_rows=t.batch_size // pc, epochs=p.ppo_epochs,
                               num_minibatches=p.num_minibatches, seed=t.seed, num_prompts=len(prompts),
                               kl_controller=kl_ctl, stat_names=stat_names, rollout_size=rows)
    loss_settings = LossSettings(
        algorithm=algorithm, prompt_length=settings.prompt_length, temperature=settings.temperature,
        cliprange=float(p.cliprange), cliprange_high=None if p.epsilon_high is None else float(p.epsilon_high),
        cliprange_value=float(p.cliprange_value), vf_coef=float(p.vf_coef), beta=float(p.beta),
        loss_type=aggregation, chunk_size=chunk, stats=stat_names)

    def loss_fn(params, batch, rng):
        return rl_sums(params, batch, loss_settings, config, value_config)

    evaluate_extra = None
    if eval_prompts is not None:
        eval_settings = dataclasses.replace(settings, temperature=float(p.eval_temperature or 1.0))
        eval_fn = load_reward_fn(p.eval_reward_fn, "ppo.eval_reward_fn") if p.eval_reward_fn else None

        def evaluate_extra(params):
            """Mean score (and length, EOS fraction; the mean of ppo.eval_reward_fn if set) of
            responses to the eval prompts, sampled at ppo.eval_temperature (0: greedy)."""
            n, chunk_rows = len(eval_prompts), t.batch_size // pc
            totals = np.zeros(4)
            for base in range(0, n, chunk_rows * pc):  # every process runs the same number of batches
                lo = base + pi * chunk_rows
                idx = list(range(lo, min(lo + chunk_rows, n)))
                real = len(idx)
                idx += [0] * (chunk_rows - real)  # fixed shape: filler rows, their scores dropped
                ids, mask, texts = prompt_batch(eval_prompts, idx, 1)
                batch = sample(params["policy"], config, ids, mask, jax.random.key(t.seed), eval_settings, mesh,
                               greedy=p.eval_temperature == 0)
                s = score(batch, texts)[0][:real]
                extra = 0.0
                if eval_fn is not None:
                    completions = decode_responses(tokenizer, batch, settings.prompt_length)
                    extra = call_reward_fn(eval_fn, texts[:real], completions[:real]).sum()
                totals += [s.sum(), batch["response_mask"][:real].sum(), batch["eos"][:real].sum(), extra]
            totals = process_sum(totals)
            out = {"score": totals[0] / n, "response_length": totals[1] / n, "eos_fraction": totals[2] / n}
            if eval_fn is not None:
                out["reward_fn"] = totals[3] / n
            return out

    copies = base_weight_copies(model.params, reference, value if algorithm == "ppo" else None,
                                reward_model.params if reward_model is not None else None)
    summary = {"prompts": prompts.stats.as_dict(), "base_weight_copies": round(copies, 3),
               "rollout": f"{per_rollout} prompts x {p.group_size} samples = {rows} sequences of "
                          f"{settings.prompt_length} + {settings.response_length} tokens; "
                          f"{p.ppo_epochs * p.num_minibatches} optimizer steps of {t.batch_size} per rollout"}
    if prompts.stats.truncated or prompts.stats.dropped:
        log.warning("prompts: %d truncated on the left to ppo.max_prompt_length=%d, %d skipped (%s)",
                    prompts.stats.truncated, p.max_prompt_length, prompts.stats.dropped, prompts.stats.drop_reasons)
    if cfg.lora.rank > 0 and cfg.lora.dropout > 0:
        log.info("lora.dropout=%s is off in RL updates: the old log-probs are computed without it, so the first "
                 "update's ratio is 1", cfg.lora.dropout)
    return Objective(loss_fn=loss_fn, train_batches=iterator, evaluate_extra=evaluate_extra, summary=summary,
                     init_params=init_params, trainable_mask=trainable_mask, bind_params=iterator.bind,
                     export_params=lambda params: params["policy"], lora_dropout=False)


def _experience_forward(policy, ref, value, input_ids, attention_mask, *, config, value_config, prompt_length: int,
                        temperature: float, chunk_size: int):
    """(logp, entropy, ref_logp, values) `[B, N]` of a sampled batch (ref_logp = logp without a
    reference; values = 0 without a value model)."""
    logp, entropy = response_logprobs(policy, config, input_ids, attention_mask, prompt_length,
                                      temperature=temperature, chunk_size=chunk_size)
    ref_logp = logp if ref is None else response_logprobs(ref, config, input_ids, attention_mask, prompt_length,
                                                          temperature=temperature, chunk_size=chunk_size)[0]
    values = (jnp.zeros_like(logp) if value is None
              else response_values(value, value_config, input_ids, attention_mask, prompt_length))
    return logp, entropy, ref_logp, values
