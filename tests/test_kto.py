"""KTO (jaxalign.algos.kto): the batch builder's mismatched KL pairs, the loss against its
formula through the objective (frozen copy and adapters-off references agree), config checks,
and a short training run through the command line."""

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxalign.algos import kto
from jaxalign.algos.dpo import sequence_logps
from jaxalign.cli import main
from jaxalign.data import BATCH_KEYS, load_tokenizer
from jaxalign.errors import ConfigError
from jaxalign.models.model import load_model
from jaxalign.parallel.mesh import make_mesh
from jaxalign.peft import lora
from jaxalign.train.loop import apply_transforms
from jaxalign.train.metrics import read_metrics
from tests.test_reward import TINY_ASSETS, letter_prefs, small_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "kto.yaml")


def unpaired(path, n, seed):
    """Unpaired feedback rows from the letter preferences: alternately a chosen (desirable)
    and a rejected (undesirable) completion."""
    rows = [json.loads(line) for line in open(letter_prefs(path.with_suffix(".pairs.jsonl"), n, seed))]
    out = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
           for i, r in enumerate(rows)]
    path.write_text("\n".join(json.dumps(r) for r in out))
    return str(path)


def _objective(tmp_path, path, extra=()):
    cfg = small_run_config(tmp_path, path, QUICKSTART, ["data.max_eval_examples=16", *extra])
    model = apply_transforms(load_model(path, dtype="float32", mesh=make_mesh((4, 2, 1))), cfg)
    return cfg, model, kto.build(cfg, model, load_tokenizer(TINY_ASSETS))


def sides(batch, side):
    return {k: batch[f"{side}_{k}"] for k in BATCH_KEYS}


def test_batches_pair_each_prompt_with_the_previous_completion(tmp_path):
    tok = load_tokenizer(TINY_ASSETS)
    cfg = small_run_config(tmp_path, "unused", QUICKSTART, [f"data.train={unpaired(tmp_path / 'u.jsonl', 8, 0)}",
                                                           "train.batch_size=4"])
    examples, stats = kto.load_unpaired_examples(cfg, tok, "train")
    assert stats.format == "unpaired_preference" and len(examples) == 8
    it = kto.pair_iterator(cfg, examples, tok, train=False, iterator=kto.KTOBatches)
    batch = next(it)
    assert set(batch) == {f"{s}_{k}" for s in ("completion", "kl") for k in (*BATCH_KEYS, "score_at")} | {"label"}
    np.testing.assert_array_equal(batch["label"], [float(e["label"]) for e in examples[:4]])
    for i in range(4):
        p, c, prev = examples[i]["prompt_ids"], examples[i]["completion_ids"], examples[(i - 1) % 4]["completion_ids"]
        n = len(p) + len(c)
        assert batch["completion_input_ids"][i, :n].tolist() == np.concatenate([p, c]).tolist()
        assert batch["completion_loss_mask"][i].sum() == len(c)
        m = len(p) + len(prev)
        assert batch["kl_input_ids"][i, :m].tolist() == np.concatenate([p, prev]).tolist()
        assert batch["kl_loss_mask"][i].sum() == len(prev)


