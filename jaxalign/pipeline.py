"""`jaxalign pipeline PIPELINE.yaml`: the alignment pipeline, SFT -> reward model -> PPO and
SFT -> DPO (optionally with RLAIF labeling in between and a GRPO stage), then one comparison
table and a plot of every stage's training curves.

Each training stage is an ordinary run, `jaxalign.train.loop.train(load_config(config,
overrides))`, with its `output_dir` under the pipeline's and model/data paths chained:

    sft     output_dir=OUT/sft     (every stage also gets train.export=true: final/ is needed)
    label   (optional) OUT/label/{train,eval}.jsonl: candidates sampled from OUT/sft/final,
            labeled by a scoring function (judge_fn, e.g. a task checker) or a judge model
            (`jaxalign.algos.rlaif.label`)
    reward  output_dir=OUT/reward  model.path=OUT/sft/final  [data.train/eval = the label files]
    ppo     output_dir=OUT/ppo     model.path=OUT/sft/final  ppo.reward_adapter=OUT/reward/adapter
            (a LoRA reward stage: one shared base) or ppo.reward_model=OUT/reward/final
    dpo     output_dir=OUT/dpo     model.path=OUT/sft/final  [data.train/eval = the label files]
    grpo    (optional) output_dir=OUT/grpo  model.path=OUT/sft/final
    iterative_dpo (optional) `rounds` rounds; round r samples from the previous round's policy
            (OUT/sft/final for round 1), labels the samples with the stage's judge as the label
            stage does (OUT/iterative_dpo/r/label/) and trains DPO on that round's pairs:
            output_dir=OUT/iterative_dpo/r  model.path=<the previous policy>  data.train=<its pairs>

(the stage's own `overrides` from the pipeline file are applied after these, so they win).
A stage that already finished resumes from its last checkpoint and only re-exports; a
label stage whose summary.json records the same settings is not redone.

The table (printed, and written as OUT/table.md and OUT/table.json) compares base (the SFT
stage's starting point: its `model.path`, or the random initialization from
`model.config`), SFT and every policy stage (one row per iterative DPO round:
`iterative_dpo/1`, ...) on held-out prompts
(`jaxalign.evaluate.evaluate_models`, the reference being SFT): accuracy (the checker's
mean score of greedy completions), any extra metrics, mean response length, the trained
reward model's mean score, and KL to SFT (a single-sample estimate of KL(model || SFT) along
the model's own greedy completion; 0 for SFT itself).

OUT/curves.png has one row per training stage (train loss | eval metrics); each stage dir
also gets its own `curves.png` (`jaxalign.plot.plot_run`).

Pipeline file::

    output_dir: runs/quickstart/pipeline
    stages:                 # sft, reward, ppo, dpo are required; config paths are relative to this file
      sft:    {config: sft.yaml, overrides: [...], steps: 600}   # steps: shorthand for train.steps
      label:  {judge_fn: jaxalign.data.arithmetic:reward, num_samples: 4, max_rows: 512}   # optional
      reward: {config: reward.yaml}
      ppo:    {config: ppo.yaml}
      dpo:    {config: dpo.yaml}
      grpo:   {config: grpo.yaml}                                # optional
      iterative_dpo: {config: dpo.yaml, rounds: 2, judge_fn: jaxalign.data.arithmetic:reward, num_samples: 4}
                                  # optional; takes the label stage's keys (but self_judge_rows) for its judge
    eval: {task: arithmetic, max_examples: 256}   # or data + checker (+ metrics, chat)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence

from jaxalign import evaluate
from jaxalign.errors import ConfigError, closest

log = logging.getLogger(__name__)

STAGES = ("sft", "label", "reward", "ppo", "dpo", "grpo", "iterative_dpo")  # in the order they run
REQUIRED = ("sft", "reward", "ppo", "dpo")
POLICIES = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO", "grpo": "GRPO"}  # stages evaluated in the table
COLUMN_TITLES = {"accuracy": "held-out accuracy", "mean_reward": "mean reward", "kl_to_sft": "KL to SFT",
                 "mean_length": "mean length"}
_STAGE_KEYS = ("config", "overrides", "steps")
ITERATIVE = "iterative_dpo"
_ROUND_KEYS = (*_STAGE_KEYS, "rounds")  # + the label stage's keys but self_judge_rows (its judge)
_LABEL_DEFAULTS = {"judge_fn": None, "judge": None, "judge_template": None, "data": None, "eval_data": None,
                   "split": "train", "max_rows": 512, "eval_max_rows": 64, "num_samples": 4, "temperature": 1.0,
                   "max_new_tokens": 32, "batch_size": 16, "seed": 0, "self_judge_rows": 0}
_EVAL_DEFAULTS = {"task": None, "data": "builtin:tiny/eval.jsonl", "split": "train", "max_examples": 200,
                  "max_new_tokens": 12, "batch_size": 100, "checker": None, "metrics": None, "chat": None}
_TOP_KEYS = ("output_dir", "stages", "eval")


# ---------------------------------------------------------------------------- the pipeline file


def _unknown(key, valid, where):
    close = closest(key, valid)
    hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"pipeline: unknown key '{where}{key}'{hint}")


def _local(path: str, base: str) -> str:
    """A path relative to the pipeline file's directory when it exists there, else as given."""
    if not os.path.isabs(path) and os.path.exists(os.path.join(base, path)):
        return os.path.join(base, path)
    return path


