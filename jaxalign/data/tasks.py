"""The embedded synthetic task: copy or reverse a short lowercase string.

Prompts are ``"copy: abcde\\n"`` or ``"reverse: abcde\\n"`` (3-8 letters ``a-z``); the
completion is the exact answer (``"abcde"`` / ``"edcba"``). Both are checkable by
:func:`check_answer`, which doubles as a 0/1 reward function (:func:`score` gives
exact-match rates per operation).

Why this task: it needs position lookups (easy with RoPE) but no arithmetic. A probe run
(4-layer, d=128, ~0.9M-parameter RoPE decoder from random init, batch 32, AdamW 3e-3, on
2 busy CPU cores) reached 0% -> 49% greedy exact match on 200 held-out problems after 800 steps
(~90 s) and 86% after 1200 steps; copy is learned before reverse, so progress is visible
early and the task is not solved instantly.

Files under :func:`quickstart_dir` (``jaxalign/assets/tiny``), regenerated bit-for-bit by
``python -m jaxalign.data.tasks --write`` (seeded; ``--check`` verifies them):

* ``train.jsonl`` (4000 rows) / ``eval.jsonl`` (200 held-out rows): ``prompt``, ``completion``.
* ``prefs_train.jsonl`` (2000) / ``prefs_eval.jsonl`` (200, the eval prompts): ``prompt``,
  ``chosen`` (correct), ``rejected`` (a plausible wrong answer: the other operation's
  answer, two letters swapped, one letter changed, one dropped or one repeated).
* ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``: the
  character-level tokenizer of :mod:`jaxalign.data.tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import sys
import tempfile
from collections.abc import Sequence

OPS = ("copy", "reverse")
ALPHABET = string.ascii_lowercase
MIN_LEN, MAX_LEN = 3, 8
SEED = 1234
SIZES = {"train": 4000, "eval": 200, "prefs_train": 2000}
FILES = ("train.jsonl", "eval.jsonl", "prefs_train.jsonl", "prefs_eval.jsonl")

_PROMPT_RE = re.compile(r"^(copy|reverse): ([a-z]+)\n?$")


def quickstart_dir() -> str:
    """Absolute path of the embedded assets (tokenizer + task data): ``jaxalign/assets/tiny``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny")


def quickstart_file(name: str) -> str:
    """Path of one embedded file, e.g. ``quickstart_file("train.jsonl")``."""
    return os.path.join(quickstart_dir(), name)


def make_prompt(op: str, s: str) -> str:
    return f"{op}: {s}\n"


def solve(op: str, s: str) -> str:
    if op == "copy":
        return s
    if op == "reverse":
        return s[::-1]
    raise ValueError(f"unknown operation {op!r}; expected one of {OPS}")


def parse_prompt(prompt: str) -> tuple[str, str]:
    """``(op, string)`` from a task prompt; ``ValueError`` if it is not one."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not a task prompt: {prompt!r}; expected 'copy: <letters>\\n' or 'reverse: <letters>\\n'")
    return m.group(1), m.group(2)


def expected_answer(prompt: str) -> str:
    """The correct completion of a task prompt."""
    return solve(*parse_prompt(prompt))


def check_answer(prompt: str, completion: str) -> bool:
    """Exact match of ``completion`` against the answer to ``prompt``.

    Leading/trailing whitespace and a trailing ``"</s>"`` (undecoded EOS) are ignored;
    anything else (extra letters, text after the answer) makes it wrong.
    """
    text = completion.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")].strip()
    return text == expected_answer(prompt)


def score(prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
    """Exact-match rate overall and per operation: ``{"exact_match", "exact_match/copy", ...}``."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    hits: dict[str, list[bool]] = {op: [] for op in OPS}
    for p, c in zip(prompts, completions):
        hits[parse_prompt(p)[0]].append(check_answer(p, c))
    every = [h for v in hits.values() for h in v]
    out = {"exact_match": sum(every) / max(len(every), 1)}
    out.update({f"exact_match/{op}": sum(v) / len(v) for op, v in hits.items() if v})
    return out


def _problem(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(OPS)
    s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
    return op, s


def wrong_answer(op: str, s: str, rng: random.Random) -> str:
    """A plausible wrong answer (never equal to the correct one)."""
    right = solve(op, s)
    other = solve("reverse" if op == "copy" else "copy", s)
    cands = []
    if other != right:
        cands.append(other)
    i = rng.randrange(len(right) - 1)
    if right[i] != right[i + 1]:
        cands.append(right[:i] + right[i + 1] + right[i] + right[i + 2 :])
    j = rng.randrange(len(right))
    c = rng.choice([x for x in ALPHABET if x != right[j]])
    cands.append(right[:j] + c + right[j + 1 :])
    cands.append(right[:-1])
    k = rng.randrange(len(right))
    cands.append(right[: k + 1] + right[k:])
    wrong = rng.choice(cands)
    assert wrong != right
    return wrong


def make_datasets(seed: int = SEED) -> dict[str, list[dict]]:
    """All four splits as lists of rows; eval prompts never appear in the training files."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()

    def unique(n: int) -> list[tuple[str, str]]:
        out = []
        while len(out) < n:
            p = _problem(rng)
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    eval_p = unique(SIZES["eval"])
    train_p = unique(SIZES["train"])
    prefs_p = unique(SIZES["prefs_train"])

    def sft(ps):
        return [{"prompt": make_prompt(op, s), "completion": solve(op, s)} for op, s in ps]

    def prefs(ps):
        return [
            {"prompt": make_prompt(op, s), "chosen": solve(op, s), "rejected": wrong_answer(op, s, rng)}
            for op, s in ps
        ]

    return {"train": sft(train_p), "eval": sft(eval_p), "prefs_train": prefs(prefs_p), "prefs_eval": prefs(eval_p)}


def write_assets(out_dir: str | None = None, seed: int = SEED) -> str:
    """Write the tokenizer and the task files to ``out_dir`` (default :func:`quickstart_dir`)."""
    from jaxalign.data.tokenizer import save_tokenizer

    out_dir = out_dir or quickstart_dir()
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in make_datasets(seed).items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    save_tokenizer(out_dir)
    return out_dir


def check_assets(out_dir: str | None = None) -> list[str]:
    """Names of embedded files that differ from a fresh :func:`write_assets` (empty = up to date)."""
    out_dir = out_dir or quickstart_dir()
    with tempfile.TemporaryDirectory() as tmp:
        write_assets(tmp)
        stale = []
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(out_dir, name)
            with open(os.path.join(tmp, name), "rb") as fresh:
                if not os.path.exists(path) or open(path, "rb").read() != fresh.read():
                    stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxalign.data.tasks", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="(re)generate the embedded assets")
    ap.add_argument("--check", action="store_true", help="exit 1 if the embedded assets are stale")
    ap.add_argument("--out", default=None, help=f"output directory (default {quickstart_dir()})")
    args = ap.parse_args(argv)
    if args.write:
        print(f"wrote {write_assets(args.out)}")
    if args.check:
        stale = check_assets(args.out)
        print("stale: " + ", ".join(stale) if stale else "assets are up to date")
        return 1 if stale else 0
    if not (args.write or args.check):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
