"""RL math for PPO / GRPO / RLOO: advantage estimators, whitening, KL estimators, the clipped
policy and value losses, and the KL-coefficient controllers.

Conventions:
  - Token-level arrays are `[B, T]` over the response tokens of each sequence; `mask` is 1
    on response tokens (the tokens the policy sampled) and 0 on padding. A row's valid
    tokens are one contiguous span (left-aligned responses, or any offset): a 0 ends the
    episode, so nothing is bootstrapped across it.
  - `logprobs[b, t]` is log π(token_t | prefix); sequence-level scores are `[B]`.
  - The math is f32 whatever the input dtype. Everything but the controllers is jittable
    with the string / int settings (`kind`, `group_size`, ...) static.
  - Losses return `{name: (masked_sum, count)}` so that gradient accumulation and
    data-parallel averaging stay exact: add sums and counts over microbatches, divide once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------- GAE


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    rewards, values, mask: `[B, T]`. values[b, t] = V(s_t), the critic's estimate before
    token t is sampled. Inside a row's response span:
        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1}
    where V and A after the last valid token are 0 (the episode ends there: no bootstrap).
    Rewards and values outside the mask are ignored. Computed by a reverse `lax.scan` over T.

    Returns (advantages, returns), both `[B, T]`, 0 outside the mask; returns = A + V
    (the value-function target). γ = λ = 1 gives returns = reward-to-go.
    """
    m = _f32(mask)
    r, v = _f32(rewards) * m, _f32(values) * m

    def step(carry, x):
        next_value, next_adv = carry  # 0 past the end of the span (masked positions carry 0)
        r_t, v_t, m_t = x
        delta = r_t + gamma * next_value - v_t
        adv = (delta + gamma * lam * next_adv) * m_t
        return (v_t, adv), adv

    zeros = jnp.zeros(m.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv.T
    return adv, (adv + v) * m


# ---------------------------------------------------------------------------- masked statistics


def masked_mean(x, mask):
    """Mean of `x` over the entries where `mask` is 1 (a scalar)."""
    m = _f32(mask)
    return jnp.sum(_f32(x) * m) / jnp.maximum(jnp.sum(m), 1.0)


def masked_var(x, mask, unbiased: bool = True):
    """Variance over the masked entries; Bessel-corrected (n / (n - 1)) like TRL's
    `masked_var`, except that n <= 1 gives the biased value instead of raising."""
    m = _f32(mask)
    x = _f32(x)
    var = masked_mean((x - masked_mean(x, m)) ** 2, m)
    if unbiased:
        n = jnp.sum(m)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), 1.0)
    return var


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """Masked whitening, as TRL's `masked_whiten` (the PPO trainers up to TRL 0.x):
    (x - mean) / sqrt(var + eps) with mean and unbiased variance over the masked entries;
    `shift_mean=False` adds the mean back (rescale only, used for rewards).

    x, mask: same shape (e.g. `[B, T]`). All entries are transformed by the same affine
    map; entries outside the mask are not zeroed (multiply by the mask if you need that).
    """
    x = _f32(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    return out if shift_mean else out + mean


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the masked entries (a scalar; nan when Var[R] = 0).
    1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    var_r = masked_var(returns, mask, unbiased=False)
    var_diff = masked_var(_f32(returns) - _f32(values), mask, unbiased=False)
    return jnp.where(var_r > 0, 1.0 - var_diff / jnp.where(var_r > 0, var_r, 1.0), jnp.nan)


# ---------------------------------------------------------------------------- KL


KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "mse")


