"""Pairwise preference losses: the DPO family (with ORPO) and the Bradley–Terry reward-model
loss, KTO's loss on unpaired feedback, plus the length-bias metrics reported at eval.

Pure functions of per-pair scalars `[B]` (pair `i` = chosen `i` vs rejected `i`); the
math is f32 whatever the input dtype. Everything except `length_bias_metrics` (host-side
NumPy) is jittable, with `loss_type` and the other Python-number settings static.

Notation used below, per pair:
    π_c, π_r     policy log-probs of the chosen / rejected response
    ref_c, ref_r the same under the reference model
    h = (π_c - π_r) - (ref_c - ref_r)      the DPO log-ratio margin
    σ = sigmoid, log σ = `jax.nn.log_sigmoid` (numerically stable)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "orpo")
"""Every `loss_type` `dpo` accepts."""

LENGTH_NORMALIZED_LOSS_TYPES = ("ipo", "simpo", "orpo")
"""Loss types whose log-probs should be length-averaged (sum over response tokens / number
of response tokens) by the caller; every other type expects plain sums over the response."""

REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")
"""Loss types that ignore the reference log-probs (they may be None)."""

_LOG_PROB_CAP = -1e-6
"""ORPO's odds need log p < 0: average log-probs are capped here (p = 1 would give log(1 - p) = -inf)."""


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
        beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.0,
        discopop_tau: float = 0.05, margin=None):
    """Per-pair DPO-family losses `[B]` and implicit rewards `[B]`, `[B]`.

    Args:
      policy_chosen_logps, policy_rejected_logps: `[B]` policy log-probs of each response.
      ref_chosen_logps, ref_rejected_logps: `[B]` reference log-probs (None only for
        reference-free types, see `REFERENCE_FREE_LOSS_TYPES`).
      beta: β, the inverse temperature / KL strength (τ of IPO).
      loss_type: one of `DPO_LOSS_TYPES`.
      label_smoothing: ε, the assumed probability that a label is flipped (sigmoid = cDPO,
        robust, exo_pair, aot, aot_unpaired, simpo).
      simpo_gamma: γ, SimPO's target reward margin (TRL's CPOConfig default is 0.5).
      discopop_tau: τ of DiscoPOP's log-ratio modulation (TRL default 0.05).
      margin: optional `[B]` offset m ("sigmoid" only): z = βh - m, so the chosen response must
        win by m (ODPO, Amini et al. 2024, arXiv:2402.10571, with m from score gaps).

    The formula is applied to the log-probs as given. What to pass (TRL 1.16 conventions):
      - sums over response tokens: every type except those below;
      - length-averaged (sum / #response tokens): "ipo" (TRL divides IPO's log-ratios by the
        completion length inside its loss) and "simpo" (SimPO's π is length-normalized).
      `LENGTH_NORMALIZED_LOSS_TYPES` lists the latter. TRL's "sigmoid_norm" is "sigmoid" given
      length-averaged log-probs. Rewards are computed from the inputs as given, so for ipo
      they are per-token (TRL logs β times the summed log-ratios there).

    Losses (z = βh; TRL `DPOTrainer._compute_loss`, `CPOTrainer.cpo_loss`):
      sigmoid   -(1-ε) log σ(z) - ε log σ(-z)    DPO, Rafailov et al. 2023 (arXiv:2305.18290);
                                                 ε > 0 is conservative DPO (cDPO, Mitchell 2023),
                                                 as TRL < 1.0 had it (TRL 1.16's sigmoid ignores ε)
      hinge     relu(1 - z)                      SLiC, Zhao et al. 2023 (arXiv:2305.10425)
      ipo       (h - 1/(2β))^2                   IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17
      robust    (-(1-ε) log σ(z) + ε log σ(-z)) / (1-2ε)
                                                 rDPO, Chowdhury et al. 2024 (arXiv:2403.00409)
      simpo     -(1-ε) log σ(β(π_c-π_r) - γ) - ε log σ(-(β(π_c-π_r) - γ))
                                                 SimPO, Meng et al. 2024 (arXiv:2405.14734);
                                                 reference-free, π length-averaged
      exo_pair  σ(z)(log σ(z) - log(1-ε)) + σ(-z)(log σ(-z) - log ε)
                                                 EXO, Ji et al. 2024 (arXiv:2402.00856), Eq. 16; needs ε > 0
      nca_pair  -log σ(r_c) - ½ log σ(-r_c) - ½ log σ(-r_r)
                                                 NCA, Chen et al. 2024 (arXiv:2402.05369)
      bco_pair  -log σ(r_c) - log σ(-r_r)        BCO, Jung et al. 2024 (arXiv:2404.04656), TRL's paired form
      sppo_hard (ρ_c - 1/(2β))^2 + (ρ_r + 1/(2β))^2
                                                 SPPO, Wu et al. 2024 (arXiv:2405.00675), hard labels
      aot       sigmoid form on sort(π_c-π_r) - sort(ref_c-ref_r) (sorted over the batch)
      aot_unpaired  sigmoid form on sort(ρ_c) - sort(ρ_r)
                                                 AOT, Melnyk et al. 2024 (arXiv:2406.05882)
      apo_zero  (1 - σ(βρ_c)) + σ(βρ_r)         APO, D'Oosterlinck et al. 2024 (arXiv:2408.06266), Eq. 7
      apo_down  σ(βρ_c) + (1 - σ(β(ρ_c - ρ_r)))  ditto, Eq. 8
      discopop  (1-m) (-log σ(z)) + m exp(-z), m = σ(z/τ)
                                                 DiscoPOP, Chris Lu et al. 2024 (arXiv:2406.08414), Eq. 5
      orpo      -β log σ(o), o = `orpo_log_odds(π_c, π_r)`
                                                 ORPO's odds-ratio term, Hong et al. 2024 (arXiv:2403.07691),
                                                 Eq. 6-7 (β is their λ, TRL's ORPOConfig.beta); reference-free,
                                                 π length-averaged. ORPO's loss adds the chosen reply's NLL
                                                 per token, which the DPO objective does (`nll_loss`)
    with ρ = π - ref (per-response log-ratio) and r = βρ.

    Returns:
      (losses, chosen_rewards, rejected_rewards), each `[B]` f32. Rewards are β(π - ref)
      (for simpo: βπ), the quantities TRL logs as rewards/chosen and rewards/rejected; they are
      not stop-gradient'ed (wrap in `jax.lax.stop_gradient` when logging). The batch loss is
      `losses.mean()` (TRL's reduction); at policy == reference, "sigmoid" gives ln 2.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo: unknown loss_type={loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if margin is not None and loss_type != "sigmoid":
        raise ValueError(f"dpo: a margin (offset) works with loss_type='sigmoid' only, got loss_type={loss_type!r}")
    _check_smoothing(loss_type, label_smoothing)
    eps = label_smoothing
    pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
    log_sig = jax.nn.log_sigmoid

    def smoothed_sigmoid(logits):  # -(1-ε) log σ(x) - ε log σ(-x)
        return -(1.0 - eps) * log_sig(logits) - eps * log_sig(-logits)

    if loss_type == "simpo":
        z = beta * (pc - pr) - simpo_gamma
        return smoothed_sigmoid(z), beta * pc, beta * pr
    if loss_type == "orpo":
        return -beta * log_sig(orpo_log_odds(pc, pr)), beta * pc, beta * pr

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"dpo: loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps; "
                         f"only {', '.join(REFERENCE_FREE_LOSS_TYPES)} is reference-free")
    rc, rr = _f32(ref_chosen_logps), _f32(ref_rejected_logps)
    rho_c, rho_r = pc - rc, pr - rr  # per-response log-ratios
    h = rho_c - rho_r
    z = beta * h
    chosen_rewards, rejected_rewards = beta * rho_c, beta * rho_r

    if loss_type == "sigmoid":
        losses = smoothed_sigmoid(z if margin is None else z - _f32(margin))
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - z)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * log_sig(z) + eps * log_sig(-z)) / (1.0 - 2.0 * eps)
    elif loss_type == "exo_pair":
        losses = (jax.nn.sigmoid(z) * (log_sig(z) - jnp.log1p(-eps))
                  + jax.nn.sigmoid(-z) * (log_sig(-z) - jnp.log(eps)))
    elif loss_type == "nca_pair":
        losses = -log_sig(chosen_rewards) - 0.5 * log_sig(-chosen_rewards) - 0.5 * log_sig(-rejected_rewards)
    elif loss_type == "bco_pair":
        losses = -log_sig(chosen_rewards) - log_sig(-rejected_rewards)
    elif loss_type == "sppo_hard":
        losses = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    elif loss_type == "aot":
        delta = jnp.sort(pc - pr) - jnp.sort(rc - rr)
        losses = smoothed_sigmoid(beta * delta)
    elif loss_type == "aot_unpaired":
        delta = jnp.sort(rho_c) - jnp.sort(rho_r)
        losses = smoothed_sigmoid(beta * delta)
    elif loss_type == "apo_zero":
        losses = (1.0 - jax.nn.sigmoid(chosen_rewards)) + jax.nn.sigmoid(rejected_rewards)
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(chosen_rewards) + (1.0 - jax.nn.sigmoid(z))
    else:  # discopop
        modulation = jax.nn.sigmoid(z / discopop_tau)
        losses = -log_sig(z) * (1.0 - modulation) + jnp.exp(-z) * modulation
    return losses, chosen_rewards, rejected_rewards


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPOTrainer)."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_log_odds(chosen_logps, rejected_logps):
    """ORPO's log odds ratio `[B]`: log(odds(y_c) / odds(y_r)), odds(y) = p / (1 - p), from the
    average per-token log-probs `[B]` of each response (capped just below 0)."""
    pc = jnp.minimum(_f32(chosen_logps), _LOG_PROB_CAP)
    pr = jnp.minimum(_f32(rejected_logps), _LOG_PROB_CAP)
    return (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))


def _check_smoothing(loss_type: str, eps) -> None:
    try:
        eps = float(eps)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced under jit: the caller is responsible
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"dpo: label_smoothing={eps} must lie in [0, 1]")
    if loss_type == "robust" and eps >= 0.5:
        raise ValueError(f"dpo: loss_type='robust' needs label_smoothing < 0.5 (it divides by 1 - 2ε), got {eps}")
    if loss_type == "exo_pair" and eps <= 0.0:
        raise ValueError("dpo: loss_type='exo_pair' needs label_smoothing > 0 (log ε); TRL suggests 1e-3")


# ---------------------------------------------------------------------------- KTO


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto(policy_logps, ref_logps, desirable, reference_point, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0, loss_type: str = "kto"):
    """Per-example KTO losses `[B]` and implicit rewards `[B]` for unpaired feedback.

    Args:
      policy_logps, ref_logps: `[B]` summed response log-probs under the policy / reference.
      desirable: `[B]` bool (or 1/0): the example's label.
      reference_point: z0, a scalar (see `kto_reference_point`), a constant here.
      beta, desirable_weight, undesirable_weight: β, λ_D, λ_U.
      loss_type: "kto" or "apo_zero_unpaired" (TRL's names).

    With ρ = π - ref (KTO, Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7; TRL's
    `KTOTrainer`, loss_type "kto"):
      desirable    λ_D (1 - σ(β(ρ - z0)))
      undesirable  λ_U (1 - σ(β(z0 - ρ)))
    "apo_zero_unpaired" (APO-zero, D'Oosterlinck et al. 2024, arXiv:2408.06266, unpaired):
    the same with z0 = 0 except that an undesirable example's loss is λ_U σ(βρ), so it
    needs no reference point (use it when the desirable outputs beat the model's own).
    Rewards are βρ. The batch loss is `losses.mean()` over the examples (TRL's reduction).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"kto loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    rho = _f32(policy_logps) - _f32(ref_logps)
    good = jnp.asarray(desirable).astype(bool)
    if loss_type == "apo_zero_unpaired":
        losses = jnp.where(good, desirable_weight * (1.0 - jax.nn.sigmoid(beta * rho)),
                           undesirable_weight * jax.nn.sigmoid(beta * rho))
        return losses, beta * rho
    z0 = jax.lax.stop_gradient(_f32(reference_point))
    losses = jnp.where(good, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (rho - z0))),
                       undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - rho))))
    return losses, beta * rho


