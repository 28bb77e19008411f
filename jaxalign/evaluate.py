"""Evaluation of policies on held-out prompts, and `jaxalign eval`.

    rows = evaluate_models({"base": base, "GRPO": tuned}, tokenizer, prompts,
                           checker="jaxalign.data.arithmetic:just_the_number",
                           metrics=arithmetic.METRICS, reference=base, chat=True)
    print(format_table(rows))

Every model greedily completes every prompt (`max_new_tokens`, stopping at EOS); one row
per model holds:

* accuracy: the mean of the checker's per-sample scores (floats, or bools as 0/1);
* one column per extra metric: the mean of its per-sample values;
* mean_reward: a reward model's mean score of the prompt + completion (None without one);
* mean_length: response tokens per prompt (the EOS included); ended: the fraction that
  stopped at EOS within `max_new_tokens`;
* kl_to_<reference_name>: mean over prompts of sum_t [log p_model(y_t | x, y_<t) -
  log p_ref(y_t | x, y_<t)] along the model's own greedy completion y (EOS included): a
  single-sample estimate of KL(model || reference) restricted to the greedy path; exactly 0
  for the reference itself (None without a reference).

Checkers and metrics are reward functions, `(prompts, completions) -> per-sample scores`,
given as callables or `"module:function"` (`jaxalign.algos.rollout.load_reward_fn`), so any
RL reward function is also a checker. They see what RL reward functions see: the prompt
text the model was given (a string as is, or the chat-rendered text) and the decoded
completion without special tokens.

Prompts are strings or chat messages (lists of `{role, content}`). Messages are rendered
with the tokenizer's chat template and its generation prompt; a string is encoded as is
with the tokenizer's specials (BOS), as RL training encodes it
(`jaxalign.algos.rollout.load_prompts`), unless `chat` is true: then it is wrapped as one
user turn first. `chat="auto"`: true when the tokenizer has a chat template.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos.constitutional import read_prompts, use_chat
from jaxalign.algos.rollout import (Prompts, RewardModel, RolloutSettings, call_reward_fn, decode_responses,
                                    load_prompts, load_reward_fn, response_logprobs, sample)
from jaxalign.data import arithmetic
from jaxalign.errors import ConfigError, DataError
from jaxalign.parallel.rules import batch_size_multiple
from jaxalign.sampling import left_pad, pad_token_id, stop_token_ids

log = logging.getLogger(__name__)

# The bundled tiny task's checker (exact match of copy/reverse, `jaxalign.data.tasks.check_answer`).
DEFAULT_CHECKER = "jaxalign.algos.ppo:task_reward"
TITLES = {"accuracy": "accuracy", "mean_reward": "mean reward", "mean_length": "mean length", "ended": "ended"}


# ---------------------------------------------------------------------------- prompts and completions


def encode_prompts(tokenizer, prompts: Sequence, *, chat: bool | str = False, max_prompt_length: int) -> Prompts:
    """Token ids and texts (what checkers see) of `prompts` (strings or chat messages; see the
    module docstring for `chat`). A prompt longer than `max_prompt_length` tokens is an error."""
    wrap = use_chat(tokenizer, chat)
    rows = [{"prompt": [{"role": "user", "content": p}] if wrap and isinstance(p, str) else p} for p in prompts]
    out = load_prompts(rows, tokenizer, max_prompt_length=max_prompt_length, truncation="skip")
    if len(out) != len(rows):
        raise DataError(f"{len(rows) - len(out)} of {len(rows)} prompts cannot be evaluated "
                        f"({out.stats.drop_reasons}): each needs a non-empty prompt of at most {max_prompt_length} "
                        "tokens (the model's context minus max_new_tokens); shorten them or lower max_new_tokens")
    return out


@dataclasses.dataclass
class Completions:
    """Greedy completions of `n` prompts, as `rollout.sample` lays them out: prompt in columns
    `< prompt_length` (left-padded), response after it."""

    input_ids: np.ndarray       # [n, P + N] int32
    attention_mask: np.ndarray  # [n, P + N] int32, 1 = real token
    response_mask: np.ndarray   # [n, N] int32, 1 on generated tokens up to and including EOS
    eos: np.ndarray             # [n] int32, 1 if the response ended with a stop token
    prompt_length: int
    texts: list[str]            # decoded responses, special tokens dropped

    def batches(self, size: int):
        """Row slices of at most `size` rows, as `sample` batches."""
        for s in range(0, len(self.texts), size):
            yield {"input_ids": self.input_ids[s:s + size], "attention_mask": self.attention_mask[s:s + size],
                   "response_mask": self.response_mask[s:s + size], "eos": self.eos[s:s + size]}


def greedy_completions(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                       batch_size: int) -> Completions:
    """Greedy decoding in fixed-shape batches (one compile): every batch is left-padded to the
    longest prompt rounded up to 16 tokens, and the last batch is filled with copies of its first row."""
    stop = stop_token_ids(model.config, tokenizer)
    pad = pad_token_id(model.config, tokenizer, stop)
    p = -(-max(len(r) for r in prompt_ids) // 16) * 16
    m = batch_size_multiple(model.mesh)
    batch = -(-max(1, min(batch_size, len(prompt_ids))) // m) * m
    settings = RolloutSettings(prompt_length=p, response_length=max_new_tokens, temperature=1.0,
                               eos_token_ids=stop, pad_token_id=pad)
    parts = []
    for s in range(0, len(prompt_ids), batch):
        chunk = list(prompt_ids[s:s + batch])
        ids, mask = left_pad(chunk, pad, length=p, batch=batch)
        out = sample(model.params, model.config, ids, mask, jax.random.key(0), settings, model.mesh, greedy=True)
        parts.append({k: v[:len(chunk)] for k, v in out.items()})
    cat = {k: np.concatenate([b[k] for b in parts]) for k in ("input_ids", "attention_mask", "response_mask", "eos")}
    return Completions(**cat, prompt_length=p, texts=decode_responses(tokenizer, cat, p))


@functools.partial(jax.jit, static_argnames=("config", "prompt_length"))
def _response_logprob_sums(params, config, input_ids, attention_mask, response_mask, prompt_length: int):
    logp, _ = response_logprobs(params, config, input_ids, attention_mask, prompt_length, temperature=1.0)
    return jnp.sum(jnp.where(response_mask > 0, logp, 0.0), axis=1)


def sequence_logprobs(model, completions: Completions, batch_size: int) -> np.ndarray:
    """[n]: log p_model(response | prompt), summed over the response tokens (EOS included)."""
    out = [np.asarray(_response_logprob_sums(model.params, model.config, b["input_ids"], b["attention_mask"],
                                             b["response_mask"], completions.prompt_length))
           for b in completions.batches(batch_size)]
    return np.concatenate(out).astype(np.float64)


def reward_scores(scorer: RewardModel, completions: Completions, batch_size: int) -> np.ndarray:
    """[n]: the reward model's score of each prompt + completion."""
    return np.concatenate([scorer(b, completions.prompt_length) for b in completions.batches(batch_size)]
                          ).astype(np.float64)


