"""`jaxalign pipeline PIPELINE.yaml`: the whole seed pipeline, SFT -> reward model -> PPO and
SFT -> DPO, then one comparison table and a plot of every stage's training curves.

Each stage is an ordinary training run, `jaxalign.train.loop.train(load_config(config,
overrides))`, with its `output_dir` under the pipeline's and model paths chained:

    sft     output_dir=OUT/sft     (every stage also gets train.export=true: final/ is needed)
    reward  output_dir=OUT/reward  model.path=OUT/sft/final
    ppo     output_dir=OUT/ppo     model.path=OUT/sft/final  ppo.reward_model=OUT/reward/final
    dpo     output_dir=OUT/dpo     model.path=OUT/sft/final

(the stage's own `overrides` from the pipeline file are applied after these, so they win).
A stage that already finished resumes from its last checkpoint and only re-exports.

The table (printed, and written as OUT/table.md and OUT/table.json) compares base (the
SFT stage's random initialization), SFT, PPO and DPO on the held-out prompts
(`jaxalign.evaluate.evaluate_models`, the reference being SFT):

* accuracy: exact match (`jaxalign.data.tasks.check_answer`) of greedy generations;
* mean reward: the trained reward model's mean score of those greedy completions;
* KL to SFT: mean over prompts of sum_t [log p_model(y_t | x, y_<t) - log p_sft(y_t | x, y_<t)]
  over the model's own greedy completion y (EOS included): a single-sample estimate of
  KL(model || SFT) restricted to the greedy path (0 for SFT itself).

OUT/curves.png has one row per stage (train loss | eval metrics); each stage dir also gets
its own `curves.png` (`jaxalign.plot.plot_run`).

Pipeline file::

    output_dir: runs/quickstart/pipeline
    stages:                 # all four; config paths are relative to this file
      sft:    {config: sft.yaml, overrides: [...], steps: 600}   # steps: shorthand for train.steps
      reward: {config: reward.yaml}
      ppo:    {config: ppo.yaml}
      dpo:    {config: dpo.yaml}
    eval: {data: builtin:tiny/eval.jsonl, max_examples: 200, max_new_tokens: 12, batch_size: 100}
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence

from jaxalign import evaluate
from jaxalign.errors import ConfigError

log = logging.getLogger(__name__)

STAGES = ("sft", "reward", "ppo", "dpo")
POLICIES = ("sft", "ppo", "dpo")  # stages whose final/ is a policy evaluated in the table
COLUMNS = ("accuracy", "mean_reward", "kl_to_sft")
COLUMN_TITLES = {"accuracy": "held-out accuracy", "mean_reward": "mean reward", "kl_to_sft": "KL to SFT"}
_STAGE_KEYS = ("config", "overrides", "steps")
_EVAL_DEFAULTS = {"data": "builtin:tiny/eval.jsonl", "split": "train", "max_examples": 200, "max_new_tokens": 12,
                  "batch_size": 100}
_TOP_KEYS = ("output_dir", "stages", "eval")


# ---------------------------------------------------------------------------- the pipeline file


def _unknown(key, valid, where):
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"pipeline: unknown key '{where}{key}'{hint}")


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
        raise ConfigError("pipeline: 'stages' must map each of sft, reward, ppo, dpo to {config, overrides}")
    for name in stages:
        if name not in STAGES:
            raise _unknown(name, STAGES, "stages.")
    out = {"output_dir": str(d.get("output_dir") or "runs/pipeline"), "stages": {}, "eval": dict(_EVAL_DEFAULTS)}
    for name in STAGES:
        st = stages.get(name)
        if not isinstance(st, Mapping) or not st.get("config"):
            raise ConfigError(f"pipeline: stages.{name} is missing 'config' (the stage's training YAML)")
        for key in st:
            if key not in _STAGE_KEYS:
                raise _unknown(key, _STAGE_KEYS, f"stages.{name}.")
        cfg_path = str(st["config"])
        if not os.path.isabs(cfg_path) and os.path.exists(os.path.join(base, cfg_path)):
            cfg_path = os.path.join(base, cfg_path)
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"pipeline: stages.{name}.config {st['config']!r} does not exist (looked in {base} "
                              "and the working directory)")
        ov = st.get("overrides") or []
        if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise ConfigError(f"pipeline: stages.{name}.overrides must be a list of 'key=value' strings")
        if st.get("steps") is not None:
            ov = [*ov, f"train.steps={int(st['steps'])}"]
        out["stages"][name] = {"config": cfg_path, "overrides": list(ov)}
    ev = d.get("eval") or {}
    for key, value in ev.items():
        if key not in _EVAL_DEFAULTS:
            raise _unknown(key, tuple(_EVAL_DEFAULTS), "eval.")
        out["eval"][key] = value
    return out


def stage_overrides(name: str, out_dir: str) -> list[str]:
    """The chaining overrides of stage `name` (output dirs and model paths)."""
    run = lambda s: os.path.join(out_dir, s)  # noqa: E731
    sft_final = os.path.join(run("sft"), "final")
    chain = {
        "sft": [],
        "reward": [f"model.path={sft_final}"],
        "ppo": [f"model.path={sft_final}", f"ppo.reward_model={os.path.join(run('reward'), 'final')}",
                "ppo.reward_fn=null", "ppo.reward_adapter=null"],
        "dpo": [f"model.path={sft_final}"],
    }[name]
    return [f"output_dir={run(name)}", "train.export=true", *chain]


def stage_config(p: dict, name: str):
    from jaxalign.config import load_config

    st = p["stages"][name]
    return load_config(st["config"], stage_overrides(name, os.path.abspath(p["output_dir"])) + st["overrides"])


# ---------------------------------------------------------------------------- evaluation


def format_table(rows: Sequence[Mapping]) -> str:
    """Markdown table of the COLUMNS."""
    return evaluate.format_table(rows, COLUMNS, COLUMN_TITLES)


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


def plot_stages(run_dirs: Mapping[str, str], out: str) -> str:
    """One figure: a row per stage, train loss on the left and its eval/* metrics on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxalign.train.metrics import read_metrics

    names = [n for n, d in run_dirs.items() if os.path.exists(os.path.join(d, "metrics.jsonl"))]
    fig, axes = plt.subplots(max(len(names), 1), 2, figsize=(11, 2.8 * max(len(names), 1)), squeeze=False)
    for row, name in zip(axes, names):
        records = read_metrics(run_dirs[name])
        train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
        evals: dict[str, list] = {}
        for r in records:
            for k, v in r.items():
                if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    evals.setdefault(k, []).append((r["step"], v))
        if train:
            xs, ys = zip(*train)
            row[0].plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3)
        row[0].set_title(f"{name}: train loss")
        score = [(r["step"], r["rollout/score"]) for r in records if isinstance(r.get("rollout/score"), (int, float))]
        if score:  # RL stages: the rollouts' mean reward beside the loss
            xs, ys = zip(*score)
            row[0].twinx().plot(xs, ys, "--", color="C1", label="rollout score")
            row[0].set_title(f"{name}: train loss (solid), rollout score (dashed)")
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


def run_pipeline(path: str | Mapping | None, overrides: Sequence[str] = ()) -> dict:
    """Train every stage, evaluate, write OUT/table.md, OUT/table.json and OUT/curves.png.
    Returns {"rows": [...], "table": markdown, "stages": {...}, "files": {...}, "seconds": ...}."""
    import jax

    from jaxalign.algos.constitutional import read_prompts
    from jaxalign.data import load_tokenizer
    from jaxalign.models import load_model
    from jaxalign.plot import plot_run
    from jaxalign.train.loop import build_model, train

    t_start = time.time()
    p = load_pipeline(path, overrides)
    out_dir = os.path.abspath(p["output_dir"])
    os.makedirs(out_dir, exist_ok=True)
    configs = {name: stage_config(p, name) for name in STAGES}  # validate every stage before training any
    stages = {}
    for name in STAGES:
        cfg = configs[name]
        log.info("pipeline stage %s: %s (%d steps) -> %s", name, p["stages"][name]["config"], cfg.train.steps,
                 cfg.output_dir)
        t0 = time.time()
        metrics = train(cfg)
        stages[name] = {"output_dir": cfg.output_dir, "algorithm": cfg.algorithm, "steps": cfg.train.steps,
                        "seconds": round(time.time() - t0, 1),
                        "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        try:
            plot_run(cfg.output_dir)
        except Exception as e:  # noqa: BLE001 - a missing plot must not lose a trained pipeline
            log.warning("could not plot %s: %s", cfg.output_dir, e)
    t_eval = time.time()
    ev = p["eval"]
    prompts = read_prompts(ev["data"], ev["split"], ev["max_examples"])
    final = {name: os.path.join(out_dir, name, "final") for name in STAGES}
    tokenizer = load_tokenizer(final["sft"])
    sft_model = load_model(final["sft"])
    base_cfg = configs["sft"]
    base = build_model(base_cfg, None)  # the SFT stage's starting point (random init from model.config)
    models = {"base": base, "SFT": sft_model, "PPO": load_model(final["ppo"]), "DPO": load_model(final["dpo"])}
    rows = evaluate.evaluate_models(models, tokenizer, prompts, checker=evaluate.DEFAULT_CHECKER,
                                    reward_model=final["reward"], reference=sft_model, reference_name="sft",
                                    max_new_tokens=int(ev["max_new_tokens"]), batch_size=int(ev["batch_size"]))
    eval_seconds = round(time.time() - t_eval, 1)
    table = format_table(rows)
    files = {"table_md": os.path.join(out_dir, "table.md"), "table_json": os.path.join(out_dir, "table.json"),
             "plot": os.path.join(out_dir, "curves.png")}
    plot_stages({name: os.path.join(out_dir, name) for name in STAGES}, files["plot"])
    result = {"rows": rows, "columns": list(COLUMNS), "table": table, "stages": stages,
              "eval": {**ev, "prompts": len(prompts), "seconds": eval_seconds}, "files": files,
              "seconds": round(time.time() - t_start, 1), "devices": str(jax.devices()[0].platform)}
    evaluate.write_text(files["table_md"], f"# jaxalign pipeline: {out_dir}\n\n{table}\n\n"
                        f"Held-out prompts: {len(prompts)} from {ev['data']}; greedy decoding, max "
                        f"{ev['max_new_tokens']} new tokens. Stage times (s): "
                        + ", ".join(f"{n} {s['seconds']}" for n, s in stages.items())
                        + f", eval {eval_seconds}; total {result['seconds']}.\n")
    evaluate.write_text(files["table_json"], json.dumps(result, indent=2, default=str) + "\n")
    return result


def add_arguments(parser) -> None:
    parser.description = ("Run SFT -> reward model -> PPO and SFT -> DPO on the embedded task, then print and write a "
                          "table (held-out accuracy, mean reward, KL to SFT for base/SFT/PPO/DPO) and a plot.")
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


__all__ = ["COLUMNS", "STAGES", "format_table", "load_pipeline", "plot_stages", "run_pipeline",
           "stage_overrides"]
