"""`jaxalign bench rl`: where the time of one RL iteration goes, GRPO and PPO, phase by phase.

One iteration = one rollout and its updates, built from the stage functions the training loop
runs (`jaxalign.algos.rl_loop`, `jaxalign.algos.rollout`), each phase timed on its own with
`block_until_ready` at its end:

* generate: `rl_loop.rollout_prompts` + `rollout.prompt_batch` + `rollout.sample` (the KV-cache
  sampler, current policy; host arrays back);
* score: `rollout.score`: GRPO the `module:function` reward `jaxalign.data.arithmetic:reward` on
  the decoded completions, PPO a reward model (the checkpoint's decoder with a random score head,
  `heads.load_reward_model`) at the last token;
* experience: `rollout.experience_forward`: the policy's (old) log-probs (not with one update per
  rollout and no KL in the reward: `rl_loop.old_logprobs_are_current`), the reference's log-probs
  (a frozen copy of the start policy; GRPO only with `--grpo-beta` > 0) and PPO's values (the
  value model `ppo.value_params` picks by default: the reward model's decoder and head, copied);
* advantages: `rl_loop.advantages` (PPO: KL-shaped rewards, GAE, whitening; GRPO: group
  baselines) and the rows back on the host, as `rl_loop.collect` builds them;
* update: epochs x minibatches optimizer steps (`rl_loop.minibatch_indices`, `ppo.rl_sums`, the
  loop's `make_train_step` with its trainable/frozen split), AdamW, every weight trained.

The first iteration compiles (reported as `first_iteration_s`); the phase times are means over
the `--iters` iterations after it. Every row decodes exactly `--new-tokens` tokens (no stop
token), so every iteration does the same work. PPO samples one response to each of `prompts x
group` prompts, so both algorithms' iterations hold the same number of sequences. Other settings
are the `ppo.*` config defaults. Prompt ids are random (away from the low special ids); the
prompt texts a reward function sees are two-digit addition questions.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.bench.common import make_bench_checkpoint, peak_memory_bytes
from jaxalign.errors import ConfigError

PHASES = ("generate", "score", "experience", "advantages", "update")
ALGOS = ("grpo", "ppo")
REWARD_FN = "jaxalign.data.arithmetic:reward"


class _IdTokenizer:
    """For checkpoints without tokenizer files (the bench model): a completion decodes to its
    token ids separated by spaces."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def _tokenizer(checkpoint: str):
    """The checkpoint's tokenizer, or `_IdTokenizer` when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError):
        return _IdTokenizer()


def _prompts(vocab_size: int, count: int, prompt_len: int):
    """`count` prompts of `prompt_len` random ids; texts: addition questions."""
    from jaxalign.algos.rollout import Prompts
    from jaxalign.data.arithmetic import make_prompt
    from jaxalign.data.formats import DataStats

    rs = np.random.RandomState(0)
    low = min(100, vocab_size // 4)
    ids = [rs.randint(low, vocab_size, prompt_len).astype(np.int32) for _ in range(count)]
    texts = [make_prompt(*rs.randint(10, 100, 2)) for _ in range(count)]
    return Prompts(ids, texts, DataStats(format="prompt", rows=count, examples=count))


def bench_rl_algorithm(algorithm: str, checkpoint: str, prompts: int, group: int, prompt_len: int, new_tokens: int,
                       iters: int, epochs: int = 1, minibatches: int = 2, grpo_beta: float = 0.04,
                       compute_dtype: str = "auto", recompute_old_logprobs: bool = False) -> dict:
    """Per-phase ms of one `algorithm` ("grpo" | "ppo") iteration on `checkpoint` (an HF dir):
    the mean over `iters` iterations after a first (compiling) one. `recompute_old_logprobs`
    runs the policy's forward in the experience phase even where the training loop skips it
    (to measure what skipping saves)."""
    import jaxalign as ja
    from jaxalign.algos import ppo
    from jaxalign.algos.rl_loop import (AdvantageSettings, UpdateSchedule, advantages, minibatch_indices,
                                        old_logprobs_are_current, rollout_prompts)
    from jaxalign.algos.rollout import (RewardFunctions, RewardModel, RolloutSettings, experience_forward,
                                        prompt_batch, sample, score, to_local)
    from jaxalign.config import Config, OptimSection, PPOSection
    from jaxalign.models import heads
    from jaxalign.models.model import resolve_compute_dtype
    from jaxalign.train.loop import partition_params
    from jaxalign.train.optim import make_optimizer
    from jaxalign.train.step import init_state, make_train_step

    if algorithm not in ALGOS:
        raise ConfigError(f"bench rl runs {ALGOS}, not {algorithm!r}")
    rows = prompts * group
    if rows % minibatches:
        raise ConfigError(f"prompts x group = {rows} sequences do not split into {minibatches} minibatches")
    is_ppo = algorithm == "ppo"
    group_size = 1 if is_ppo else group
    per_rollout = rows // group_size
    p = PPOSection()
    beta = 0.0 if is_ppo else float(grpo_beta)
    compute_dtype = resolve_compute_dtype(compute_dtype, "float32")

    model = ja.load_model(checkpoint, dtype="float32", compute_dtype=compute_dtype)
    config = model.config
    tokenizer = _tokenizer(checkpoint)
    data = _prompts(config.vocab_size, per_rollout * (1 + iters), prompt_len)
    rollout = RolloutSettings(prompt_length=prompt_len, response_length=new_tokens, temperature=float(p.temperature),
                              top_k=p.top_k, top_p=float(p.top_p), eos_token_ids=(),
                              pad_token_id=config.pad_token_id or 0)
    adv_settings = AdvantageSettings(algorithm=algorithm, kind=p.kl_estimator, gamma=float(p.gamma), lam=float(p.lam),
                                     whiten_rewards=p.whiten_rewards, whiten_advantages=p.whiten_advantages,
                                     group_size=group_size, scale_rewards=p.scale_rewards,
                                     whiten_scores=p.whiten_scores)
    if is_ppo:
        rm = heads.load_reward_model(checkpoint, dtype="float32", compute_dtype=compute_dtype)
        reward = RewardModel(rm.params, rm.config)
        value, value_config = ppo.value_params(Config(algorithm="ppo"), model.params, config, reward, None)
        reward_name = "reward model (the checkpoint, random score head)"
    else:
        reward, value, value_config, reward_name = RewardFunctions(REWARD_FN), None, None, REWARD_FN
    need_ref = is_ppo or beta > 0
    reference = jax.tree.map(jnp.copy, model.params) if need_ref else None

    updates = UpdateSchedule(rows=rows, minibatch_rows=rows // minibatches, epochs=epochs,
                             num_minibatches=minibatches, seed=0, rollout_size=rows)
    on_policy = not recompute_old_logprobs and old_logprobs_are_current(updates, adv_settings)
    aggregation = ppo.loss_type(algorithm, p.loss_type)
    loss_settings = ppo.LossSettings(
        algorithm=algorithm, prompt_length=prompt_len, temperature=rollout.temperature, cliprange=float(p.cliprange),
        cliprange_value=float(p.cliprange_value), vf_coef=float(p.vf_coef), beta=beta, loss_type=aggregation,
        old_is_current=on_policy)
    optimizer, schedule = make_optimizer(OptimSection(learning_rate=1e-6), 1000)
    loss_fn = lambda params, batch, rng: ppo.rl_sums(params, batch, loss_settings, config, value_config)  # noqa: E731
    tree = {"policy": model.params} if value is None else {"policy": model.params, "value": value}
    trainable, frozen, combine = partition_params(tree, ppo.trainable_mask)
    step = jax.jit(make_train_step(loss_fn, optimizer, schedule, combine), donate_argnums=0)
    holder = {"state": init_state(trainable, optimizer, 0)}
    del model, tree, trainable
    seed, kl_coef = 0, jnp.float32(p.kl_coef)

    def iteration(k: int) -> dict[str, float]:
        """Rollout `k` and its updates: {phase: seconds, "tokens": generated tokens}."""
        marks = [time.perf_counter()]
        params = combine(holder["state"].params, frozen)
        policy = params["policy"]
        ids, mask, texts = prompt_batch(data, rollout_prompts(k, len(data), per_rollout, seed), group_size, rollout)
        batch = sample(policy, config, ids, mask, jax.random.fold_in(jax.random.key(seed), k), rollout)
        marks.append(time.perf_counter())  # generate (host arrays: already synchronized)
        _, scores, _ = score(batch, texts, reward, tokenizer, prompt_len, p.missing_eos_penalty or 0.0)
        marks.append(time.perf_counter())  # score (host arrays)
        out = experience_forward(None if on_policy else policy, reference, params.get("value"), batch["input_ids"],
                                 batch["attention_mask"], config=config, value_config=value_config,
                                 prompt_length=prompt_len, temperature=rollout.temperature,
                                 sampler_logprobs=batch["sampler_logprobs"] if on_policy else None)
        jax.block_until_ready(out)
        marks.append(time.perf_counter())  # experience
        logp, _, ref_logp, values = out
        adv, ret, _, _ = advantages(logp, ref_logp, values, scores.astype(np.float32), batch["response_mask"],
                                     kl_coef, adv_settings)
        data_rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                     "response_mask": batch["response_mask"], "old_logprobs": to_local(logp),
                     "advantages": to_local(adv)}
        if is_ppo:
            data_rows.update(old_values=to_local(values), returns=to_local(ret))
        elif beta > 0:
            data_rows["ref_logprobs"] = to_local(ref_logp)
        marks.append(time.perf_counter())  # advantages (host numpy: synchronized)
        metrics = None
        for i in range(updates.steps):
            idx = minibatch_indices(i, k, updates)
            mb = {key: v[idx] for key, v in data_rows.items()}
            mb["rollout_stats"] = np.zeros((len(idx), 0), np.float32)
            holder["state"], metrics = step(holder["state"], frozen, mb)
        jax.block_until_ready(metrics["loss"])
        marks.append(time.perf_counter())  # update
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"bench rl: {algorithm} update gave a non-finite loss")
        times = dict(zip(PHASES, np.diff(marks)))
        times["tokens"] = float(batch["response_mask"].sum())
        return times

    t0 = time.perf_counter()
    first = iteration(0)
    first_s = time.perf_counter() - t0
    runs = []
    for k in range(1, 1 + iters):
        t0 = time.perf_counter()
        times = iteration(k)
        times["wall"] = time.perf_counter() - t0
        runs.append(times)
    mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    result = {
        "benchmark": "rl", "algorithm": algorithm, "device": jax.devices()[0].device_kind,
        "params": config.num_params(), "compute_dtype": compute_dtype, "prompts": per_rollout,
        "samples_per_prompt": group_size, "sequences": rows, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "epochs": epochs, "minibatches": minibatches, "update_steps": updates.steps, "iters": iters,
        "reward": reward_name, "value_model": "reward model's decoder + head" if is_ppo else None,
        "reference": need_ref, "beta": beta, "kl_coef": float(p.kl_coef) if is_ppo else None,
        "old_logprobs_forward": not on_policy,
        "first_iteration_s": round(first_s, 2),
        "first_iteration_ms": {ph: round(1e3 * float(first[ph]), 2) for ph in PHASES},
        "iteration_ms": round(1e3 * mean["wall"], 2),
    }
    for ph in PHASES:
        result[f"{ph}_ms"] = round(1e3 * mean[ph], 2)
    for ph in PHASES:
        result[f"{ph}_fraction"] = round(mean[ph] / mean["wall"], 4)
    result["generate_tokens_per_s"] = round(mean["tokens"] / mean["generate"], 1)
    result["update_ms_per_step"] = round(1e3 * mean["update"] / updates.steps, 2)
    result["peak_memory_gb"] = round(peak_memory_bytes() / 2**30, 3)
    return result


def bench_rl(checkpoint: str | None = None, prompts: int = 8, group: int = 4, prompt_len: int = 32,
             new_tokens: int = 32, iters: int = 2, algos=ALGOS, epochs: int = 1, minibatches: int = 2,
             grpo_beta: float = 0.04, compute_dtype: str = "auto", recompute_old_logprobs: bool = False) -> list[dict]:
    """One result per algorithm in `algos` (see `bench_rl_algorithm`); default checkpoint: the
    random 56M bench model."""
    for a in algos:
        if a not in ALGOS:
            raise ConfigError(f"--algos: {a!r} is not one of {', '.join(ALGOS)}")
    if iters < 1:
        raise ConfigError("--iters must be >= 1 (the first iteration compiles and is not counted)")
    tmp = None
    if checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = make_bench_checkpoint(tmp.name)
    try:
        results = [bench_rl_algorithm(a, checkpoint, prompts, group, prompt_len, new_tokens, iters, epochs,
                                      minibatches, grpo_beta, compute_dtype, recompute_old_logprobs) for a in algos]
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_table(results), file=sys.stderr)
    return results


def format_table(results: list[dict]) -> str:
    """A markdown table of the results: ms and share of the iteration per phase."""
    head = "| algorithm | " + " | ".join(PHASES) + " | iteration | generate tokens/s |"
    lines = [head, "| --- |" + " ---: |" * (len(PHASES) + 2)]
    for r in results:
        cells = [f"{r[f'{ph}_ms']:.0f} ms ({100 * r[f'{ph}_fraction']:.0f}%)" for ph in PHASES]
        lines.append(f"| {r['algorithm']} | " + " | ".join(cells) + f" | {r['iteration_ms']:.0f} ms | "
                     f"{r['generate_tokens_per_s']:.1f} |")
    return "\n".join(lines)

