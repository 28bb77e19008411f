"""`jaxalign pipeline`: config validation, stage chaining, and a test-sized end-to-end run
(SFT -> reward -> PPO, SFT -> DPO, table + plot)."""

import json
import os

import pytest

from jaxalign import pipeline
from jaxalign.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "configs", "quickstart", "pipeline.yaml")
FAST = ["train.log_every=1", "train.async_checkpoints=false", "train.eval_every=null", "train.save_every=null"]


def _have_stage_configs():
    return all(os.path.exists(os.path.join(ROOT, "configs", "quickstart", f"{s}.yaml")) for s in pipeline.STAGES)


def test_pipeline_file_validation(tmp_path):
    if not _have_stage_configs():
        pytest.skip("the reward/ppo/dpo quickstart configs are not written yet")
    p = pipeline.load_pipeline(PIPELINE, [f"output_dir={tmp_path}", "stages.ppo.steps=3"])
    assert list(p["stages"]) == list(pipeline.STAGES)
    assert p["stages"]["ppo"]["overrides"][-1] == "train.steps=3"
    cfg = pipeline.stage_config(p, "ppo")
    assert cfg.output_dir == str(tmp_path / "ppo") and cfg.train.steps == 3
    assert cfg.model.path == str(tmp_path / "sft" / "final")
    assert cfg.ppo.reward_model == str(tmp_path / "reward" / "final") and cfg.ppo.reward_fn is None
    assert pipeline.stage_config(p, "dpo").model.path == str(tmp_path / "sft" / "final")
    with pytest.raises(ConfigError, match=r"unknown key 'stages.sft.overides'; did you mean 'overrides'"):
        pipeline.load_pipeline(PIPELINE, ["stages.sft.overides=[]"])
    with pytest.raises(ConfigError, match=r"unknown key 'stages.rm'"):
        pipeline.load_pipeline(PIPELINE, ["stages.rm.config=x.yaml"])
    with pytest.raises(ConfigError, match=r"stages.dpo.config 'nope.yaml' does not exist"):
        pipeline.load_pipeline(PIPELINE, ["stages.dpo.config=nope.yaml"])
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        pipeline.run_pipeline(PIPELINE, [f"output_dir={tmp_path}", "stages.dpo.overrides=[train.stepz=1]"])
    assert not os.path.exists(tmp_path / "sft")  # every stage is validated before any trains


def test_format_table_has_every_row_and_column():
    rows = [{"model": m, "accuracy": 0.5, "mean_reward": -1.0, "kl_to_sft": 0.25} for m in ("base", "SFT")]
    rows.append({"model": "PPO", "accuracy": 1.0, "mean_reward": None, "kl_to_sft": 0.0})
    lines = pipeline.format_table(rows).splitlines()
    assert lines[0] == "| model | held-out accuracy | mean reward | KL to SFT |"
    assert lines[2] == "| base | 50.0% | -1.000 | 0.250 |" and lines[4] == "| PPO | 100.0% | n/a | 0.000 |"


def test_pipeline_end_to_end_test_sized(tmp_path):
    for algo in ("reward", "dpo", "ppo"):
        pytest.importorskip(f"jaxalign.algos.{algo}")
    if not _have_stage_configs():
        pytest.skip("the reward/ppo/dpo quickstart configs are not written yet")
    small = ["train.batch_size=8", "data.max_eval_examples=8", *FAST]
    overrides = [
        f"output_dir={tmp_path / 'p'}",
        "stages.sft.overrides=[" + ",".join(small + ["train.steps=3"]) + "]",
        "stages.reward.overrides=[" + ",".join(small + ["train.steps=2"]) + "]",
        "stages.dpo.overrides=[" + ",".join(small + ["train.steps=2"]) + "]",
        "stages.ppo.overrides=[" + ",".join(small + ["train.steps=2", "ppo.num_minibatches=1", "ppo.ppo_epochs=1",
                                                     "ppo.response_length=6", "data.eval=null"]) + "]",
        "eval.max_examples=8", "eval.max_new_tokens=6", "eval.batch_size=8",
    ]
    result = pipeline.run_pipeline(PIPELINE, overrides)
    out = tmp_path / "p"
    assert [r["model"] for r in result["rows"]] == ["base", "SFT", "PPO", "DPO"]
    for r in result["rows"]:
        for col in pipeline.COLUMNS:
            assert isinstance(r[col], float), (r["model"], col, r[col])
        assert 0.0 <= r["accuracy"] <= 1.0
    assert result["rows"][1]["kl_to_sft"] == 0.0
    md = (out / "table.md").read_text()
    for name in ("| base |", "| SFT |", "| PPO |", "| DPO |", "held-out accuracy", "mean reward", "KL to SFT"):
        assert name in md
    saved = json.loads((out / "table.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["base", "SFT", "PPO", "DPO"]
    assert set(saved["columns"]) == set(pipeline.COLUMNS)
    png = out / "curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in pipeline.STAGES:
        assert (out / stage / "final" / "config.json").exists()
        assert (out / stage / "curves.png").exists()
