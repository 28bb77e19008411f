"""RL math (jaxalign.rl): GAE, whitening, KL estimators, PPO losses, GRPO/RLOO advantages,
explained variance and the KL controllers, each against a plain NumPy/Python reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import rl

B, T = 4, 7
RNG = np.random.default_rng(0)

# Ragged response spans: full, short, empty, and one that starts at an offset.
SPANS = [(0, 7), (0, 3), (0, 0), (2, 6)]


def ragged_mask():
    m = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate(SPANS):
        m[b, s:e] = 1
    return m


def gae_reference(rewards, values, gamma, lam):
    """A_t = Σ_{l>=0} (γλ)^l δ_{t+l} over each row's span, δ_t = r_t + γ V_{t+1} - V_t with
    V = 0 after the span's last token. A plain double loop over t and l."""
    adv = np.zeros((B, T))
    for b, (s, e) in enumerate(SPANS):
        for t in range(s, e):
            for l_ in range(e - t):
                k = t + l_
                v_next = values[b, k + 1] if k + 1 < e else 0.0
                delta = rewards[b, k] + gamma * v_next - values[b, k]
                adv[b, t] += (gamma * lam) ** l_ * delta
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_double_loop_with_ragged_masks(gamma, lam):
    mask = ragged_mask()
    rewards = RNG.normal(size=(B, T)).astype(np.float32)
    values = RNG.normal(size=(B, T)).astype(np.float32)
    # garbage outside the mask must be ignored
    rewards_g, values_g = np.where(mask > 0, rewards, 100.0), np.where(mask > 0, values, -50.0)
    adv, ret = jax.jit(rl.gae, static_argnames=("gamma", "lam"))(rewards_g, values_g, mask, gamma=gamma, lam=lam)
    want = gae_reference(np.where(mask > 0, rewards, 0.0), np.where(mask > 0, values, 0.0), gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), (want + values) * mask, rtol=1e-5, atol=1e-5)
    assert adv.dtype == jnp.float32 and adv.shape == (B, T)


def test_gae_gamma_lam_one_gives_reward_to_go():
    mask = ragged_mask()
    rewards = RNG.normal(size=(B, T)).astype(np.float32) * mask
    values = RNG.normal(size=(B, T)).astype(np.float32)
    _, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1) * mask  # Σ_{k>=t} r_k
    np.testing.assert_allclose(np.asarray(ret), reward_to_go, rtol=1e-5, atol=1e-5)


def test_gae_score_at_eos_and_gradient_free_inputs():
    """The PPO layout: a single score on each row's last token, values 0: A_t = γ^(L-1-t) · score."""
    mask = ragged_mask()
    scores = np.array([1.0, 2.0, 3.0, -1.0], np.float32)
    rewards = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate(SPANS):
        if e > s:
            rewards[b, e - 1] = scores[b]
    adv, _ = rl.gae(rewards, np.zeros((B, T)), mask, gamma=0.5, lam=1.0)
    for b, (s, e) in enumerate(SPANS):
        for t in range(s, e):
            assert float(adv[b, t]) == pytest.approx(0.5 ** (e - 1 - t) * scores[b])
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_whiten_masked_mean_zero_std_one():
    mask = ragged_mask()
    x = RNG.normal(3.0, 5.0, size=(B, T)).astype(np.float32)
    x = np.where(mask > 0, x, 1e3)  # padding must not leak into the statistics
    w = np.asarray(jax.jit(rl.whiten)(x, mask))
    valid = w[mask > 0]
    assert valid.mean() == pytest.approx(0.0, abs=1e-5)
    assert valid.std(ddof=1) == pytest.approx(1.0, rel=1e-4)  # unbiased, as TRL's masked_whiten
    v = x[mask > 0]
    want = (x - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w, want, rtol=1e-4, atol=1e-4)
    kept = np.asarray(rl.whiten(x, mask, shift_mean=False))[mask > 0]  # rescale only: mean kept
    assert kept.mean() == pytest.approx(v.mean(), rel=1e-4)
    assert kept.std(ddof=1) == pytest.approx(1.0, rel=1e-4)