def kto_reference_point(kl_logps, ref_kl_logps, valid=None):
    """KTO's reference point z0: max(0, mean(π(y'|x) - ref(y'|x))) over mismatched pairs
    (prompt x with another example's completion y'), `[B]` summed log-probs each; `valid`
    `[B]` masks padding rows. No gradient flows through it (TRL computes it under no_grad)."""
    diff = _f32(kl_logps) - _f32(ref_kl_logps)
    if valid is None:
        mean = jnp.mean(diff)
    else:
        mean = jnp.sum(jnp.where(valid, diff, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


# ---------------------------------------------------------------------------- reward model


def reward_pairwise(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient: float | None = 0.0):
    """Bradley–Terry reward-model loss per pair `[B]`.

    losses_i = -log σ(r_c,i - r_r,i - margin_i) + coef * (r_c,i + r_r,i)^2

    chosen_rewards, rejected_rewards: `[B]` scalar scores (the reward head at the last
    non-pad token). margin: optional `[B]` (Llama 2's preference-strength margin,
    Touvron et al. 2023, arXiv:2307.09288). center_rewards_coefficient: Eisenstein et al.
    2023 (arXiv:2312.09244) auxiliary term pushing scores toward mean zero. `losses.mean()`
    equals TRL's `RewardTrainer.compute_loss` (InstructGPT, Ouyang et al. 2022, Eq. 1).
    """
    rc, rr = _f32(chosen_rewards), _f32(rejected_rewards)
    diff = rc - rr
    if margin is not None:
        diff = diff - _f32(margin)
    losses = -jax.nn.log_sigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (rc + rr) ** 2
    return losses


def reward_metrics(chosen_rewards, rejected_rewards) -> dict:
    """Scalar batch metrics of pairwise scores `[B]` (TRL RewardTrainer's names):
    accuracy = mean(r_c > r_r) (ties count as wrong), margin = mean(r_c - r_r),
    chosen / rejected = mean score of each side."""
    rc, rr = _f32(chosen_rewards), _f32(rejected_rewards)
    return {"accuracy": jnp.mean((rc > rr).astype(jnp.float32)), "margin": jnp.mean(rc - rr),
            "chosen": jnp.mean(rc), "rejected": jnp.mean(rr)}


# ---------------------------------------------------------------------------- length bias


def length_bias_metrics(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths) -> dict:
    """How much a preference score (RM score or DPO implicit reward) tracks response length.

    Host-side NumPy, for eval. Inputs are `[B]`; lengths count response tokens.
      length_correlation      Pearson r of score vs length over all 2B responses (nan when
                              either has zero variance)
      accuracy_chosen_shorter mean(score_c > score_r) over pairs with len_c < len_r (nan if none):
                              a length-biased scorer does badly here
      accuracy_chosen_longer  the same over pairs with len_c > len_r (nan if none)
      frac_chosen_shorter     fraction of pairs with len_c < len_r
      accuracy                mean(score_c > score_r) over all pairs
    """
    sc, sr = np.asarray(chosen_scores, np.float64), np.asarray(rejected_scores, np.float64)
    lc, lr = np.asarray(chosen_lengths, np.float64), np.asarray(rejected_lengths, np.float64)
    if not (sc.shape == sr.shape == lc.shape == lr.shape) or sc.ndim != 1:
        raise ValueError(f"length_bias_metrics: expected four [B] arrays, got shapes "
                         f"{sc.shape}, {sr.shape}, {lc.shape}, {lr.shape}")
    scores, lengths = np.concatenate([sc, sr]), np.concatenate([lc, lr])
    ds, dl = scores - scores.mean(), lengths - lengths.mean()
    denom = np.sqrt(np.sum(ds * ds) * np.sum(dl * dl))
    corr = float(np.sum(ds * dl) / denom) if denom > 0 else float("nan")
    correct = sc > sr
    shorter, longer = lc < lr, lc > lr

    def acc(sel):
        return float(np.mean(correct[sel])) if np.any(sel) else float("nan")

    return {"length_correlation": corr, "accuracy_chosen_shorter": acc(shorter),
            "accuracy_chosen_longer": acc(longer),
            "frac_chosen_shorter": float(np.mean(shorter)) if sc.size else float("nan"),
            "accuracy": acc(np.ones_like(correct))}
