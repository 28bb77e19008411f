"""`jaxalign pipeline`: config validation, stage chaining, and a test-sized end-to-end run
(SFT -> label -> reward -> PPO, DPO, GRPO; table + plot)."""

import json
import os

import pytest
import yaml

from jaxalign import pipeline
from jaxalign.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "configs", "quickstart", "pipeline.yaml")
FAST = ["train.log_every=1", "train.async_checkpoints=false", "train.eval_every=null", "train.save_every=null"]


def _have_stage_configs():
    return all(os.path.exists(os.path.join(ROOT, "configs", "quickstart", f"{s}.yaml")) for s in pipeline.REQUIRED)


def test_pipeline_file_validation(tmp_path):
    if not _have_stage_configs():
        pytest.skip("the reward/ppo/dpo quickstart configs are not written yet")
    p = pipeline.load_pipeline(PIPELINE, [f"output_dir={tmp_path}", "stages.ppo.steps=3"])
    assert list(p["stages"]) == list(pipeline.REQUIRED)
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


def test_label_stage_chains_pairs_into_reward_and_dpo(tmp_path):
    label = "{judge_fn: jaxalign.data.arithmetic:reward, num_samples: 4, max_rows: 16}"
    p = pipeline.load_pipeline(PIPELINE, [f"output_dir={tmp_path}", f"stages.label={label}",
                                          "stages.reward.overrides=[lora.rank=4]"])
    assert list(p["stages"]) == ["sft", "label", "reward", "ppo", "dpo"]
    assert p["stages"]["label"]["num_samples"] == 4 and p["stages"]["label"]["eval_max_rows"] == 64
    files = pipeline.label_files(str(tmp_path))
    for stage in ("reward", "dpo"):
        cfg = pipeline.stage_config(p, stage)
        assert (cfg.data.train, cfg.data.eval) == (files["train"], files["eval"])
    ppo = pipeline.stage_config(p, "ppo")  # a LoRA reward stage: PPO reads its adapter on the shared base
    assert ppo.ppo.reward_adapter == str(tmp_path / "reward" / "adapter") and ppo.ppo.reward_model is None
    no_eval = pipeline.load_pipeline(PIPELINE, [f"output_dir={tmp_path}", f"stages.label={label}",
                                                "stages.label.eval_max_rows=0"])
    assert pipeline.stage_config(no_eval, "dpo").data.eval is None
    for bad, message in [
        ("{num_samples: 4}", "needs exactly one judge"),
        ("{judge: policy, judge_fn: m:f}", "needs exactly one judge"),
        ("{judge: policy, num_samples: 4}", "compares pairs: set num_samples: 2"),
        ("{judge: policy, num_samples: 2, self_judge_rows: 8}", "self_judge_rows compares"),
        ("{judge_fn: m:f, num_sample: 4}", "unknown key 'stages.label.num_sample'; did you mean 'num_samples'"),
        ("{judge_fn: m:f, judge_template: nope.txt}", "judge_template 'nope.txt' does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pipeline.load_pipeline(PIPELINE, [f"stages.label={bad}"])
    rounds = pipeline.load_pipeline(PIPELINE, [f"output_dir={tmp_path}", "stages.iterative_dpo={config: dpo.yaml, "
                                               "rounds: 2, judge_fn: m:f, overrides: [train.steps=3]}"])
    assert pipeline.round_names(rounds) == ["iterative_dpo/1", "iterative_dpo/2"]
    second = pipeline.stage_config(rounds, "iterative_dpo/2")
    assert second.model.path == str(tmp_path / "iterative_dpo" / "1" / "final") and second.train.steps == 3
    assert second.data.train == pipeline.label_files(str(tmp_path / "iterative_dpo" / "2"))["train"]
    for bad, message in [
        ("{config: dpo.yaml, rounds: 0, judge_fn: m:f}", "rounds must be a positive integer"),
        ("{config: dpo.yaml, rounds: 2}", "stages.iterative_dpo needs exactly one judge"),
        ("{config: dpo.yaml, judge_fn: m:f, self_judge_rows: 8}", "unknown key 'stages.iterative_dpo.self_judge_rows'"),
        ("{judge_fn: m:f}", "stages.iterative_dpo is missing 'config'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pipeline.load_pipeline(PIPELINE, [f"stages.iterative_dpo={bad}"])
    with pytest.raises(ConfigError, match="eval.task 'arith' unknown; use one of arithmetic, tiny"):
        pipeline.load_pipeline(PIPELINE, ["eval.task=arith"])


def test_eval_settings_from_a_task_or_data():
    ev = dict(pipeline._EVAL_DEFAULTS, task="arithmetic", max_examples=5, metrics={"extra": "m:f"})
    s = pipeline.eval_settings(ev)
    assert len(s["prompts"]) == 5 and s["checker"] == "jaxalign.data.arithmetic:just_the_number"
    assert list(s["metrics"]) == ["number_only", "sum_right", "extra"] and s["chat"] == "auto"
    s = pipeline.eval_settings(dict(pipeline._EVAL_DEFAULTS, max_examples=3))
    assert len(s["prompts"]) == 3 and s["checker"] == "jaxalign.algos.ppo:task_reward" and s["chat"] is False


def test_format_table_has_every_row_and_column():
    rows = [{"model": m, "accuracy": 0.5, "mean_reward": -1.0, "kl_to_sft": 0.25} for m in ("base", "SFT")]
    rows.append({"model": "PPO", "accuracy": 1.0, "mean_reward": None, "kl_to_sft": 0.0})
    for r in rows:
        r.update(mean_length=4.0, sum_right=0.25)
    rows[2]["sum_right"] = 2.0  # not a rate: shown as a number
    lines = pipeline.format_table(rows, ["sum_right"]).splitlines()
    assert lines[0] == "| model | held-out accuracy | sum right | mean length | mean reward | KL to SFT |"
    assert lines[2] == "| base | 50.0% | 0.250 | 4.000 | -1.000 | 0.250 |"
    assert lines[4] == "| PPO | 100.0% | 2.000 | 4.000 | n/a | 0.000 |"
    assert pipeline.format_table(rows[:2], ["sum_right"]).splitlines()[2].startswith("| base | 50.0% | 25.0% |")


def test_pipeline_end_to_end_test_sized(tmp_path):
    for algo in ("reward", "dpo", "ppo"):
        pytest.importorskip(f"jaxalign.algos.{algo}")
    if not _have_stage_configs():
        pytest.skip("the reward/ppo/dpo quickstart configs are not written yet")
    small = ["train.batch_size=8", "data.max_eval_examples=8", *FAST]
    template = tmp_path / "judge.txt"  # short: the tiny judge has a 256-token context
    template.write_text("{prompt} A: {response_a} B: {response_b} Better:")
    overrides = [
        f"output_dir={tmp_path / 'p'}",
        "stages.sft.overrides=[" + ",".join(small + ["train.steps=3"]) + "]",
        "stages.reward.overrides=[" + ",".join(small + ["train.steps=2"]) + "]",
        "stages.dpo.overrides=[" + ",".join(small + ["train.steps=2"]) + "]",
        "stages.ppo.overrides=[" + ",".join(small + ["train.steps=2", "ppo.num_minibatches=1", "ppo.ppo_epochs=1",
                                                     "ppo.response_length=6", "data.eval=null"]) + "]",
        "stages.grpo.config=grpo.yaml",
        "stages.grpo.overrides=[" + ",".join(small + ["train.steps=2", "ppo.num_minibatches=1", "ppo.ppo_epochs=1",
                                                      "ppo.response_length=6", "data.eval=null"]) + "]",
        "stages.label={judge_fn: tests.test_rlaif:length_score, num_samples: 3, max_rows: 16, eval_max_rows: 8, "
        f"max_new_tokens: 6, batch_size: 8, self_judge_rows: 8, judge_template: {template}}}",
        "stages.iterative_dpo={config: dpo.yaml, rounds: 2, judge_fn: tests.test_rlaif:length_score, "
        "num_samples: 3, max_rows: 16, eval_max_rows: 0, max_new_tokens: 6, batch_size: 8, "
        "overrides: [" + ",".join(small + ["train.steps=2"]) + "]}",
        "eval.max_examples=8", "eval.max_new_tokens=6", "eval.batch_size=8",
    ]
    result = pipeline.run_pipeline(PIPELINE, overrides)
    out = tmp_path / "p"
    labels = result["stages"]["label"]["summary"]
    assert labels["train"]["prompts"] == 16 and labels["train"]["rows"] + labels["train"]["ties_dropped"] == 16
    assert labels["self_judge"]["compared"] + labels["self_judge"]["reference_ties"] == 8
    pairs = [json.loads(line) for line in (out / "label" / "train.jsonl").read_text().splitlines()]
    assert len(pairs) == labels["train"]["rows"] and all(r["score_chosen"] > r["score_rejected"] for r in pairs)
    models = ["base", "SFT", "PPO", "DPO", "GRPO", "iterative_dpo/1", "iterative_dpo/2"]
    assert [r["model"] for r in result["rows"]] == models
    for r in (1, 2):  # each round: its own samples and labels, DPO from the previous round's policy
        summary = result["stages"][f"iterative_dpo/{r}/label"]["summary"]["train"]
        assert summary["rows"] + summary["ties_dropped"] == 16
        assert (out / "iterative_dpo" / str(r) / "label" / "train.jsonl").exists()
        cfg = yaml.safe_load((out / "iterative_dpo" / str(r) / "config.yaml").read_text())
        assert cfg["model"]["path"] == str(out / ("sft" if r == 1 else "iterative_dpo/1") / "final")
        assert cfg["data"]["train"] == str(out / "iterative_dpo" / str(r) / "label" / "train.jsonl")
    for r in result["rows"]:
        for col in pipeline.table_columns([]):
            assert isinstance(r[col], float), (r["model"], col, r[col])
        assert 0.0 <= r["accuracy"] <= 1.0
    assert result["rows"][1]["kl_to_sft"] == 0.0
    md = (out / "table.md").read_text()
    for name in ("| base |", "| SFT |", "| PPO |", "| DPO |", "held-out accuracy", "mean reward", "KL to SFT"):
        assert name in md
    saved = json.loads((out / "table.json").read_text())
    assert [r["model"] for r in saved["rows"]] == models
    assert saved["columns"] == pipeline.table_columns([])
    png = out / "curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("sft", "reward", "ppo", "dpo", "grpo", "iterative_dpo/1", "iterative_dpo/2"):
        assert (out / stage / "final" / "config.json").exists()
        assert (out / stage / "curves.png").exists()


def test_smollm2_recipe_configs_load_and_chain(tmp_path):
    """The real-model recipes validate (no model is loaded) and the pipeline chains them."""
    from jaxalign.config import load_config

    here = os.path.join(ROOT, "configs", "smollm2")
    for name in ("sft", "grpo", "dpo", "reward", "ppo"):
        cfg = load_config(os.path.join(here, f"{name}.yaml"))
        assert cfg.lora.rank == 16 and cfg.algorithm == name
    p = pipeline.load_pipeline(os.path.join(here, "pipeline.yaml"), [f"output_dir={tmp_path}"])
    assert list(p["stages"]) == ["sft", "label", "reward", "ppo", "dpo", "grpo"]
    assert p["stages"]["label"]["judge_template"] == os.path.join(here, "judge.txt")
    assert pipeline.stage_config(p, "ppo").ppo.reward_adapter == str(tmp_path / "reward" / "adapter")
    assert pipeline.stage_config(p, "dpo").data.train == pipeline.label_files(str(tmp_path))["train"]
    assert len(pipeline.eval_settings(p["eval"])["prompts"]) == 256