def _label_stage(st, base: str, where: str = "stages.label", extra: tuple[str, ...] = ()) -> dict:
    """The label settings of `st` (a stage mapping at `where`) with defaults, checked; `extra`:
    the stage's other keys, left out of the result."""
    if not isinstance(st, Mapping):
        raise ConfigError(f"pipeline: {where} must be a mapping (judge_fn or judge, num_samples, max_rows, ...)")
    valid = tuple(k for k in _LABEL_DEFAULTS if not extra or k != "self_judge_rows") + extra
    for key in st:
        if key not in valid:
            raise _unknown(key, valid, f"{where}.")
    out = {**_LABEL_DEFAULTS, **{k: v for k, v in st.items() if k not in extra}}
    if (out["judge_fn"] is None) == (out["judge"] is None):
        raise ConfigError(f"pipeline: {where} needs exactly one judge: judge_fn (module:function, e.g. a task "
                          "checker) or judge (a judge model directory, or 'policy' for the model being labeled)")
    if out["self_judge_rows"] and out["judge_fn"] is None:
        raise ConfigError(f"pipeline: {where}.self_judge_rows compares the SFT model as judge with judge_fn; "
                          "set judge_fn")
    if out["num_samples"] != 2 and out["judge"] is not None:
        raise ConfigError(f"pipeline: {where} with a judge model compares pairs: set num_samples: 2, or use "
                          "judge_fn for best-vs-worst of more samples")
    if out["judge_template"] is not None:
        out["judge_template"] = _local(str(out["judge_template"]), base)
        if not os.path.isfile(out["judge_template"]):
            raise ConfigError(f"pipeline: {where}.judge_template {st['judge_template']!r} does not exist")
    return out