# ---------------------------------------------------------------------------- the evaluation


def resolve(fn: str | Callable, what: str) -> Callable:
    """A checker or metric: a callable as is, or `"module:function"` imported (`what` names it in errors)."""
    return fn if callable(fn) else load_reward_fn(fn, what)


def evaluate_models(models: Mapping[str, object], tokenizer, prompts: Sequence, *,
                    checker: str | Callable | None = DEFAULT_CHECKER,
                    metrics: Mapping[str, str | Callable] | None = None, reward_model: str | RewardModel | None = None,
                    reference=None, reference_name: str = "reference", chat: bool | str = False,
                    max_new_tokens: int = 32, batch_size: int = 16, samples: int = 1) -> list[dict]:
    """One row per model (see the module docstring for the columns): `{"model": name,
    "accuracy", <metric names>, "mean_reward", "mean_length", "ended", "kl_to_<reference_name>",
    "seconds", "samples"}`, where `samples` holds the first `samples` prompts with their
    completion and checker score. `checker=None`: accuracy is None. `reward_model`: an HF
    directory or a `RewardModel`; `reference`: a model with the same vocabulary."""
    if not models:
        raise ConfigError("evaluate_models: no models to evaluate")
    if not prompts:
        raise DataError("evaluate_models: no prompts to evaluate on")
    check = resolve(checker, "checker") if checker is not None else None
    extra = {name: resolve(fn, f"metric {name}") for name, fn in (metrics or {}).items()}
    first = next(iter(models.values()))
    if reference is not None and reference.config.vocab_size != first.config.vocab_size:
        raise ConfigError(f"the reference model's vocabulary ({reference.config.vocab_size} tokens) differs from the "
                          f"evaluated model's ({first.config.vocab_size}); KL needs the same tokenizer")
    scorer = RewardModel.load(reward_model, first, tokenizer) if isinstance(reward_model, str) else reward_model
    limit = first.config.max_position_embeddings - max_new_tokens
    if limit < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                          f"{first.config.max_position_embeddings} tokens")
    encoded = encode_prompts(tokenizer, prompts, chat=chat, max_prompt_length=limit)
    rows = []
    for name, model in models.items():
        t0 = time.time()
        c = greedy_completions(model, tokenizer, encoded.ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
        scores = call_reward_fn(check, encoded.texts, c.texts) if check else None
        row = {"model": name, "accuracy": None if scores is None else float(np.mean(scores))}
        for metric, fn in extra.items():
            row[metric] = float(np.mean(call_reward_fn(fn, encoded.texts, c.texts)))
        row["mean_reward"] = float(np.mean(reward_scores(scorer, c, batch_size))) if scorer else None
        row["mean_length"] = float(np.mean(c.response_mask.sum(1)))
        row["ended"] = float(np.mean(c.eos))
        kl = None
        if reference is not None:
            lp = sequence_logprobs(model, c, batch_size)  # both score this model's own completions
            lp_ref = lp if model is reference else sequence_logprobs(reference, c, batch_size)
            kl = float(np.mean(lp - lp_ref))
        row[f"kl_to_{reference_name}"] = kl
        row["seconds"] = round(time.time() - t0, 1)
        row["samples"] = [{"prompt": prompts[i], "completion": c.texts[i],
                           "score": None if scores is None else float(scores[i])}
                          for i in range(min(samples, len(prompts)))]
        rows.append(row)
        log.info("eval %s: %s (%.1fs)", name, ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                      if isinstance(v, float)), row["seconds"])
    return rows


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None,
                 titles: Mapping[str, str] | None = None, percent: Sequence[str] = ("accuracy",)) -> str:
    """Markdown table, a row per model. `columns`: default every numeric column of the rows
    except `seconds`; `titles`: header per column (default `TITLES`, `kl_to_x` -> "KL to x");
    `percent`: columns shown as percentages (others with 3 decimals; None is "n/a")."""
    if columns is None:
        columns = [k for k, v in rows[0].items() if k not in ("model", "seconds", "samples")
                   and (v is None or isinstance(v, (int, float)))]
    names = {**TITLES, **(titles or {})}

    def title(c):
        return names.get(c) or (f"KL to {c[len('kl_to_'):]}" if c.startswith("kl_to_") else c.replace("_", " "))

    lines = ["| model | " + " | ".join(title(c) for c in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("n/a" if v is None else f"{v:.1%}" if c in percent else f"{v:.3f}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (a temp file next to it, then `os.replace`)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- jaxalign eval


@dataclasses.dataclass(frozen=True)
class Task:
    """A bundled evaluation task: its held-out prompts, checker, metrics and chat default."""

    prompts: Callable[[int], list]
    checker: str
    metrics: Mapping[str, str]
    chat: bool | str


def _tiny_prompts(n: int) -> list:
    return read_prompts("builtin:tiny/eval.jsonl", max_rows=n)


TASKS = {
    "tiny": Task(_tiny_prompts, DEFAULT_CHECKER, {}, chat=False),
    "arithmetic": Task(arithmetic.eval_prompts, arithmetic.CHECKER, arithmetic.METRICS, chat="auto"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `jaxalign eval`."""
    parser.description = ("Greedy-decode held-out prompts with a model (optionally + LoRA adapter) and report the "
                          "checker's accuracy, extra metrics, a reward model's mean score, mean response length and "
                          "KL to a reference model: a markdown table on stdout and JSON in --out.")
    parser.add_argument("model", help="HF model directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", default=None,
                        help="prompts: .jsonl/.json/.parquet with a 'prompt' column (strings or chat messages), "
                             "builtin:tiny/eval.jsonl, or .txt (one per line)")
    source.add_argument("--task", choices=sorted(TASKS),
                        help="a bundled task's fixed held-out prompts, with its checker and metrics as defaults "
                             "(arithmetic: accuracy = just_the_number, plus number_only and sum_right rates)")
    parser.add_argument("--n", type=int, default=None, help="prompts to evaluate: the first N (default: 64 with "
                        "--task, every row with --prompts)")
    parser.add_argument("--checker", default=None, help="module:function scoring (prompts, completions) per sample; "
                        "the accuracy column (default: the task's; required with --prompts)")
    parser.add_argument("--metric", action="append", default=[], metavar="[NAME=]module:function",
                        help="an extra per-sample metric, reported as its mean (repeatable; NAME defaults to the "
                             "function's name)")
    parser.add_argument("--reward-model", default=None, help="reward model directory: adds its mean score")
    parser.add_argument("--reference", default=None, help="reference model directory: adds KL(model || reference) "
                        "along the model's greedy completions")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap string prompts as a user turn with the tokenizer's chat template (default: on for "
                             "--task arithmetic when the tokenizer has a template, off otherwise; chat-message "
                             "prompts are always rendered with it)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--dtype", default=None, help="params dtype (default: the checkpoint's)")
    parser.add_argument("--out", default="results.json", help="JSON file to write the results to")


def _metric_specs(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for v in values:
        name, _, spec = v.rpartition("=")
        if not spec or ":" not in spec:
            raise ConfigError(f"--metric {v!r} must look like 'module:function' or 'NAME=module:function'")
        out[name or spec.rsplit(":", 1)[1]] = spec
    return out


def run(args: argparse.Namespace) -> dict:
    """`jaxalign eval`: print the table, write the JSON (`--out`), return the result."""
    import jaxalign as ja
    from jaxalign.sampling import load_for_inference

    t0 = time.time()
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be >= 1")
    task = TASKS[args.task] if args.task else None
    checker = args.checker or (task.checker if task else None)
    if checker is None:
        raise ConfigError("--prompts needs --checker module:function (e.g. jaxalign.data.arithmetic:just_the_number "
                          f"or {DEFAULT_CHECKER}), or use --task")
    metrics = {**(task.metrics if task else {}), **_metric_specs(args.metric)}
    resolve(checker, "--checker")  # bad specs fail before any model loads
    for name, spec in metrics.items():
        resolve(spec, f"--metric {name}")
    for flag in ("reward_model", "reference"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"--{flag.replace('_', '-')} {path!r} does not exist; pass an HF model directory "
                              "(or a .gguf file)")
    if task:
        prompts = task.prompts(args.n or 64)
    else:
        prompts = read_prompts(args.prompts, max_rows=args.n, messages=True)
    chat = args.chat if args.chat is not None else (task.chat if task else False)

    model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype)
    reference = ja.load_model(args.reference, dtype=args.dtype) if args.reference else None
    name = os.path.basename(os.path.normpath(args.model))
    if args.adapter:
        name += " + " + os.path.basename(os.path.normpath(args.adapter))
    rows = evaluate_models({name: model}, tokenizer, prompts, checker=checker, metrics=metrics,
                           reward_model=args.reward_model, reference=reference, chat=chat,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=len(prompts))
    columns = ["accuracy", *metrics, "mean_length", "ended"]
    columns += ["mean_reward"] if args.reward_model else []
    columns += ["kl_to_reference"] if reference is not None else []
    rates = ["accuracy", *metrics, "ended"]
    percent = [c for c in rates if all(r[c] is None or 0.0 <= r[c] <= 1.0 for r in rows)]
    table = format_table(rows, columns, percent=percent)
    result = {"model": args.model, "adapter": args.adapter, "task": args.task, "prompts": args.prompts,
              "n": len(prompts), "checker": checker, "metrics": metrics, "chat": use_chat(tokenizer, chat),
              "reward_model": args.reward_model, "reference": args.reference, "max_new_tokens": args.max_new_tokens,
              "rows": rows, "table": table, "seconds": round(time.time() - t0, 1)}
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_text(args.out, json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out} ({len(prompts)} prompts, {result['seconds']:.0f}s)")
    return result


__all__ = ["DEFAULT_CHECKER", "TASKS", "Completions", "add_arguments", "encode_prompts", "evaluate_models",
           "format_table", "greedy_completions", "reward_scores", "run", "sequence_logprobs", "write_text"]
