"""RL fine-tuning: PPO (InstructGPT-style RLHF), GRPO and RLOO: the loss, the models and
`build`, which reads the config once into the settings of the stages in
`jaxalign.algos.rl_loop` (rollout -> score -> experience -> advantages -> updates).

Each loop step is one optimizer update on a minibatch of a rollout's experience with
`rl_sums`: clipped policy loss (+ `vf_coef` x clipped value loss for PPO, + `beta` x k3 KL
to the reference where `ppo.kl_in` puts the KL in the loss) as `(sum, count)`: PPO token
means, GRPO aggregated per `loss_type`, RLOO one clipped ratio per sequence (as TRL). The KL
controller (fixed or adaptive) sees each rollout's KL (a mean over all processes) and sets
`kl_coef`, the coefficient of the KL in the reward (`kl_placement`).

The train state holds `{"policy": ..., "value": ...}` (value only for PPO); frozen parts
(a LoRA base, a quantized base) are shared by reference, never copied: see docs/rl.md for
how many copies of the base weights each setup keeps in device memory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from jaxalign.algos.advantages import (AdaptiveKLController, FixedKLController, aggregate, kl_penalty,
                                       ppo_policy_loss, ppo_value_loss, sequence_policy_loss)
from jaxalign.algos.rl_loop import (AdvantageSettings, ExperienceSettings, Models, RolloutBatches, UpdateSchedule,
                                    collect, evaluate, kl_placement, old_logprobs_are_current)
from jaxalign.algos.rollout import (Prompts, RewardFunctions, RewardModel, RolloutSettings, load_prompts,
                                    load_reward_fn, response_logprobs, response_values, tree_bytes)
from jaxalign.config import builtin_path
from jaxalign.data import load_rows
from jaxalign.data.tasks import check_answer
from jaxalign.errors import ConfigError, DataError
from jaxalign.models import heads
from jaxalign.models.config import ModelConfig
from jaxalign.parallel.rules import named_shardings
from jaxalign.peft import lora
from jaxalign.sampling import SamplingSettings, pad_token_id, stop_token_ids
from jaxalign.train.objective import Objective, check_batch_size

log = logging.getLogger(__name__)

ALGORITHMS = ("ppo", "grpo", "rloo")


def rollout_stat_names(algorithm: str, kl: bool, kl_in_reward: bool,
                       reward_names: tuple[str, ...] = (), recomputed: bool = True) -> tuple[str, ...]:
    """Per-rollout statistics (the rollout's value on every row; means over all processes),
    logged under `rollout_metric(name)`: score (before the missing-EOS and overlong penalties),
    reward (after), kl (sum over the response of the per-token KL estimate, mean over
    sequences), with the KL in the reward kl_coef and non_score_reward (-kl_coef x kl), entropy
    (per token), response_length, eos_fraction, sampler_logprob_error (max |sampler -
    recomputed| log-prob, this process's), times, index; GRPO/RLOO frac_reward_zero_std
    (groups whose rewards are all equal) and reward_std (the groups' std, mean); `rewards/<name>`
    per reward function (and `overlong_penalty`). Without `recomputed` log-probs (see
    `ExperienceSettings.recompute_logprobs`) no entropy or sampler_logprob_error: the update
    logs the same entropy as `policy/entropy_avg`."""
    names = ["score", "reward", "entropy", "response_length", "eos_fraction", "sampler_logprob_error",
             "time_rollout_s", "time_train_s", "index"]
    if not recomputed:
        names = [name for name in names if name not in ("entropy", "sampler_logprob_error")]
    if kl:
        names.insert(2, "kl")
        if kl_in_reward:
            names[3:3] = ["kl_coef", "non_score_reward"]
    if algorithm == "ppo":
        names += ["explained_variance", "value_mean", "return_mean"]
    else:
        names += ["frac_reward_zero_std", "reward_std"]
    return tuple(names) + tuple(f"rewards/{name}" for name in reward_names)


# The metric names TRL's trainers log (PPOTrainer, GRPOTrainer), for the statistics that have one.
TRL_ROLLOUT_METRICS = {"reward": "reward", "reward_std": "reward_std", "kl": "objective/kl",
                       "non_score_reward": "objective/non_score_reward", "entropy": "objective/entropy",
                       "response_length": "completions/mean_length", "frac_reward_zero_std": "frac_reward_zero_std"}


def rollout_metric(stat: str) -> str:
    """The metrics.jsonl name of rollout statistic `stat`: TRL's where TRL has one
    (`rewards/<name>/mean` per reward function), else `rollout/<stat>`."""
    if stat.startswith("rewards/"):
        return f"{stat}/mean"
    return TRL_ROLLOUT_METRICS.get(stat, f"rollout/{stat}")


def task_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where the completion solves the bundled copy/reverse task prompt, else 0.0
    (`jaxalign.data.tasks.check_answer`; prompts that are not task prompts score 0)."""
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
    """Static settings of `rl_sums` (hashable). `old_is_current`: the old log-probs are the
    current ones with the gradient stopped (ratio 1), exact when each rollout is one update of
    the params that sampled it, as TRL does then; the rows' old_logprobs are not read."""

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
    old_is_current: bool = False


def loss_type(algorithm: str, grpo_loss_type: str) -> str:
    """How `rl_sums` aggregates per-token terms (`advantages.aggregate`): PPO the token mean, RLOO
    the sequence mean (its KL term; the policy loss is per sequence), GRPO `ppo.loss_type`."""
    return {"ppo": "bnpo", "rloo": "grpo"}.get(algorithm, grpo_loss_type)


def rl_sums(params, batch: dict, s: LossSettings, config: ModelConfig, value_config: ModelConfig | None) -> dict:
    """`{name: (sum, count)}` of one minibatch of experience. `loss`: PPO the token mean of
    `policy_loss + vf_coef * value_loss + beta * kl`; GRPO `policy_loss + beta * kl` per token,
    aggregated by `s.loss_type`; RLOO the per-sequence policy loss
    (`advantages.sequence_policy_loss`) + beta x each sequence's mean KL, averaged over
    sequences. `kl` is the k3 KL to the reference; `s.beta` is 0 unless `ppo.kl_in` puts the KL
    in the loss. Named as TRL: `loss/policy_avg`, `policy/clipfrac_avg`, `policy/approxkl_avg`,
    `val/ratio`, `policy/entropy_avg`, PPO `loss/value_avg`, `val/clipfrac_avg`, with beta
    `kl`; the rollout's statistics under `rollout_metric` names.

    batch: input_ids/attention_mask `[B, P + N]`, response_mask/old_logprobs/advantages
    (+ old_values/returns for PPO, ref_logprobs when beta > 0) `[B, N]`, row_norm `[B]`
    (loss_type dapo), rollout_stats `[B, len(s.stats)]`.
    """
    mask = batch["response_mask"].astype(jnp.float32)
    n = jnp.sum(mask)
    logp, entropy = response_logprobs(params["policy"], config, batch["input_ids"], batch["attention_mask"],
                                      s.prompt_length, temperature=s.temperature, chunk_size=s.chunk_size)
    row_norm = batch.get("row_norm")
    old = jax.lax.stop_gradient(logp) if s.old_is_current else batch["old_logprobs"]
    if s.algorithm == "rloo":  # advantages are per sequence, broadcast over its tokens
        pg = sequence_policy_loss(logp, old, batch["advantages"][:, 0], mask, s.cliprange, s.cliprange_high)
    else:
        pg = ppo_policy_loss(logp, old, batch["advantages"], mask, s.cliprange, s.cliprange_high, s.loss_type,
                             row_norm)
    total = pg["loss"][0]
    out = {  # TRL's names
        "loss/policy_avg": pg["loss"],
        "policy/clipfrac_avg": pg["clipfrac"],
        "policy/approxkl_avg": pg["approx_kl"],
        "val/ratio": pg["ratio"],
        "policy/entropy_avg": (jnp.sum(entropy * mask), n),
    }
    if s.algorithm == "ppo":
        values = response_values(params["value"], value_config, batch["input_ids"], batch["attention_mask"],
                                 s.prompt_length)
        vf = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, s.cliprange_value)
        total = total + s.vf_coef * vf["loss"][0]
        out.update({"loss/value_avg": vf["loss"], "val/clipfrac_avg": vf["clipfrac"]})
    if s.beta > 0:
        kl = kl_penalty(logp, batch["ref_logprobs"], kind="k3")
        total = total + s.beta * aggregate(kl, mask, s.loss_type, row_norm)[0]
        out["kl"] = (jnp.sum(kl * mask), n)
    out["loss"] = (total, pg["loss"][1])
    stats = batch["rollout_stats"]
    rows = jnp.asarray(stats.shape[0], jnp.float32)
    out.update({rollout_metric(name): (jnp.sum(stats[:, i]), rows) for i, name in enumerate(s.stats)})
    return out


# ---------------------------------------------------------------------------- params


def _copy(tree):
    """A copy of every array of `tree` in new device buffers, same shardings."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def _place(tree, mesh):
    """Put new host/device arrays on the mesh by the sharding rules (arrays already there stay)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, named_shardings(tree, mesh))


def value_params(cfg, policy_params, policy_config: ModelConfig, reward: RewardModel | None, mesh):
    """(value params `{"model", "score"}`, value config) per `ppo.value_model`.

    policy: the policy's decoder with a fresh score head. reward: the reward model's decoder
    and score head; it reads the policy's token ids, so the reward model must share the
    policy's tokenizer (auto picks policy otherwise). Under LoRA (a policy with adapters) the value
    model is fresh LoRA adapters (or, for a reward model that is itself an adapter, a copy of
    its adapters) on the *same* frozen base arrays; without LoRA it is a full trainable copy.
    """
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
        head = heads.init_score_head(config, rng, std=0.0)  # V = 0 at first: early advantages = reward-to-go
    else:
        source, config = {"model": reward.params["model"]}, reward.config
        head = reward.params["score"]
    if not lora.has_lora(policy_params):
        return _copy({**source, "score": head}), config
    if lora.has_lora(source):
        if kind == "policy":  # fresh adapters on the policy's base arrays
            source = {"model": lora.bases(source["model"])}
        else:  # the reward model's adapters (copied) on its base arrays
            adapters = _copy(jax.tree.map(lambda w: (w.a, w.b) if lora.is_lora(w) else None, source,
                                          is_leaf=lora.is_lora))
            model = jax.tree.map(lambda w, ab: w.replace(a=ab[0], b=ab[1]) if lora.is_lora(w) else w,
                                 source, adapters, is_leaf=lambda x: lora.is_lora(x) or x is None)
            return _place({**model, "score": _copy(head)}, mesh), config
    wrapped = lora.apply(source, r.rank, r.alpha, r.targets, rng, dropout=r.dropout, use_rslora=r.use_rslora)
    return _place({**wrapped, "score": _copy(head)}, mesh), config


def trainable_mask(params):
    """Bool tree of `{"policy", "value"}`: each part by `lora.trainable` (LoRA `a`/`b` where a
    part has adapters, else every array); the value model's score head is always trained."""
    out = {"policy": lora.trainable(params["policy"])}
    if "value" in params:
        value = {k: v for k, v in params["value"].items() if k != "score"}
        out["value"] = {**lora.trainable(value), "score": jax.tree.map(lambda _: True, params["value"]["score"])}
    return out


def base_weight_copies(policy, *others) -> float:
    """How many copies of the policy's base weights `policy` and `others` (reference, value
    model, reward model params; None skipped) keep in device memory: bytes of their distinct
    device buffers, LoRA adapters and score heads excluded, over the bytes of the policy's."""
    def base(tree):
        return lora.bases({k: v for k, v in tree.items() if k != "score"})

    unit = tree_bytes(base(policy))
    return tree_bytes([base(t) for t in (policy, *others) if t is not None]) / max(unit, 1)


# ---------------------------------------------------------------------------- build


def check_rollout(cfg, model, tokenizer) -> None:
    """ConfigError for rollout settings (`ppo.*` sampling, prompt and response lengths) that
    cannot work, and for a tokenizer without EOS: what every on-policy objective checks."""
    p = cfg.ppo
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
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token: rollouts need one to end responses")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        log.warning("the tokenizer's pad token is its EOS token; rollouts use the sampler's mask, never the "
                    "pad id, to find where responses end")