def load_pipeline(path: str | Mapping | None, overrides: Sequence[str] = ()) -> dict:
    """Read + validate a pipeline file (or dict); `overrides` are `a.b=value` strings (YAML values).
    Stage config paths are resolved relative to the file's directory."""
    import yaml

    from jaxalign.config import apply_overrides

    if isinstance(path, Mapping):
        d, base = copy.deepcopy(dict(path)), os.getcwd()
    else:
        if path is None or not os.path.isfile(path):
            raise ConfigError(f"pipeline file {path!r} does not exist")
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        base = os.path.dirname(os.path.abspath(path))
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: the top level must be a mapping (output_dir, stages, eval)")
    apply_overrides(d, list(overrides))
    for key in d:
        if key not in _TOP_KEYS:
            raise _unknown(key, _TOP_KEYS, "")
    stages = d.get("stages")
    if not isinstance(stages, Mapping):
        raise ConfigError("pipeline: 'stages' must map each of sft, reward, ppo, dpo (and optionally label, grpo) to "
                          "{config, overrides}")
    for name in stages:
        if name not in STAGES:
            raise _unknown(name, STAGES, "stages.")
    out = {"output_dir": str(d.get("output_dir") or "runs/pipeline"), "stages": {}, "eval": dict(_EVAL_DEFAULTS)}
    for name in STAGES:
        st = stages.get(name)
        if st is None and name not in REQUIRED:
            continue
        if name == "label":
            out["stages"]["label"] = _label_stage(st, base)
            continue
        if not isinstance(st, Mapping) or not st.get("config"):
            raise ConfigError(f"pipeline: stages.{name} is missing 'config' (the stage's training YAML)")
        label = None
        if name == ITERATIVE:
            label = _label_stage(st, base, f"stages.{name}", _ROUND_KEYS)
            rounds = st.get("rounds", 1)
            if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
                raise ConfigError(f"pipeline: stages.{name}.rounds must be a positive integer, got {rounds!r}")
            st = {k: v for k, v in st.items() if k in _STAGE_KEYS}
        for key in st:
            if key not in _STAGE_KEYS:
                raise _unknown(key, _STAGE_KEYS, f"stages.{name}.")
        cfg_path = _local(str(st["config"]), base)
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"pipeline: stages.{name}.config {st['config']!r} does not exist (looked in {base} "
                              "and the working directory)")
        ov = st.get("overrides") or []
        if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise ConfigError(f"pipeline: stages.{name}.overrides must be a list of 'key=value' strings")
        if st.get("steps") is not None:
            ov = [*ov, f"train.steps={int(st['steps'])}"]
        out["stages"][name] = {"config": cfg_path, "overrides": list(ov)}
        if label is not None:
            out["stages"][name].update(rounds=rounds, label=label)
    ev = d.get("eval") or {}
    for key, value in ev.items():
        if key not in _EVAL_DEFAULTS:
            raise _unknown(key, tuple(_EVAL_DEFAULTS), "eval.")
        out["eval"][key] = value
    if out["eval"]["task"] is not None and out["eval"]["task"] not in evaluate.TASKS:
        raise ConfigError(f"pipeline: eval.task {out['eval']['task']!r} unknown; use one of "
                          f"{', '.join(sorted(evaluate.TASKS))} (or eval.data + eval.checker)")
    return out


def round_names(p: dict) -> list[str]:
    """The training runs of the iterative DPO stage: `iterative_dpo/1`, ... (none without it)."""
    st = p["stages"].get(ITERATIVE)
    return [f"{ITERATIVE}/{r}" for r in range(1, st["rounds"] + 1)] if st else []


def label_files(out_dir: str) -> dict:
    """Where the label stage writes: preference pairs (train, eval), the self-judged pairs, its summary."""
    d = os.path.join(out_dir, "label")
    return {"train": os.path.join(d, "train.jsonl"), "eval": os.path.join(d, "eval.jsonl"),
            "self_judged": os.path.join(d, "self_judged.jsonl"), "summary": os.path.join(d, "summary.json")}