def test_loss_matches_the_formula_and_references_agree(tmp_path, hf_model):
    """Step 0 (policy == reference): z0 = 0 and every loss is its weight x (1 - σ(0)). With the
    policy moved, the loss equals KTO's formula on log-probs computed here, and the frozen-copy
    and adapters-off references give the same numbers."""
    _, path = hf_model("llama", initializer_range=0.05)
    weights = ["kto.undesirable_weight=1.5"]
    cfg, model, frozen = _objective(tmp_path / "a", path, weights)
    assert frozen.summary["kto"].endswith("reference=frozen_copy")
    assert frozen.summary["train data"]["desirable"] == frozen.summary["train data"]["undesirable"] == 512
    batch = next(frozen.train_batches)
    params = frozen.init_params(model.params)
    step = jax.jit(frozen.loss_fn)
    m = {k: float(s) / max(float(c), 1) for k, (s, c) in step(params, batch, None).items()}
    good = batch["label"] > 0.5
    assert m["kl"] == pytest.approx(0.0, abs=1e-5) and m["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    step0 = m["loss"]
    assert step0 == pytest.approx(np.mean(np.where(good, 0.5, 1.5 * 0.5)), rel=1e-6)

    _, lmodel, off = _objective(tmp_path / "c", path, weights + ["lora.rank=4", "lora.targets=[q_proj,v_proj]"])
    assert off.summary["kto"].endswith("reference=adapters_off") and off.init_params is None
    is_lora = lambda x: isinstance(x, lora.LoraWeight)  # noqa: E731
    moved = jax.tree.map(lambda w: w.replace(b=jax.random.normal(jax.random.key(2), w.b.shape) * 0.1) if is_lora(w)
                         else w, lmodel.params, is_leaf=is_lora)
    merged = lora.merge(moved)
    got = {"adapters_off": jax.jit(off.loss_fn)(moved, batch, None),
           "frozen_copy": step({"policy": merged, "reference": params["reference"]}, batch, None),
           "swapped": step({"policy": params["reference"], "reference": merged}, batch, None)}
    got = {name: {k: float(s) / max(float(c), 1) for k, (s, c) in sums.items()} for name, sums in got.items()}

    def expected(policy, ref):
        logp = lambda p, side: np.asarray(sequence_logps(p, model.config, sides(batch, side))[0], np.float64)  # noqa
        rho = logp(policy, "completion") - logp(ref, "completion")
        z0 = max(float(np.mean(logp(policy, "kl") - logp(ref, "kl"))), 0.0)
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        losses = np.where(good, 1 - sig(0.1 * (rho - z0)), 1.5 * (1 - sig(0.1 * (z0 - rho))))
        return {"loss": np.mean(losses), "kl": z0, "rewards/chosen": np.mean(0.1 * rho[good]),
                "rewards/rejected": np.mean(0.1 * rho[~good])}

    want = {"adapters_off": expected(merged, model.params), "swapped": expected(model.params, merged)}
    want["frozen_copy"] = want["adapters_off"]
    assert abs(want["frozen_copy"]["loss"] - step0) > 1e-3  # the policy moved
    assert want["swapped"]["kl"] > 0.01  # a case where the reference point is not clamped to 0
    for name, m in got.items():
        for key, value in want[name].items():
            assert m[key] == pytest.approx(value, rel=1e-3, abs=1e-5), (name, key)


def test_apo_zero_unpaired_needs_no_reference_point(tmp_path, hf_model):
    """loss_type apo_zero_unpaired: desirable λ_D(1 - σ(βρ)), undesirable λ_U σ(βρ), kl logged as 0;
    one example per batch is allowed (no mismatched pairs needed). nll_alpha adds α x the
    per-token NLL of each desirable completion."""
    _, path = hf_model("llama", initializer_range=0.05)
    cfg, model, apo = _objective(tmp_path, path, ["kto.loss_type=apo_zero_unpaired", "kto.undesirable_weight=1.5",
                                                  "kto.nll_alpha=0.5"])
    assert apo.summary["kto"].startswith("loss_type=apo_zero_unpaired")
    kto.check_kto_config(small_run_config(tmp_path, "unused", QUICKSTART, ["kto.loss_type=apo_zero_unpaired",
                                                                          "train.batch_size=1"]))
    batch = next(apo.train_batches)
    params = apo.init_params(model.params)
    moved = jax.tree.map(lambda w: w * 1.05, params["reference"])
    sums = jax.jit(apo.loss_fn)({"policy": moved, "reference": params["reference"]}, batch, None)
    m = {k: float(s) / max(float(c), 1) for k, (s, c) in sums.items()}
    logp = lambda p: np.asarray(sequence_logps(p, model.config, sides(batch, "completion"))[0], np.float64)  # noqa
    lengths = np.asarray(sequence_logps(moved, model.config, sides(batch, "completion"))[1], np.float64)
    rho = 0.1 * (logp(moved) - logp(params["reference"]))
    good = batch["label"] > 0.5
    nll = -logp(moved) / lengths
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert np.abs(rho).max() > 1e-2  # the policy moved
    want = np.where(good, 1 - sig(rho) + 0.5 * nll, 1.5 * sig(rho))
    assert m["loss"] == pytest.approx(np.mean(want), rel=1e-4)
    assert m["nll_loss"] == pytest.approx(np.mean(nll[good]), rel=1e-4)
    assert m["kl"] == 0.0


@pytest.mark.parametrize("override,match", [
    ("kto.beta=0", "kto.beta must be > 0"),
    ("kto.nll_alpha=-1", "kto.nll_alpha must be >= 0"),
    ("kto.undesirable_weight=-1", "must be >= 0 and not both 0"),
    ("kto.reference=adapters_off", "kto.reference=adapters_off needs LoRA"),
])
def test_bad_settings_say_what_to_change(tmp_path, hf_model, override, match):
    _, path = hf_model("llama")
    with pytest.raises(ConfigError, match=match):
        _objective(tmp_path, path, [override])


def test_one_example_per_batch_is_refused(tmp_path):
    cfg = small_run_config(tmp_path, "unused", QUICKSTART, ["train.batch_size=1"])
    with pytest.raises(ConfigError, match="fewer than 2 examples per process"):
        kto.check_kto_config(cfg)


def test_kto_quickstart_trains_through_the_cli(tmp_path, hf_model):
    _, path = hf_model("llama", initializer_range=0.02)
    args = ["train", QUICKSTART, f"output_dir={tmp_path / 'run'}", f"model.path={path}",
            f"model.tokenizer={TINY_ASSETS}", f"data.train={unpaired(tmp_path / 'train.jsonl', 512, 0)}",
            f"data.eval={unpaired(tmp_path / 'eval.jsonl', 64, 1)}", "data.max_length=24", "data.buckets=[24]",
            "train.batch_size=16", "train.steps=12", "optim.learning_rate=3e-3", "optim.warmup_steps=0",
            "train.eval_every=null", "train.save_every=null", "train.async_checkpoints=false"]
    assert main(args) == 0
    evals = [r for r in read_metrics(str(tmp_path / "run")) if "eval/kl" in r]
    assert [r["step"] for r in evals] == [0, 12]
    first, last = evals
    assert first["eval/loss"] == pytest.approx(0.5, abs=1e-5) and first["eval/kl"] == pytest.approx(0.0, abs=1e-5)
    assert last["eval/rewards/margins"] > first["eval/rewards/margins"] + 0.3, (first, last)
    assert last["eval/rewards/chosen"] > 0 > last["eval/rewards/rejected"]
    assert last["eval/loss"] < first["eval/loss"] - 0.05
    assert math.isfinite(last["eval/kl"])
    exported = load_model(str(tmp_path / "run" / "final"))
    assert "lm_head" in exported.params and "reference" not in exported.params