def _check(cfg, algorithm: str, model, tokenizer) -> None:
    p, t = cfg.ppo, cfg.train
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"jaxalign.algos.ppo builds {ALGORITHMS}, not {algorithm!r}")
    check_rollout(cfg, model, tokenizer)
    sources = [k for k in ("reward_model", "reward_adapter", "reward_fn") if getattr(p, k)]
    if len(sources) != 1:
        raise ConfigError(f"set exactly one of ppo.reward_model, ppo.reward_adapter, ppo.reward_fn (got "
                          f"{sources or 'none'})")
    if p.reward_adapter and not lora.has_lora(model.params):
        raise ConfigError("ppo.reward_adapter (a reward model that is a LoRA adapter of the policy's base) needs "
                          "lora.rank > 0 (its base is the policy's frozen base)")
    if algorithm in ("grpo", "rloo") and p.group_size < 2:
        raise ConfigError(f"{algorithm} compares samples of the same prompt: ppo.group_size must be >= 2, "
                          f"got {p.group_size}")
    if p.group_size < 1 or p.num_minibatches < 1 or p.ppo_epochs < 1:
        raise ConfigError("ppo.group_size, ppo.num_minibatches and ppo.ppo_epochs must be positive")
    check_batch_size(t, model.mesh)
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
    for name in ("cliprange", "epsilon_high", "cliprange_value", "kl_coef", "beta", "vf_coef",
                 "overlong_penalty_factor"):
        if (getattr(p, name) or 0) < 0:
            raise ConfigError(f"ppo.{name} must be >= 0, got {getattr(p, name)}")
    if not 0 <= p.overlong_cache <= p.response_length:
        raise ConfigError(f"ppo.overlong_cache={p.overlong_cache} must be in [0, ppo.response_length="
                          f"{p.response_length}]: the last response tokens over which the overlong penalty falls "
                          "to -1 (0: off)")
    if p.kl_in == "reward" and p.beta > 0:
        raise ConfigError(f"ppo.kl_in=reward puts ppo.kl_coef x KL in the reward; ppo.beta={p.beta} (the KL "
                          "coefficient in the loss) would be unused: set ppo.beta: 0, or ppo.kl_in: auto")
    if p.kl_in == "loss" and not p.beta > 0:
        raise ConfigError("ppo.kl_in=loss puts ppo.beta x k3 KL in the loss, but ppo.beta is 0 (no KL at all): "
                          "set ppo.beta > 0")
    if p.kl_in == "loss" and p.adaptive_kl:
        raise ConfigError("ppo.adaptive_kl adapts ppo.kl_coef, the KL coefficient in the reward; with "
                          "ppo.kl_in=loss the coefficient is ppo.beta (fixed): set ppo.adaptive_kl: false or "
                          "ppo.kl_in: reward")
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {p.gamma}, {p.lam}")


