"""Preference losses (jaxalign.losses): the DPO family, the Bradley–Terry reward loss and the
length-bias metrics, against NumPy references written from the papers / TRL, and against
TRL 1.16's own code (DPOTrainer._compute_loss, CPOTrainer.cpo_loss, RewardTrainer.compute_loss)
driven with a stand-in model that returns given log-probs."""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

B, L = 8, 6
BETA = 0.3
RNG = np.random.default_rng(0)


def log_sig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_pairs(seed=0):
    """Per-token log-probs of 2B responses (chosen rows first) with ragged lengths, and
    reference sequence log-probs; returns a namespace of NumPy arrays."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, L + 1, size=2 * B)
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.float32)
    tok = (rng.normal(size=(2 * B, L)) - 2.0).astype(np.float32) * mask
    seq = tok.sum(1)
    ref = (seq + rng.normal(size=2 * B)).astype(np.float32)
    return types.SimpleNamespace(tok=tok, mask=mask, lens=lens.astype(np.float32), pc=seq[:B], pr=seq[B:],
                                 rc=ref[:B], rr=ref[B:], len_c=lens[:B].astype(np.float32),
                                 len_r=lens[B:].astype(np.float32))


def inputs_for(loss_type, p):
    """The log-probs the trainer passes: length-averaged for ipo/simpo, sums otherwise."""
    if loss_type in losses.LENGTH_NORMALIZED_LOSS_TYPES:
        return p.pc / p.len_c, p.pr / p.len_r, p.rc / p.len_c, p.rr / p.len_r
    return p.pc, p.pr, p.rc, p.rr


def smoothed(x, eps):
    return -(1 - eps) * log_sig(x) - eps * log_sig(-x)


# Settings per loss type: label smoothing ε and the NumPy reference (β, ε, γ, τ fixed below).
GAMMA, TAU = 0.4, 0.05
CASES = {
    # name: (loss_type, ε, reference(pc, pr, rc, rr) -> losses)
    "sigmoid": ("sigmoid", 0.0, lambda pc, pr, rc, rr: -log_sig(BETA * ((pc - pr) - (rc - rr)))),
    "cdpo": ("sigmoid", 0.1, lambda pc, pr, rc, rr: -(0.9) * log_sig(BETA * ((pc - pr) - (rc - rr)))
             - 0.1 * log_sig(-BETA * ((pc - pr) - (rc - rr)))),
    "hinge": ("hinge", 0.0, lambda pc, pr, rc, rr: np.maximum(0.0, 1 - BETA * ((pc - pr) - (rc - rr)))),
    "ipo": ("ipo", 0.0, lambda pc, pr, rc, rr: (((pc - pr) - (rc - rr)) - 1 / (2 * BETA)) ** 2),
    "robust": ("robust", 0.1, lambda pc, pr, rc, rr: ((1 - 0.1) * -log_sig(BETA * ((pc - pr) - (rc - rr)))
                                                      + 0.1 * log_sig(-BETA * ((pc - pr) - (rc - rr)))) / (1 - 0.2)),
    "simpo": ("simpo", 0.0, lambda pc, pr, rc, rr: -log_sig(BETA * (pc - pr) - GAMMA)),
    "simpo_smoothed": ("simpo", 0.1, lambda pc, pr, rc, rr: smoothed(BETA * (pc - pr) - GAMMA, 0.1)),
    "exo_pair": ("exo_pair", 1e-3, lambda pc, pr, rc, rr: (
        sig(BETA * ((pc - pr) - (rc - rr))) * (log_sig(BETA * ((pc - pr) - (rc - rr))) - np.log(1 - 1e-3))
        + sig(-BETA * ((pc - pr) - (rc - rr))) * (log_sig(-BETA * ((pc - pr) - (rc - rr))) - np.log(1e-3)))),
    "nca_pair": ("nca_pair", 0.0, lambda pc, pr, rc, rr: -log_sig(BETA * (pc - rc)) - 0.5 * log_sig(-BETA * (pc - rc))
                 - 0.5 * log_sig(-BETA * (pr - rr))),
    "bco_pair": ("bco_pair", 0.0, lambda pc, pr, rc, rr: -log_sig(BETA * (pc - rc)) - log_sig(-BETA * (pr - rr))),
    "sppo_hard": ("sppo_hard", 0.0, lambda pc, pr, rc, rr: (pc - rc - 0.5 / BETA) ** 2 + (pr - rr + 0.5 / BETA) ** 2),
    "aot": ("aot", 0.1, lambda pc, pr, rc, rr: smoothed(BETA * (np.sort(pc - pr) - np.sort(rc - rr)), 0.1)),
    "aot_unpaired": ("aot_unpaired", 0.1,
                     lambda pc, pr, rc, rr: smoothed(BETA * (np.sort(pc - rc) - np.sort(pr - rr)), 0.1)),
    "apo_zero": ("apo_zero", 0.0, lambda pc, pr, rc, rr: 1 - sig(BETA * (pc - rc)) + sig(BETA * (pr - rr))),
    "apo_down": ("apo_down", 0.0, lambda pc, pr, rc, rr: sig(BETA * (pc - rc))
                 + 1 - sig(BETA * ((pc - rc) - (pr - rr)))),
    "discopop": ("discopop", 0.0, lambda pc, pr, rc, rr: (
        -log_sig(BETA * ((pc - pr) - (rc - rr))) * (1 - sig(BETA * ((pc - pr) - (rc - rr)) / TAU))
        + np.exp(-BETA * ((pc - pr) - (rc - rr))) * sig(BETA * ((pc - pr) - (rc - rr)) / TAU))),
    # ORPO's odds-ratio term, Hong et al. 2024 Eq. 6-7: odds(y) = p / (1 - p) on average log-probs
    "orpo": ("orpo", 0.0, lambda pc, pr, rc, rr: -BETA * log_sig(
        (pc - np.log1p(-np.exp(pc))) - (pr - np.log1p(-np.exp(pr))))),
}


def call_dpo(loss_type, eps, pc, pr, rc, rr, jit=False):
    fn = lambda *a: losses.dpo(*a, beta=BETA, loss_type=loss_type, label_smoothing=eps, simpo_gamma=GAMMA,  # noqa: E731
                               discopop_tau=TAU)
    if jit:
        fn = jax.jit(fn)
    return [np.asarray(x) for x in fn(*(jnp.asarray(x) for x in (pc, pr, rc, rr)))]


def test_every_loss_type_has_a_case():
    assert {c[0] for c in CASES.values()} == set(losses.DPO_LOSS_TYPES)


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_matches_numpy_reference(case):
    loss_type, eps, ref_fn = CASES[case]
    p = make_pairs()
    pc, pr, rc, rr = inputs_for(loss_type, p)
    got, rew_c, rew_r = call_dpo(loss_type, eps, pc, pr, rc, rr, jit=True)
    want = ref_fn(*(x.astype(np.float64) for x in (pc, pr, rc, rr)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert got.shape == (B,) and got.dtype == np.float32
    if loss_type in losses.REFERENCE_FREE_LOSS_TYPES:  # simpo, orpo: reward β π
        np.testing.assert_allclose(rew_c, BETA * pc, rtol=1e-6)
        np.testing.assert_allclose(rew_r, BETA * pr, rtol=1e-6)
    else:  # implicit reward: β (π - π_ref)
        np.testing.assert_allclose(rew_c, BETA * (pc - rc), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rew_r, BETA * (pr - rr), rtol=1e-5, atol=1e-6)


def test_sigmoid_loss_is_ln2_when_policy_equals_reference():
    p = make_pairs()
    got, rew_c, rew_r = call_dpo("sigmoid", 0.0, p.pc, p.pr, p.pc, p.pr)
    np.testing.assert_allclose(got, np.full(B, math.log(2.0)), rtol=1e-6)
    np.testing.assert_array_equal(rew_c, 0.0)
    np.testing.assert_array_equal(rew_r, 0.0)


def test_simpo_is_reference_free_and_others_need_a_reference():
    p = make_pairs()
    got, _, _ = call_dpo("simpo", 0.0, p.pc, p.pr, p.rc, p.rr)
    free, _, _ = [np.asarray(x) for x in losses.dpo(p.pc, p.pr, None, None, beta=BETA, loss_type="simpo",
                                                      simpo_gamma=GAMMA)]
    np.testing.assert_array_equal(got, free)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        losses.dpo(p.pc, p.pr, None, None, loss_type="sigmoid")


def test_dpo_bad_settings_say_what_is_valid():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="unknown loss_type='sigmod'.*sigmoid, hinge, ipo, robust, simpo"):
        losses.dpo(x, x, x, x, loss_type="sigmod")
    with pytest.raises(ValueError, match="robust.*< 0.5"):
        losses.dpo(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair.*> 0"):
        losses.dpo(x, x, x, x, loss_type="exo_pair")


def test_dpo_gradient_at_reference_points_toward_chosen():
    """d loss / d π_c = -β σ(-βh) (< 0) and d loss / d π_r = +β σ(-βh): at h = 0 both are β/2."""
    p = make_pairs()
    g = jax.grad(lambda pc, pr: losses.dpo(pc, pr, p.pc, p.pr, beta=BETA)[0].sum(), argnums=(0, 1))(
        jnp.asarray(p.pc), jnp.asarray(p.pr))
    np.testing.assert_allclose(g[0], -BETA / 2, rtol=1e-6)
    np.testing.assert_allclose(g[1], BETA / 2, rtol=1e-6)


# ---------------------------------------------------------------------------- TRL cross-check


def trl_dpo_mean(loss_type, eps, p):
    """TRL 1.16 DPOTrainer._compute_loss on these per-token log-probs -> (mean loss, metrics).

    `self` only supplies config attributes and metric buffers; the model is a stand-in whose
    `log_probs` are p.tok (0 outside each completion); reference log-probs are "precomputed".
    """
    torch = pytest.importorskip("torch")
    trainer_mod = pytest.importorskip("trl.trainer.dpo_trainer")
    n = 2 * B
    outputs = types.SimpleNamespace(log_probs=torch.tensor(p.tok), entropy=torch.zeros(n, L),
                                    mean_logits=torch.zeros(n, L), is_top1=torch.zeros(n, L, dtype=torch.bool))
    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), ref_model=None,
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=BETA, label_smoothing=eps, use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=TAU), _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    completion_mask = np.concatenate([np.zeros((n, 1)), p.mask], axis=1)  # position 0: the prompt
    inputs = {"input_ids": torch.zeros(n, L + 1, dtype=torch.long),
              "attention_mask": torch.ones(n, L + 1, dtype=torch.long),
              "completion_mask": torch.tensor(completion_mask, dtype=torch.long),
              "ref_chosen_logps": torch.tensor(p.rc), "ref_rejected_logps": torch.tensor(p.rr)}
    loss = trainer_mod.DPOTrainer._compute_loss(fake_self, lambda **kw: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in fake_self._metrics["train"].items()}


# simpo lives in TRL's CPOTrainer (below); cDPO is gone from TRL 1.16, whose "sigmoid" ignores
# label_smoothing (it documents it for robust and exo only): the NumPy reference covers cDPO.
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("simpo", "simpo_smoothed", "cdpo", "orpo")])
def test_dpo_matches_trl_dpo_trainer(case):
    loss_type, eps, _ = CASES[case]
    p = make_pairs(seed=1)
    want, metrics = trl_dpo_mean(loss_type, eps, p)
    got, rew_c, rew_r = call_dpo(loss_type, eps, *inputs_for(loss_type, p))  # ipo: length-averaged inputs
    np.testing.assert_allclose(got.mean(), want, rtol=1e-5, atol=1e-6)
    if loss_type != "ipo":  # TRL logs β·(sum log-ratio) rewards even for ipo; ours follow our inputs
        np.testing.assert_allclose(rew_c.mean(), metrics["rewards/chosen"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rew_r.mean(), metrics["rewards/rejected"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_trl_cpo_loss(eps):
    torch = pytest.importorskip("torch")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    p = make_pairs(seed=2)
    pc, pr, _, _ = inputs_for("simpo", p)
    fake_self = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=GAMMA, beta=BETA,
                                      label_smoothing=eps, accelerator=types.SimpleNamespace(device="cpu"))
    want = [t.numpy() for t in cpo.CPOTrainer.cpo_loss(fake_self, torch.tensor(pc), torch.tensor(pr))]
    got = losses.dpo(pc, pr, beta=BETA, loss_type="simpo", label_smoothing=eps, simpo_gamma=GAMMA)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)


def test_orpo_matches_trl_orpo_trainer():
    """TRL 1.16 ORPOTrainer: loss = nll - mean(odds_ratio_loss) (its losses are +β log σ(o));
    rewards β·π and the logged log_odds_ratio / log_odds_chosen, on average log-probs."""
    torch = pytest.importorskip("torch")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    p = make_pairs(seed=4)
    pc, pr, _, _ = inputs_for("orpo", p)
    nll = -pc  # the chosen NLL per token, as the objective adds it
    fake_self = types.SimpleNamespace(beta=BETA, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_rc, trl_rr, trl_ratio, trl_log_odds = (
        t.numpy() for t in orpo.ORPOTrainer.odds_ratio_loss(fake_self, torch.tensor(pc), torch.tensor(pr)))
    got, rc, rr = (np.asarray(x) for x in losses.dpo(pc, pr, beta=BETA, loss_type="orpo"))
    log_odds = np.asarray(losses.orpo_log_odds(pc, pr))
    diffs = [abs(float((nll + got).mean()) - float(nll.mean() - trl_losses.mean())),
             np.abs(got + trl_losses).max(), np.abs(rc - trl_rc).max(), np.abs(rr - trl_rr).max(),
             abs(float(np.mean(jax.nn.log_sigmoid(log_odds))) - float(trl_ratio)),
             abs(float(log_odds.mean()) - float(trl_log_odds))]
    assert max(diffs) < 2e-6, diffs


def test_orpo_is_finite_at_certainty_and_on_padding():
    """Average log-probs of 0 (p = 1, or an all-padding row) give finite losses and gradients."""
    g = jax.grad(lambda x: losses.dpo(x, x - 1.0, beta=BETA, loss_type="orpo")[0].sum())(jnp.zeros(3))
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------------------- KTO


def trl_kto(p, labels, dw, uw, loss_type="kto"):
    """TRL 1.16 KTOTrainer._compute_loss (`loss_type`, precomputed reference log-probs) on
    these per-token log-probs: rows of p.tok are the B matched examples, p.tok[::-1] the
    mismatched (KL) ones; a stand-in model returns them. -> (loss, metrics)."""
    torch = pytest.importorskip("torch")
    kto_mod = pytest.importorskip("trl.trainer.kto_trainer")
    n = 2 * B
    kl_tok = p.tok[::-1].copy()
    ids, kl_ids = torch.zeros(n, L + 1, dtype=torch.long), torch.ones(n, L + 1, dtype=torch.long)

    def model(**kw):
        tok = kl_tok if kw["input_ids"] is kl_ids else p.tok
        return types.SimpleNamespace(log_probs=torch.tensor(tok), entropy=torch.zeros(n, L),
                                     mean_logits=torch.zeros(n, L))

    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), calculate_KL=loss_type == "kto", precompute_ref_logps=True,
        loss_type=loss_type,
        beta=BETA, desirable_weight=dw, undesirable_weight=uw, aux_loss_enabled=False, _total_train_tokens=0,
        _tp_size=1, accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    fake_self._compute_kl_logps = types.MethodType(kto_mod.KTOTrainer._compute_kl_logps, fake_self)
    mask = torch.tensor(np.concatenate([np.zeros((n, 1)), p.mask], axis=1), dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": mask.flip(0),
              "label": torch.tensor(labels), "ref_logps": torch.tensor(np.concatenate([p.rc, p.rr])),
              "ref_KL_logps": torch.tensor(np.concatenate([p.rc, p.rr])[::-1].copy() - 0.3)}
    loss = kto_mod.KTOTrainer._compute_loss(fake_self, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in fake_self._metrics["train"].items()}


@pytest.mark.parametrize("weights,loss_type", [((1.0, 1.0), "kto"), ((1.0, 1.33), "kto"),
                                               ((1.0, 1.33), "apo_zero_unpaired")])
def test_kto_matches_trl_kto_trainer(weights, loss_type):
    p = make_pairs(seed=5)
    labels = np.arange(2 * B) % 3 != 0  # unbalanced desirable / undesirable
    want, metrics = trl_kto(p, labels, *weights, loss_type=loss_type)
    logps, ref = np.concatenate([p.pc, p.pr]), np.concatenate([p.rc, p.rr])
    z0 = losses.kto_reference_point(logps[::-1], ref[::-1] - 0.3) if loss_type == "kto" else jnp.zeros(())
    got, rewards = (np.asarray(x) for x in losses.kto(logps, ref, labels, z0, beta=BETA, desirable_weight=weights[0],
                                                      undesirable_weight=weights[1], loss_type=loss_type))
    diffs = [abs(float(got.mean()) - want), abs(float(z0) - metrics["kl"]),
             abs(float(rewards[labels].mean()) - metrics["rewards/chosen"]),
             abs(float(rewards[~labels].mean()) - metrics["rewards/rejected"]),
             abs(float(rewards[labels].mean() - rewards[~labels].mean()) - metrics["rewards/margins"])]
    assert max(diffs) < 2e-6, diffs
    assert (float(z0) > 0) == (loss_type == "kto")  # a case where the reference point is not clamped to 0


def test_kto_reference_point_is_clamped_and_skips_padding():
    assert float(losses.kto_reference_point(jnp.array([-1.0, -2.0]), jnp.array([0.0, 0.0]))) == 0.0
    z0 = losses.kto_reference_point(jnp.array([1.0, 3.0, 100.0]), jnp.zeros(3), valid=jnp.array([True, True, False]))
    assert float(z0) == 2.0


# ---------------------------------------------------------------------------- reward model


def test_reward_pairwise_matches_numpy_reference():
    rc, rr, margin = (RNG.normal(size=B).astype(np.float32) for _ in range(3))
    got = np.asarray(jax.jit(losses.reward_pairwise)(rc, rr, margin, 0.01))
    want = -log_sig(rc - rr - margin) + 0.01 * (rc + rr) ** 2  # Bradley–Terry + centering
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.reward_pairwise(rc, rr)), -log_sig(rc - rr), rtol=1e-5)
    m = losses.reward_metrics(rc, rr)
    assert float(m["accuracy"]) == pytest.approx(np.mean(rc > rr))
    assert float(m["margin"]) == pytest.approx(np.mean(rc - rr), rel=1e-5)


@pytest.mark.parametrize("with_margin,coef", [(False, None), (True, 0.01)])
def test_reward_pairwise_matches_trl_reward_trainer(with_margin, coef):
    torch = pytest.importorskip("torch")
    rt = pytest.importorskip("trl.trainer.reward_trainer")
    rc, rr, margin = (RNG.normal(size=B).astype(np.float32) for _ in range(3))
    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), args=types.SimpleNamespace(center_rewards_coefficient=coef),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _total_train_tokens=0, _tp_size=1, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    logits = torch.tensor(np.concatenate([rc, rr])[:, None])  # batch is [chosen, rejected]
    inputs = {"input_ids": torch.zeros(2 * B, 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, 3, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = torch.tensor(margin)
    want = float(rt.RewardTrainer.compute_loss(fake_self, lambda **kw: types.SimpleNamespace(logits=logits), inputs))
    got = losses.reward_pairwise(rc, rr, margin if with_margin else None, center_rewards_coefficient=coef)
    np.testing.assert_allclose(float(jnp.mean(got)), want, rtol=1e-5)
    m, trl_m = losses.reward_metrics(rc, rr), fake_self._metrics["train"]
    assert float(m["accuracy"]) == pytest.approx(trl_m["accuracy"][-1])
    assert float(m["margin"]) == pytest.approx(trl_m["margin"][-1], rel=1e-5)


# ---------------------------------------------------------------------------- length bias


def test_length_bias_metrics_on_a_length_biased_scorer():
    """A scorer that just counts tokens: correlation 1, always wrong when chosen is shorter."""
    len_c = np.array([3, 10, 4, 8, 5, 5])
    len_r = np.array([9, 2, 6, 1, 7, 5])
    m = losses.length_bias_metrics(len_c * 0.5, len_r * 0.5, len_c, len_r)
    assert m["length_correlation"] == pytest.approx(1.0)
    assert m["frac_chosen_shorter"] == pytest.approx(3 / 6)  # pairs 0, 2, 4
    assert m["accuracy_chosen_shorter"] == 0.0
    assert m["accuracy_chosen_longer"] == 1.0  # pairs 1, 3
    assert m["accuracy"] == pytest.approx(2 / 6)  # the tie (pair 5) counts as wrong


def test_length_bias_metrics_reference_and_empty_subsets():
    sc, sr = RNG.normal(size=B), RNG.normal(size=B)
    len_c, len_r = RNG.integers(1, 50, size=B), RNG.integers(1, 50, size=B)
    m = losses.length_bias_metrics(sc, sr, len_c, len_r)
    want = np.corrcoef(np.concatenate([sc, sr]), np.concatenate([len_c, len_r]))[0, 1]  # Pearson over 2B
    assert m["length_correlation"] == pytest.approx(want)
    shorter = len_c < len_r
    assert m["accuracy_chosen_shorter"] == pytest.approx(np.mean((sc > sr)[shorter]))
    none = losses.length_bias_metrics(sc, sr, np.full(B, 5), np.full(B, 5))  # no length variance, no shorter pair
    assert math.isnan(none["length_correlation"]) and math.isnan(none["accuracy_chosen_shorter"])
    assert none["frac_chosen_shorter"] == 0.0


def test_dpo_margin_is_an_offset_of_the_sigmoid_loss():
    p = make_pairs(seed=3)
    m = np.linspace(0.0, 2.0, B).astype(np.float32)
    got, _, _ = losses.dpo(p.pc, p.pr, p.rc, p.rr, beta=BETA, margin=m)
    np.testing.assert_allclose(got, -log_sig(BETA * ((p.pc - p.pr) - (p.rc - p.rr)) - m), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="margin.*loss_type='sigmoid' only"):
        losses.dpo(p.pc, p.pr, p.rc, p.rr, beta=BETA, loss_type="ipo", margin=m)