def test_kl_estimators_reference():
    logp = RNG.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
    ref = RNG.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
    log_r = ref.astype(np.float64) - logp  # log π_ref/π on samples of π
    want = {"k1": -log_r, "k2": 0.5 * log_r**2, "mse": 0.5 * log_r**2,
            "k3": np.exp(log_r) - 1 - log_r, "abs": np.abs(log_r)}
    for kind, ref_val in want.items():
        got = jax.jit(rl.kl_penalty, static_argnames="kind")(logp, ref, kind=kind)
        np.testing.assert_allclose(np.asarray(got), ref_val, rtol=1e-5, atol=1e-6, err_msg=kind)
    assert np.all(np.asarray(rl.kl_penalty(logp, ref, "k3")) >= 0)
    np.testing.assert_array_equal(np.asarray(rl.kl_penalty(logp, logp, "k1")), 0.0)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        rl.kl_penalty(logp, ref, kind="k4")


def test_kl_estimators_are_unbiased_in_expectation():
    """E_π[k1] = E_π[k3] = KL(π || π_ref) for two categorical distributions."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    kl = np.sum(p * np.log(p / q))
    lp, lq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    for kind in ("k1", "k3"):
        assert float(jnp.sum(p * rl.kl_penalty(lp, lq, kind))) == pytest.approx(kl, rel=1e-5)


def test_ppo_policy_loss_clipping():
    eps = 0.2
    adv = np.array([[1.0, 1.0, -1.0, -1.0, 2.0, -2.0]], np.float32)
    ratio = np.array([[1.1, 1.5, 0.9, 0.5, 0.5, 1.5]], np.float32)
    old = np.full_like(ratio, -1.0)
    new = old + np.log(ratio)
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)  # the last token is padding
    out = jax.jit(rl.ppo_policy_loss, static_argnames=("cliprange",))(new, old, adv, mask, cliprange=eps)
    # Within [1-ε, 1+ε] the loss is the unclipped -A·ratio; outside, the pessimistic max of the two:
    #   A>0, ratio 1.5 -> -A·1.2 (clipped); A<0, ratio 0.5 -> -A·0.8 (clipped); A>0, ratio 0.5 -> -A·0.5
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    np.testing.assert_allclose(per_token[0, :5], [-1.1, -1.2, 0.9, 0.8, -1.0], rtol=1e-6)
    loss_sum, count = out["loss"]
    assert float(count) == 5.0
    assert float(loss_sum) == pytest.approx(float(np.sum(per_token * mask)), rel=1e-5)
    assert float(out["clipfrac"][0]) == 2.0  # tokens 1 and 3
    logratio = np.log(ratio)
    assert float(out["approx_kl"][0]) == pytest.approx(float(np.sum(0.5 * logratio**2 * mask)), rel=1e-5)
    assert float(out["ratio"][0]) == pytest.approx(float(np.sum(ratio * mask)), rel=1e-5)
    # all ratios inside the range: the loss is the plain policy-gradient surrogate, no clipping
    small = old + np.log(np.array([[1.05, 0.95, 1.1, 0.9, 1.0, 1.0]], np.float32))
    inside = rl.ppo_policy_loss(small, old, adv, mask, eps)
    assert float(inside["loss"][0]) == pytest.approx(float(np.sum(-adv * np.exp(small - old) * mask)), rel=1e-5)
    assert float(inside["clipfrac"][0]) == 0.0
    # clip-higher: a wider upper bound lets ratio 1.5 with A>0 through
    high = rl.ppo_policy_loss(new, old, adv, mask, eps, cliprange_high=0.6)
    assert float(high["clipfrac"][0]) == 1.0


def test_ppo_policy_loss_gradient_is_zero_when_clipped():
    old = jnp.zeros((1, 2))
    adv = jnp.ones((1, 2))
    g = jax.grad(lambda new: rl.ppo_policy_loss(new, old, adv, jnp.ones((1, 2)), 0.2)["loss"][0])(
        jnp.log(jnp.array([[1.1, 1.5]])))
    assert float(g[0, 0]) == pytest.approx(-1.1, rel=1e-5)  # d(-ratio)/d logp = -ratio
    assert float(g[0, 1]) == 0.0


def test_ppo_value_loss_reference():
    mask = ragged_mask()
    v, old, ret = (RNG.normal(size=(B, T)).astype(np.float32) for _ in range(3))
    c = 0.2
    out = jax.jit(rl.ppo_value_loss, static_argnames="cliprange_value")(v, old, ret, mask, cliprange_value=c)
    v_clip = old + np.clip(v - old, -c, c)
    l1, l2 = (v - ret) ** 2, (v_clip - ret) ** 2
    assert float(out["loss"][0]) == pytest.approx(float(np.sum(0.5 * np.maximum(l1, l2) * mask)), rel=1e-5)
    assert float(out["loss"][1]) == mask.sum()
    assert float(out["clipfrac"][0]) == float(np.sum((l2 > l1) * mask))
    unclipped = rl.ppo_value_loss(old + 0.1, old, ret, mask, cliprange_value=c)  # |v - old| < c
    assert float(unclipped["loss"][0]) == pytest.approx(float(np.sum(0.5 * (old + 0.1 - ret) ** 2 * mask)),
                                                        rel=1e-5)


def test_loss_sums_accumulate_exactly():
    """Two microbatches' (sum, count) pairs added give the full batch's token mean."""
    mask = ragged_mask()
    new, old, adv = (RNG.normal(size=(B, T)).astype(np.float32) * 0.3 for _ in range(3))
    full = rl.ppo_policy_loss(new, old, adv, mask, 0.2)["loss"]
    parts = [rl.ppo_policy_loss(new[s], old[s], adv[s], mask[s], 0.2)["loss"] for s in (slice(0, 1), slice(1, B))]
    mean_parts = (parts[0][0] + parts[1][0]) / (parts[0][1] + parts[1][1])
    assert float(mean_parts) == pytest.approx(float(full[0] / full[1]), rel=1e-5)


def test_grpo_advantages_reference():
    g = 4
    scores = RNG.normal(size=3 * g).astype(np.float32)
    got = jax.jit(rl.grpo_advantages, static_argnames=("group_size", "scale_rewards"))(scores, g)
    grouped = scores.reshape(-1, g)
    want = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)  # TRL
    np.testing.assert_allclose(np.asarray(got), want.reshape(-1), rtol=1e-5, atol=1e-6)
    centered = rl.grpo_advantages(scores, g, scale_rewards=False)
    np.testing.assert_allclose(np.asarray(centered), (grouped - grouped.mean(1, keepdims=True)).reshape(-1),
                               rtol=1e-5, atol=1e-6)
    same = rl.grpo_advantages(np.ones(8), 4)  # a group with equal scores has no signal
    np.testing.assert_array_equal(np.asarray(same), 0.0)
    with pytest.raises(ValueError, match="divisible by group_size=5"):
        rl.grpo_advantages(scores, 5)


def test_rloo_advantages_reference():
    g = 3
    scores = RNG.normal(size=2 * g).astype(np.float32)
    got = np.asarray(jax.jit(rl.rloo_advantages, static_argnames="group_size")(scores, g))
    want = np.zeros_like(scores)
    for i in range(scores.size):  # s_i minus the mean of the other members of its group
        grp = range((i // g) * g, (i // g + 1) * g)
        want[i] = scores[i] - np.mean([scores[j] for j in grp if j != i])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # RLOO = k/(k-1) times the mean-centered score
    np.testing.assert_allclose(got, g / (g - 1) * np.asarray(rl.grpo_advantages(scores, g, scale_rewards=False)),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=">= 2"):
        rl.rloo_advantages(scores, 1)


def test_explained_variance():
    mask = ragged_mask()
    ret = RNG.normal(size=(B, T)).astype(np.float32)
    values = ret + 0.1 * RNG.normal(size=(B, T)).astype(np.float32)
    r, d = ret[mask > 0], (ret - values)[mask > 0]
    assert float(rl.explained_variance(values, ret, mask)) == pytest.approx(1 - d.var() / r.var(), rel=1e-4)
    assert float(rl.explained_variance(ret, ret, mask)) == pytest.approx(1.0)
    assert np.isnan(float(rl.explained_variance(values, np.ones((B, T)), mask)))


def test_adaptive_kl_controller_update_sequence():
    ctl = rl.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    expected = 0.2
    for kl, n in [(12.0, 256), (6.0, 256), (3.0, 512), (5.4, 128)]:
        err = np.clip(kl / 6.0 - 1, -0.2, 0.2)  # Ziegler et al.: proportional error, clipped
        expected *= 1 + err * n / 10000
        assert ctl.update(kl, n) == pytest.approx(expected)
        assert ctl.value == pytest.approx(expected)
    assert expected == pytest.approx(0.2 * (1 + 0.2 * 256 / 1e4) * 1 * (1 - 0.2 * 512 / 1e4) * (1 - 0.1 * 128 / 1e4))
    fixed = rl.FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05
    with pytest.raises(ValueError, match="positive"):
        rl.AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_gae_then_whiten_composes_under_jit():
    mask = ragged_mask()
    r, v = RNG.normal(size=(B, T)), RNG.normal(size=(B, T))
    w = np.asarray(jax.jit(lambda r, v, m: rl.whiten(rl.gae(r, v, m)[0], m))(r, v, mask))
    assert np.isfinite(w).all() and abs(w[mask > 0].mean()) < 1e-5


# ---------------------------------------------------------------------------- TRL's GRPO / RLOO losses

# Fixed inputs: 4 sequences of up to 5 tokens (ragged), advantages of both signs, ratios far enough
# from 1 that both clip bounds act.
NEW = np.array([[-1.0, -0.4, -2.0, -0.3, -1.1], [-0.2, -0.9, -1.5, 0.0, 0.0],
                [-2.2, -0.1, -0.6, -0.8, 0.0], [-0.7, -1.4, 0.0, 0.0, 0.0]], np.float32)
OLD = np.array([[-1.2, -0.3, -1.6, -0.5, -1.0], [-0.4, -1.0, -1.1, 0.0, 0.0],
                [-2.0, -0.3, -0.9, -0.8, 0.0], [-0.6, -1.0, 0.0, 0.0, 0.0]], np.float32)
REF = OLD - np.float32(0.1) * np.arange(5, dtype=np.float32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
ADV = np.array([1.0, -0.5, 0.8, -1.2], np.float32)


def test_rloo_loss_is_trls_sequence_level_loss():
    """TRL RLOOTrainer._compute_loss: logps = Σ_t logp_t; coef_1 = exp(logps - old_logps);
    loss = mean_i -min(coef_1 A, clamp(coef_1, 1 - eps, 1 + eps_high) A)."""
    import torch

    logps, old_logps = ((torch.tensor(x) * torch.tensor(MASK)).sum(1) for x in (NEW, OLD))
    adv = torch.tensor(ADV)
    for eps_high in (0.2, 0.28):
        coef_1 = torch.exp(logps - old_logps)
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + eps_high)
        want = (-torch.min(coef_1 * adv, coef_2 * adv)).mean().item()
        got = rl.sequence_policy_loss(NEW, OLD, ADV, MASK, 0.2, eps_high)
        assert float(got["loss"][0] / got["loss"][1]) == pytest.approx(want, rel=1e-5)
        clipped = ((coef_1 < 0.8) & (adv < 0)) | ((coef_1 > 1 + eps_high) & (adv > 0))  # TRL's region clip ratio
        assert float(got["clipfrac"][0] / got["clipfrac"][1]) == pytest.approx(clipped.float().mean().item())
    token_level = rl.ppo_policy_loss(NEW, OLD, ADV[:, None] * MASK, MASK, 0.2)["loss"]
    assert abs(float(token_level[0] / token_level[1]) - want) > 0.01  # what RLOO computed before


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_types_are_trls(loss_type):
    """TRL GRPOTrainer._compute_loss (token-level ratios, epsilon_high, beta * k3 KL added per
    token), aggregated per loss_type; dapo's normaliser is the rollout's tokens over its
    minibatches (here 40 tokens in 2 minibatches)."""
    import torch

    new, old, ref, mask = map(torch.tensor, (NEW, OLD, REF, MASK))
    adv = torch.tensor(ADV).unsqueeze(1)
    beta, eps_low, eps_high, max_len = 0.04, 0.2, 0.28, 5
    coef_1 = torch.exp(new - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_kl = torch.exp(ref - new) - (ref - new) - 1
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) + beta * per_token_kl
    want = {"grpo": ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(),
            "bnpo": (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0),
            "dr_grpo": (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len),
            "dapo": (per_token_loss * mask).sum() / (40 / 2)}[loss_type].item()
    row_norm = np.full(4, 40 / 8, np.float32)  # 40 rollout tokens over 8 rollout rows
    pg = rl.ppo_policy_loss(NEW, OLD, ADV[:, None] * MASK, MASK, eps_low, eps_high, loss_type, row_norm)["loss"]
    kl = rl.aggregate(rl.kl_penalty(NEW, REF, kind="k3"), MASK, loss_type, row_norm)
    assert float(kl[1]) == float(pg[1])  # one count: the terms add
    assert float((pg[0] + beta * kl[0]) / pg[1]) == pytest.approx(want, rel=1e-5)


def test_grpo_scale_rewards_batch():
    """TRL scale_rewards="batch": (s - group mean) / (std over the whole batch + 1e-4)."""
    scores = RNG.normal(size=12).astype(np.float32)
    grouped = scores.reshape(-1, 4)
    want = (grouped - grouped.mean(1, keepdims=True)).reshape(-1) / (scores.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(np.asarray(rl.grpo_advantages(scores, 4, scale_rewards="batch")), want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(rl.grpo_advantages(scores, 4, scale_rewards=True)),
                                  np.asarray(rl.grpo_advantages(scores, 4, scale_rewards="group")))