def load_reward(cfg, model, tokenizer) -> tuple[RewardModel | None, RewardFunctions | None]:
    """The configured reward: (RewardModel, None) or (None, the reward functions)."""
    p = cfg.ppo
    if p.reward_fn:
        return None, RewardFunctions(p.reward_fn, p.reward_weights)
    if p.reward_adapter:
        params, config = heads.load_reward_adapter(lora.bases(model.params), model.config,
                                                   builtin_path(p.reward_adapter))
        return RewardModel(params, config, model.mesh), None
    q = cfg.quantization
    return RewardModel.load(builtin_path(p.reward_model), model, tokenizer, dtype=cfg.model.dtype,
                            compute_dtype=cfg.model.compute_dtype, quantize=q.method, quant_block_size=q.block_size,
                            double_quant=q.double_quant), None


def load_rl_prompts(cfg, tokenizer) -> tuple[Prompts, Prompts | None]:
    """The train prompts (`data.train`) and the eval prompts (`data.eval`, or None)."""
    p, d = cfg.ppo, cfg.data
    if d.train is None:
        raise ConfigError("data.train is not set: RL needs prompts (rows with a 'prompt' field)")
    kw = dict(max_prompt_length=p.max_prompt_length, truncation=p.prompt_truncation, on_bad_row=d.on_bad_row,
              columns=d.columns, system_prompt=d.system_prompt)
    prompts = load_prompts(load_rows(builtin_path(d.train), split=d.train_split), tokenizer, **kw)
    if d.eval is None:
        return prompts, None
    eval_rows = load_rows(builtin_path(d.eval), split=d.eval_split)
    if d.max_eval_examples is not None:
        eval_rows = list(eval_rows)[: d.max_eval_examples]
    return prompts, load_prompts(eval_rows, tokenizer, **kw)