def stage_overrides(p: dict, name: str, out_dir: str, reward_lora: bool = False) -> list[str]:
    """The chaining overrides of training stage `name` (output dirs, model and data paths).
    `reward_lora`: the reward stage trains adapters, so PPO reads its adapter on the shared base."""
    run = lambda s: os.path.join(out_dir, s)  # noqa: E731
    sft_final = os.path.join(run("sft"), "final")
    chain = [] if name == "sft" else [f"model.path={sft_final}"]
    if name.startswith(f"{ITERATIVE}/"):  # round r: from round r - 1's policy, on round r's pairs
        r = int(name.split("/")[1])
        start = sft_final if r == 1 else os.path.join(run(f"{ITERATIVE}/{r - 1}"), "final")
        files = label_files(run(name))
        has_eval = p["stages"][ITERATIVE]["label"]["eval_max_rows"] and _label_sources(p, ITERATIVE)[1] is not None
        chain = [f"model.path={start}", f"data.train={files['train']}",
                 f"data.eval={files['eval'] if has_eval else 'null'}"]
    if name == "ppo":
        reward = (["ppo.reward_adapter=" + os.path.join(run("reward"), "adapter"), "ppo.reward_model=null"]
                  if reward_lora else
                  ["ppo.reward_model=" + os.path.join(run("reward"), "final"), "ppo.reward_adapter=null"])
        chain += [*reward, "ppo.reward_fn=null"]
    if name in ("reward", "dpo") and "label" in p["stages"]:
        files = label_files(out_dir)
        has_eval = p["stages"]["label"]["eval_max_rows"] and _label_sources(p, "label")[1] is not None
        chain += [f"data.train={files['train']}", f"data.eval={files['eval'] if has_eval else 'null'}"]
    return [f"output_dir={run(name)}", "train.export=true", *chain]


def stage_config(p: dict, name: str):
    from jaxalign.config import load_config

    st = p["stages"][name.split("/")[0]]
    out_dir = os.path.abspath(p["output_dir"])
    reward_lora = False
    if name == "ppo":
        reward_lora = stage_config(p, "reward").lora.rank > 0
    return load_config(st["config"], stage_overrides(p, name, out_dir, reward_lora) + st["overrides"])


# ---------------------------------------------------------------------------- the label stage


def _label_sources(p: dict, stage: str) -> tuple[str, str | None]:
    """The prompt sources of `stage`'s labeling: its own `data` / `eval_data`, else the SFT stage's."""
    from jaxalign.config import load_config

    st = p["stages"][stage] if stage == "label" else p["stages"][stage]["label"]
    if st["data"] is not None and st["eval_data"] is not None:
        return st["data"], st["eval_data"]
    sft = load_config(p["stages"]["sft"]["config"], p["stages"]["sft"]["overrides"])
    return st["data"] or sft.data.train, st["eval_data"] or sft.data.eval


def run_label_stage(p: dict, out_dir: str) -> dict:
    """Sample candidates from OUT/sft/final for the train (and eval) prompts, label them, write
    the files of :func:`label_files`; optionally measure how far the SFT model, as its own
    judge, agrees with `judge_fn`. Returns the summary (also OUT/label/summary.json)."""
    return label_policy(p["stages"]["label"], os.path.join(out_dir, "sft", "final"), label_files(out_dir),
                        *_label_sources(p, "label"))