def kl_penalty(logprobs, ref_logprobs, kind: str = "k1"):
    """Per-token estimate of KL(π || π_ref) from samples of π, same shape as the inputs.

    With log r = ref_logprobs - logprobs (Schulman, "Approximating KL Divergence", 2020):
      k1   -log r                 unbiased, high variance, can be negative (TRL PPO "kl")
      k2   ½ (log r)^2            biased, low variance (TRL PPO "mse"; "mse" is an alias)
      k3   (r - 1) - log r        unbiased, >= 0 (TRL GRPO's per-token KL)
      abs  |log r|                (TRL PPO "abs")
    """
    logr = _f32(ref_logprobs) - _f32(logprobs)
    if kind == "k1":
        return -logr
    if kind in ("k2", "mse"):
        return 0.5 * logr**2
    if kind == "k3":
        return jnp.expm1(logr) - logr
    if kind == "abs":
        return jnp.abs(logr)
    raise ValueError(f"kl_penalty: unknown kind={kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


# ---------------------------------------------------------------------------- PPO losses


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def clipped_surrogate(new_logprobs, old_logprobs, advantages, cliprange: float = 0.2,
                      cliprange_high: float | None = None):
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, Eq. 7), elementwise
    (per token `[B, T]` or per sequence `[B]`). With ratio = exp(new - old):
        loss = max(-A ratio, -A clip(ratio, 1 - cliprange, 1 + cliprange_high))
    (`cliprange_high` defaults to `cliprange`; a larger one is DAPO's clip-higher,
    arXiv:2503.14476). Returns (loss, clipped: where the clipped term is the active one, ratio)."""
    adv = _f32(advantages)
    ratio = jnp.exp(_f32(new_logprobs) - _f32(old_logprobs))
    high = cliprange if cliprange_high is None else cliprange_high
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + high)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32), ratio


def aggregate(x, mask, loss_type: str = "bnpo", row_norm=None):
    """`(sum, count)` of a per-token loss `[B, T]` as TRL GRPOTrainer's `loss_type`s:
      grpo     each sequence's token mean, averaged over sequences (count: sequences)
      bnpo     the token mean over the batch (count: tokens)
      dr_grpo  the token sum / (sequences x T), T = the maximum completion length
      dapo     the token sum / (the rollout's tokens / its minibatches): `row_norm` `[B]` is the
               rollout's tokens per sequence on every row, so its sum over a minibatch is that
    Rows without a masked token are no sequence (count 0). Linear in `x` with a count that
    does not depend on it: loss terms aggregate separately and add.
    """
    m = _f32(mask)
    x = _f32(x) * m
    lengths = jnp.sum(m, axis=1)
    rows = jnp.sum((lengths > 0).astype(jnp.float32))
    if loss_type == "grpo":
        return jnp.sum(jnp.sum(x, axis=1) / jnp.maximum(lengths, 1.0)), rows
    if loss_type == "bnpo":
        return jnp.sum(x), jnp.sum(m)
    if loss_type == "dr_grpo":
        return jnp.sum(x) / m.shape[1], rows
    if loss_type == "dapo":
        return jnp.sum(x), jnp.sum(_f32(row_norm) * (lengths > 0))
    raise ValueError(f"aggregate: unknown loss_type={loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float = 0.2,
                    cliprange_high: float | None = None, loss_type: str = "bnpo", row_norm=None) -> dict:
    """PPO clipped policy loss per token (`clipped_surrogate`), aggregated by `loss_type`
    (`aggregate`; the default is the token mean, as PPO).

    All inputs `[B, T]` (advantages broadcast to tokens for GRPO). Returns
    `{name: (sum, count)}`; divide the summed sums by the summed counts:
      loss       the aggregated surrogate (minimize it)
      clipfrac   tokens where the clipped term is the active one (TRL's pg_clipfrac)
      approx_kl  ½ (new - old)^2, TRL PPO's approxkl
      ratio      the probability ratio
    """
    m = _f32(mask)
    count = jnp.sum(m)
    losses, clipped, ratio = clipped_surrogate(new_logprobs, old_logprobs, advantages, cliprange, cliprange_high)
    logratio = _f32(new_logprobs) - _f32(old_logprobs)

    def total(x):
        return (jnp.sum(x * m), count)

    return {"loss": aggregate(losses, m, loss_type, row_norm), "clipfrac": total(clipped),
            "approx_kl": total(0.5 * logratio**2), "ratio": total(ratio)}


def sequence_policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float = 0.2,
                         cliprange_high: float | None = None) -> dict:
    """RLOO's clipped loss as TRL's RLOOTrainer: one ratio per sequence,
    exp(Σ_t new_t - Σ_t old_t) over its masked tokens, clipped per sequence
    (`clipped_surrogate`), averaged over sequences.

    new/old_logprobs, mask `[B, T]`; advantages `[B]`. Returns `{name: (sum, sequences)}`:
    loss, clipfrac, approx_kl (½ (sequence log-ratio)^2), ratio; rows without a masked token
    are not counted.
    """
    m = _f32(mask)
    rows = (jnp.sum(m, axis=1) > 0).astype(jnp.float32)
    new, old = jnp.sum(_f32(new_logprobs) * m, axis=1), jnp.sum(_f32(old_logprobs) * m, axis=1)
    losses, clipped, ratio = clipped_surrogate(new, old, advantages, cliprange, cliprange_high)
    count = jnp.sum(rows)

    def total(x):
        return (jnp.sum(x * rows), count)

    return {"loss": total(losses), "clipfrac": total(clipped), "approx_kl": total(0.5 * (new - old) ** 2),
            "ratio": total(ratio)}


def ppo_value_loss(new_values, old_values, returns, mask, cliprange_value: float = 0.2) -> dict:
    """PPO clipped value loss, per token (as in OpenAI baselines / TRL's PPO trainer).

    All inputs `[B, T]`. With v_clip = old + clip(new - old, -c, c):
        loss_t = ½ max((new_t - R_t)^2, (v_clip_t - R_t)^2)
    Returns `{name: (masked_sum, token_count)}`: loss, and clipfrac (tokens where the
    clipped term is the larger one, TRL's vf_clipfrac).
    """
    m = _f32(mask)
    count = jnp.sum(m)
    v, old, ret = _f32(new_values), _f32(old_values), _f32(returns)
    v_clip = old + jnp.clip(v - old, -cliprange_value, cliprange_value)
    l1, l2 = (v - ret) ** 2, (v_clip - ret) ** 2
    return {"loss": (jnp.sum(0.5 * jnp.maximum(l1, l2) * m), count),
            "clipfrac": (jnp.sum((l2 > l1).astype(jnp.float32) * m), count)}


# ---------------------------------------------------------------------------- critic-free


def _groups(scores, group_size: int, name: str):
    s = _f32(scores)
    if s.ndim != 1 or s.shape[0] % group_size:
        raise ValueError(f"{name}: scores must be [B] with B divisible by group_size={group_size}, "
                         f"got shape {s.shape}; rows of one prompt's group must be consecutive")
    return s.reshape(-1, group_size)


SCALE_REWARDS = ("group", "batch", "none")


def grpo_advantages(scores, group_size: int, scale_rewards: str = "group", eps: float = 1e-4):
    """GRPO advantages `[B]` (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

    scores `[B]`: one scalar per sequence; each consecutive run of `group_size` rows is one
    prompt's group. A_i = (s_i - mean_group) / (std + eps), unbiased std, as TRL's
    GRPOTrainer `scale_rewards`: "group" (the group's std), "batch" (the std over all `B`
    scores), "none" (centered only: Dr. GRPO, Liu et al. 2025, arXiv:2503.20783). A bool
    is read as True = "group", False = "none". group_size=1 gives zeros.
    """
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if mode not in SCALE_REWARDS:
        raise ValueError(f"grpo_advantages: scale_rewards={scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
    g = _groups(scores, group_size, "grpo_advantages")
    centered = g - jnp.mean(g, axis=1, keepdims=True)
    if mode == "group" and group_size > 1:
        centered = centered / (jnp.std(g, axis=1, keepdims=True, ddof=1) + eps)
    elif mode == "batch" and g.size > 1:
        centered = centered / (jnp.std(g, ddof=1) + eps)
    return centered.reshape(-1)


def rloo_advantages(scores, group_size: int):
    """REINFORCE leave-one-out advantages `[B]` (Kool et al. 2019; Ahmadian et al. 2024,
    arXiv:2402.14740): A_i = s_i - mean_{j != i} s_j within each group of `group_size`
    consecutive rows (TRL RLOOTrainer's baseline). Needs group_size >= 2."""
    if group_size < 2:
        raise ValueError(f"rloo_advantages: group_size={group_size}; the leave-one-out baseline needs >= 2 "
                         "samples per prompt")
    g = _groups(scores, group_size, "rloo_advantages")
    baseline = (jnp.sum(g, axis=1, keepdims=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


# ---------------------------------------------------------------------------- KL controllers


@dataclasses.dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2; TRL's
    AdaptiveKLController). Host-side and mutable: `value` is the current coefficient.

    update(kl, n_steps): e = clip(kl / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.
    """

    init_kl_coef: float
    target: float
    horizon: float
    value: float = dataclasses.field(init=False)

    def __post_init__(self):
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target={self.target} and horizon={self.horizon} "
                             "must be positive")
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt to the KL measured over the last `n_steps` samples; returns the new value."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclasses.dataclass
class FixedKLController:
    """Constant KL coefficient with the controller interface (`value`, `update`)."""

    kl_coef: float
    value: float = dataclasses.field(init=False)

    def __post_init__(self):
        self.value = float(self.kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