def build(cfg, model, tokenizer) -> Objective:
    """The PPO / GRPO / RLOO objective (dispatch on `cfg.algorithm`): the config read once into
    the settings of the stages (`jaxalign.algos.rl_loop`), the models, the loss and the
    minibatches the loop trains on."""
    algorithm, p, t, mesh = cfg.algorithm, cfg.ppo, cfg.train, model.mesh
    _check(cfg, algorithm, model, tokenizer)
    prompts, eval_prompts = load_rl_prompts(cfg, tokenizer)
    rows, pc = t.batch_size * p.num_minibatches, jax.process_count()
    per_rollout = rows // p.group_size
    if len(prompts) < per_rollout:
        raise DataError(f"{len(prompts)} prompts are fewer than one rollout needs ({per_rollout} = train.batch_size "
                        f"x ppo.num_minibatches / ppo.group_size)")

    stop = stop_token_ids(model.config, tokenizer)
    rollout = RolloutSettings(prompt_length=p.max_prompt_length, response_length=p.response_length,
                              temperature=float(p.temperature), top_k=p.top_k, top_p=float(p.top_p),
                              eos_token_ids=stop, pad_token_id=pad_token_id(model.config, tokenizer, stop))
    reward_model, reward_fn = load_reward(cfg, model, tokenizer)
    use_lora = lora.has_lora(model.params)
    kl_in_reward, kl_in_loss = kl_placement(algorithm, p.kl_in)
    beta = float(p.beta) if kl_in_loss else 0.0
    need_ref = algorithm == "ppo" or beta > 0 or (kl_in_reward and p.kl_coef > 0)
    reference = None if use_lora or not need_ref else _copy(model.params)  # frozen initial policy
    value, value_config = (value_params(cfg, model.params, model.config, reward_model, mesh) if algorithm == "ppo"
                           else (None, None))
    models = Models(config=model.config, value_config=value_config,
                    reward=reward_model if reward_model is not None else reward_fn,
                    tokenizer=tokenizer, mesh=mesh, reference=reference, adapters_off=use_lora and need_ref)
    aggregation = loss_type(algorithm, p.loss_type)
    updates = UpdateSchedule(rows=rows // pc, minibatch_rows=t.batch_size // pc, epochs=p.ppo_epochs,
                             num_minibatches=p.num_minibatches, seed=t.seed, rollout_size=rows)
    adv_settings = AdvantageSettings(algorithm=algorithm, kind=p.kl_estimator, kl_in=p.kl_in, gamma=float(p.gamma),
                                     lam=float(p.lam), whiten_rewards=p.whiten_rewards,
                                     whiten_advantages=p.whiten_advantages, group_size=p.group_size,
                                     scale_rewards=p.scale_rewards, whiten_scores=p.whiten_scores)
    on_policy = old_logprobs_are_current(updates, adv_settings)
    settings = ExperienceSettings(
        rollout=rollout, seed=t.seed, prompts_per_rollout=per_rollout, missing_eos_penalty=p.missing_eos_penalty or 0.0,
        overlong_cache=p.overlong_cache, overlong_factor=float(p.overlong_penalty_factor), advantages=adv_settings,
        drop_uniform_groups=p.drop_uniform_groups, reference_logprobs=beta > 0,
        row_norm=aggregation == "dapo", chunk_size=t.logprob_chunk, recompute_logprobs=not on_policy)
    reward_names = tuple(reward_fn.fns) if reward_fn is not None else ()
    if p.overlong_cache:
        if "overlong_penalty" in reward_names:
            raise ConfigError("ppo.reward_fn names a function overlong_penalty, the name under which "
                              "ppo.overlong_cache's penalty is logged; rename the function")
        reward_names += ("overlong_penalty",)
    stat_names = rollout_stat_names(algorithm, need_ref, kl_in_reward, reward_names, recomputed=not on_policy)
    batches = RolloutBatches(
        functools.partial(collect, prompts=prompts, models=models, s=settings), updates,
        AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl else FixedKLController(p.kl_coef),
        stat_names, len(prompts))
    loss_settings = LossSettings(
        algorithm=algorithm, prompt_length=rollout.prompt_length, temperature=rollout.temperature,
        cliprange=float(p.cliprange), cliprange_high=None if p.epsilon_high is None else float(p.epsilon_high),
        cliprange_value=float(p.cliprange_value), vf_coef=float(p.vf_coef), beta=beta,
        loss_type=aggregation, chunk_size=t.logprob_chunk, stats=stat_names, old_is_current=on_policy)

    def loss_fn(params, batch, rng):
        return rl_sums(params, batch, loss_settings, model.config, value_config)

    evaluate_extra = None
    if eval_prompts is not None:
        eval_settings = dataclasses.replace(rollout, temperature=float(p.eval_temperature or 1.0))
        eval_fn = load_reward_fn(p.eval_reward_fn, "ppo.eval_reward_fn") if p.eval_reward_fn else None
        evaluate_extra = functools.partial(_evaluate_policy, prompts=eval_prompts, models=models, s=eval_settings,
                                           rows=t.batch_size // pc, seed=t.seed, greedy=p.eval_temperature == 0,
                                           eval_fn=eval_fn)

    copies = base_weight_copies(model.params, reference, value,
                                reward_model.params if reward_model is not None else None)
    summary = {"prompts": prompts.stats.as_dict(), "base_weight_copies": round(copies, 3),
               "rollout": f"{per_rollout} prompts x {p.group_size} samples = {rows} sequences of "
                          f"{rollout.prompt_length} + {rollout.response_length} tokens; "
                          f"{p.ppo_epochs * p.num_minibatches} optimizer steps of {t.batch_size} per rollout"}
    if prompts.stats.truncated or prompts.stats.dropped:
        log.warning("prompts: %d truncated on the left to ppo.max_prompt_length=%d, %d skipped (%s)",
                    prompts.stats.truncated, p.max_prompt_length, prompts.stats.dropped, prompts.stats.drop_reasons)
    if use_lora and cfg.lora.dropout > 0:
        log.info("lora.dropout=%s is off in RL updates: the old log-probs are computed without it, so the first "
                 "update's ratio is 1", cfg.lora.dropout)
    init_params = functools.partial(_train_tree, value=value)
    return Objective(loss_fn=loss_fn, train_batches=batches, sample_batch=batches.next, evaluate_extra=evaluate_extra,
                     summary=summary, init_params=init_params, trainable_mask=trainable_mask,
                     export_params=lambda params: params["policy"], lora_dropout=False)


def _train_tree(params, value=None) -> dict:
    """The tree the loop trains: `{"policy": params}`, plus `"value"` for PPO."""
    return {"policy": params} if value is None else {"policy": params, "value": value}


def _evaluate_policy(params, **kwargs) -> dict:
    """`rl_loop.evaluate` of the policy in the trained tree."""
    return evaluate(params["policy"], **kwargs)