def label_policy(st: dict, policy: str, files: dict, train_data: str, eval_data: str | None) -> dict:
    """Sample candidates from the model in `policy` for the train (and eval) prompts, label them
    per the label settings `st` and write `files` (:func:`label_files`); a summary whose
    settings are the same is not redone. Returns the summary (also `files["summary"]`)."""
    from jaxalign.algos import rlaif

    settings = dict(st)
    if os.path.exists(files["summary"]):
        with open(files["summary"]) as f:
            done = json.load(f)
        if done.get("settings") == settings and all(os.path.exists(files[k]) for k in done.get("files", [])):
            log.info("pipeline: labels of %s already done (%s)", policy, files["summary"])
            return done
    judge = None if st["judge"] is None else policy if st["judge"] == "policy" else st["judge"]
    sample = dict(max_new_tokens=st["max_new_tokens"], temperature=st["temperature"], batch_size=st["batch_size"])
    template = None
    if st["judge_template"] is not None:
        with open(st["judge_template"]) as f:
            template = f.read()
    judging = dict(settings=rlaif.JudgeSettings(template=template, batch_size=st["batch_size"], seed=st["seed"]))
    summary: dict = {"settings": settings, "files": ["train"]}
    summary["train"] = rlaif.label(judge, train_data, files["train"], judge_fn=st["judge_fn"], policy_dir=policy,
                                   num_samples=st["num_samples"], max_rows=st["max_rows"], split=st["split"],
                                   sample=sample, **judging)
    if st["eval_max_rows"] and eval_data is not None:
        judging["settings"] = dataclasses.replace(judging["settings"], seed=st["seed"] + 1)
        summary["eval"] = rlaif.label(judge, eval_data, files["eval"], judge_fn=st["judge_fn"], policy_dir=policy,
                                      num_samples=st["num_samples"], max_rows=st["eval_max_rows"], split=st["split"],
                                      sample=sample, **judging)
        summary["files"].append("eval")
    if st["self_judge_rows"]:
        judging["settings"] = dataclasses.replace(judging["settings"], seed=st["seed"] + 2)
        summary["self_judge"] = rlaif.label(policy, train_data, files["self_judged"], agreement_fn=st["judge_fn"],
                                            policy_dir=policy, max_rows=st["self_judge_rows"], split=st["split"],
                                            sample=sample, **judging)
        summary["files"].append("self_judged")
    evaluate.write_text(files["summary"], json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# ---------------------------------------------------------------------------- evaluation


def eval_settings(ev: Mapping) -> dict:
    """The eval section resolved: prompts, checker, metrics and chat from `task` (a bundled task
    of `jaxalign eval`), each overridable; else `data` + `checker` (default: the tiny task's)."""
    from jaxalign.algos.constitutional import read_prompts

    task = evaluate.TASKS[ev["task"]] if ev["task"] is not None else None
    if task is not None:
        prompts = task.prompts(int(ev["max_examples"]))
    else:
        prompts = read_prompts(ev["data"], ev["split"], ev["max_examples"], messages=True)
    metrics = dict(task.metrics if task else {})
    metrics.update(ev["metrics"] or {})
    checker = ev["checker"] or (task.checker if task else evaluate.DEFAULT_CHECKER)
    chat = ev["chat"] if ev["chat"] is not None else (task.chat if task else False)
    return {"prompts": prompts, "checker": checker, "metrics": metrics, "chat": chat}


def table_columns(metrics: Sequence[str]) -> list[str]:
    return ["accuracy", *metrics, "mean_length", "mean_reward", "kl_to_sft"]


def format_table(rows: Sequence[Mapping], metrics: Sequence[str] = ()) -> str:
    """Markdown table: accuracy, the extra metrics, mean length, mean reward, KL to SFT."""
    rates = ["accuracy", *(m for m in metrics if all(r.get(m) is None or 0 <= r[m] <= 1 for r in rows))]
    return evaluate.format_table(rows, table_columns(metrics), COLUMN_TITLES, percent=rates)


# ---------------------------------------------------------------------------- plots


# Eval metrics shown per stage, in this order (when the run logged them); else a few of its own.
HEADLINE = ("exact_match", "accuracy", "rewards/accuracies", "reward_fn", "score", "margin", "rewards/margins")


def _plot_evals(ax, evals: dict) -> None:
    """Headline eval metrics: rates in [0, 1] on the left axis, other scales (dashed) on a twin axis."""
    names = [f"eval/{k}" for k in HEADLINE if f"eval/{k}" in evals][:3]
    if not names:
        names = [k for k in sorted(evals) if k != "eval/loss"][:3] or sorted(evals)[:1]
    twin = None
    for k in names:
        xs, ys = zip(*evals[k])
        rate = all(-1e-9 <= y <= 1 + 1e-9 for y in ys)
        if not rate and twin is None:
            twin = ax.twinx()
        (ax if rate else twin).plot(xs, ys, marker="o", markersize=3, linestyle="-" if rate else "--",
                                    color=f"C{names.index(k)}", label=k[5:])
    handles = [h for a in (ax, twin) if a is not None for h in a.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")


def _series(records: Sequence[Mapping], key: str) -> list[tuple]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]


def plot_stages(run_dirs: Mapping[str, str], out: str) -> str:
    """One figure: a row per stage; on the left the train loss (RL stages: rollout reward and KL to
    the start model), on the right its eval/* metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxalign.train.metrics import read_metrics

    names = [n for n, d in run_dirs.items() if os.path.exists(os.path.join(d, "metrics.jsonl"))]
    fig, axes = plt.subplots(max(len(names), 1), 2, figsize=(11, 2.8 * max(len(names), 1)), squeeze=False)
    for row, name in zip(axes, names):
        records = read_metrics(run_dirs[name])
        evals: dict[str, list] = {}
        for r in records:
            for k, v in r.items():
                if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    evals.setdefault(k, []).append((r["step"], v))
        train, score, kl = (_series(records, k) for k in ("loss", "rollout/score", "objective/kl"))
        if score:  # RL stages: the rollouts' mean reward and KL to the start model (the loss says little)
            row[0].plot(*zip(*score), color="C0")
            if kl:
                row[0].twinx().plot(*zip(*kl), "--", color="C3")
            row[0].set_title(f"{name}: rollout reward (solid), KL to start (dashed)")
        else:
            if train:
                xs, ys = zip(*train)
                row[0].plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3)
            row[0].set_title(f"{name}: train loss")
        _plot_evals(row[1], evals)
        row[1].set_title(f"{name}: eval")
        for ax in row:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------- running it


def label_round(p: dict, name: str, out_dir: str) -> dict:
    """Round `name` (`iterative_dpo/r`) of the iterative DPO stage: samples of the policy it
    starts from, labeled by the stage's judge (seed + r - 1) into OUT/iterative_dpo/r/label/."""
    st = p["stages"][ITERATIVE]["label"]
    r = int(name.split("/")[1])
    start = os.path.join(out_dir, "sft" if r == 1 else f"{ITERATIVE}/{r - 1}", "final")
    return label_policy(dict(st, seed=st["seed"] + r - 1), start, label_files(os.path.join(out_dir, name)),
                        *_label_sources(p, ITERATIVE))


def run_pipeline(path: str | Mapping | None, overrides: Sequence[str] = ()) -> dict:
    """Run every stage, evaluate, write OUT/table.md, OUT/table.json and OUT/curves.png.
    Returns {"rows": [...], "table": markdown, "stages": {...}, "files": {...}, "seconds": ...}."""
    import jax

    from jaxalign.data import load_tokenizer
    from jaxalign.models import load_model
    from jaxalign.plot import plot_run
    from jaxalign.train.loop import build_model, train

    t_start = time.time()
    p = load_pipeline(path, overrides)
    out_dir = os.path.abspath(p["output_dir"])
    training = [n for n in p["stages"] if n not in ("label", ITERATIVE)] + round_names(p)  # the training runs
    configs = {name: stage_config(p, name) for name in training}  # validate every stage before running any
    ev = p["eval"]
    for fn in [ev["checker"], *(ev["metrics"] or {}).values(), p["stages"].get("label", {}).get("judge_fn"),
               p["stages"].get(ITERATIVE, {}).get("label", {}).get("judge_fn")]:
        if isinstance(fn, str):
            evaluate.resolve(fn, "pipeline function")  # a bad module:function fails before any training
    os.makedirs(out_dir, exist_ok=True)
    stages = {}
    for name in [n for n in p["stages"] if n != ITERATIVE] + round_names(p):
        t0 = time.time()
        if name.startswith(f"{ITERATIVE}/"):  # label samples of the previous round's policy first
            label = label_round(p, name, out_dir)
            stages[f"{name}/label"] = {"output_dir": os.path.join(out_dir, name, "label"),
                                       "seconds": round(time.time() - t0, 1),
                                       "summary": {k: v for k, v in label.items() if k != "settings"}}
            t0 = time.time()
        if name == "label":
            log.info("pipeline stage label: sampling and labeling preference pairs from %s", out_dir)
            summary = run_label_stage(p, out_dir)
            stages[name] = {"output_dir": os.path.join(out_dir, "label"), "seconds": round(time.time() - t0, 1),
                            "summary": {k: v for k, v in summary.items() if k != "settings"}}
            continue
        cfg = configs[name]
        log.info("pipeline stage %s: %s (%d steps) -> %s", name, p["stages"][name.split("/")[0]]["config"],
                 cfg.train.steps, cfg.output_dir)
        metrics = train(cfg)
        stages[name] = {"output_dir": cfg.output_dir, "algorithm": cfg.algorithm, "steps": cfg.train.steps,
                        "seconds": round(time.time() - t0, 1),
                        "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        try:
            plot_run(cfg.output_dir)
        except Exception as e:  # noqa: BLE001 - a missing plot must not lose a trained pipeline
            log.warning("could not plot %s: %s", cfg.output_dir, e)
    t_eval = time.time()
    settings = eval_settings(ev)
    prompts = settings["prompts"]
    final = {name: os.path.join(out_dir, name, "final") for name in training}
    tokenizer = load_tokenizer(final["sft"])
    sft_model = load_model(final["sft"])
    models = {"base": build_model(configs["sft"], None), "SFT": sft_model}  # base: where the SFT stage started
    models.update({POLICIES[n]: load_model(final[n]) for n in training if n in POLICIES and n != "sft"})
    models.update({n: load_model(final[n]) for n in round_names(p)})
    rows = evaluate.evaluate_models(models, tokenizer, prompts, checker=settings["checker"],
                                    metrics=settings["metrics"], reward_model=final["reward"], reference=sft_model,
                                    reference_name="sft", chat=settings["chat"],
                                    max_new_tokens=int(ev["max_new_tokens"]), batch_size=int(ev["batch_size"]))
    eval_seconds = round(time.time() - t_eval, 1)
    table = format_table(rows, list(settings["metrics"]))
    files = {"table_md": os.path.join(out_dir, "table.md"), "table_json": os.path.join(out_dir, "table.json"),
             "plot": os.path.join(out_dir, "curves.png")}
    plot_stages({name: os.path.join(out_dir, name) for name in training}, files["plot"])
    eval_info = {**ev, "checker": settings["checker"], "metrics": settings["metrics"],
                 "prompts": len(prompts), "seconds": eval_seconds}
    result = {"rows": rows, "columns": table_columns(list(settings["metrics"])), "table": table, "stages": stages,
              "eval": eval_info, "files": files, "seconds": round(time.time() - t_start, 1),
              "devices": str(jax.devices()[0].platform)}
    source = f"the {ev['task']} task" if ev["task"] else ev["data"]
    evaluate.write_text(files["table_md"], f"# jaxalign pipeline: {out_dir}\n\n{table}\n\n"
                        f"Held-out prompts: {len(prompts)} from {source}, checker {settings['checker']}; greedy "
                        f"decoding, max {ev['max_new_tokens']} new tokens. Stage times (s): "
                        + ", ".join(f"{n} {s['seconds']}" for n, s in stages.items())
                        + f", eval {eval_seconds}; total {result['seconds']}.\n")
    evaluate.write_text(files["table_json"], json.dumps(result, indent=2, default=str) + "\n")
    return result


def add_arguments(parser) -> None:
    parser.description = ("Run SFT -> reward model -> PPO and SFT -> DPO (optionally RLAIF labeling and GRPO), then "
                          "print and write a table (held-out accuracy, metrics, mean reward, KL to SFT per model) "
                          "and a plot.")
    parser.add_argument("config", help="pipeline YAML (e.g. configs/quickstart/pipeline.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="overrides like output_dir=runs/p stages.ppo.steps=20 'stages.sft.overrides=[train.steps=50]'")


def run(args) -> dict:
    """`jaxalign pipeline`."""
    result = run_pipeline(args.config, args.overrides)
    print(result["table"])
    print(f"wrote {result['files']['table_md']}, {result['files']['table_json']} and {result['files']['plot']} "
          f"({result['seconds']:.0f}s)")
    return result


__all__ = ["ITERATIVE", "POLICIES", "REQUIRED", "STAGES", "eval_settings", "format_table", "label_files",
           "label_policy", "label_round", "load_pipeline", "plot_stages", "round_names", "run_label_stage",
           "run_pipeline", "stage_overrides", "table_columns"]
