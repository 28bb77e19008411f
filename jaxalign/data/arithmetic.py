"""Two-digit addition asked as a chat question, with checkers that double as reward functions.

The prompt is ``"What is 23 plus 48? Reply with just the number."``; the wanted reply is the
bare sum (``"71"``). It separates two skills a small instruct model lacks: getting the sum
right and replying in the asked format. SmolLM2-135M-Instruct, asked as a chat user turn,
gets the sum right about a quarter of the time and never replies with just a number
(``"59 + 63 = 152"``).

Data (:func:`write_dataset`, or ``python -m jaxalign.data.arithmetic OUT_DIR``): ``train.jsonl``
and ``eval.jsonl`` with one row per problem:

* ``prompt``: ``[{"role": "user", "content": make_prompt(a, b)}]`` (chat messages, which RL's
  ``load_prompts`` renders with the tokenizer's chat template and the generation prompt), or
  the plain string with ``chat=False`` (encoded as is, with BOS);
* ``completion``: the answer in the same form (so the files also serve SFT);
* ``a``, ``b``, ``answer``: the numbers.

Splits (:func:`make_splits`) are disjoint as unordered pairs: if ``(23, 48)`` is held out,
neither ``23 + 48`` nor ``48 + 23`` is in the training split. The held-out pairs depend only
on ``seed`` and their count, and a shorter held-out list is a prefix of a longer one, so
``jaxalign eval --task arithmetic --n 64`` always asks the same 64 questions.

Checkers take prompts as RL passes them to a reward function: the bare question, or the
chat-rendered text around it (system/user markup, generation prompt); the numbers are read
from the last ``"What is A plus B"`` in it. As ``module:function`` reward functions
(``(prompts, completions) -> list[float]``):

* :func:`just_the_number`: 1.0 iff the stripped completion is exactly the sum (the accuracy);
* :func:`reward`: the same with partial credit, for GRPO (see its docstring);
* :func:`number_only_scores`, :func:`sum_right_scores`: the two skills separately (metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Sequence

from jaxalign.errors import DataError

LOW, HIGH = 10, 99  # both operands are two-digit numbers
SEED = 0
N_TRAIN, N_EVAL = 4000, 256
PARTIAL = 0.25  # reward() for a bare wrong number, or the right sum with other text

_QUESTION = re.compile(r"What is\s+(\d+)\s+plus\s+(\d+)", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d+")
_BARE_INTEGER = re.compile(r"[+-]?\d+")


def make_prompt(a: int, b: int) -> str:
    return f"What is {a} plus {b}? Reply with just the number."


def parse_prompt(prompt: str) -> tuple[int, int]:
    """``(a, b)`` from the last ``"What is A plus B"`` in ``prompt`` (plain or chat-rendered);
    ``DataError`` if there is none."""
    found = _QUESTION.findall(prompt)
    if not found:
        raise DataError(f"not an arithmetic prompt: {prompt[-200:]!r}; expected text containing 'What is A plus B' "
                        "(jaxalign.data.arithmetic.make_prompt); use these checkers only on that task's prompts")
    a, b = found[-1]
    return int(a), int(b)


def expected_answer(prompt: str) -> int:
    a, b = parse_prompt(prompt)
    return a + b


# ---------------------------------------------------------------------------- per-sample checks


def is_number_only(completion: str) -> bool:
    """The stripped completion is one bare integer (``"71"``, ``"-3"``; not ``"71."`` nor ``"= 71"``)."""
    return _BARE_INTEGER.fullmatch(completion.strip()) is not None


def sum_right(prompt: str, completion: str) -> bool:
    """The last integer in the completion is the sum (``"23 + 48 = 71"`` counts; extra text is allowed)."""
    numbers = _INTEGER.findall(completion)
    return bool(numbers) and int(numbers[-1]) == expected_answer(prompt)


def is_correct(prompt: str, completion: str) -> bool:
    """Exactly the sum as a bare integer, surrounding whitespace aside."""
    return completion.strip() == str(expected_answer(prompt))


# ---------------------------------------------------------------------------- reward functions


def _check_lengths(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt")


def just_the_number(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 where the completion is exactly the right sum as a bare integer, else 0.0 (:func:`is_correct`)."""
    _check_lengths(prompts, completions)
    return [float(is_correct(p, c)) for p, c in zip(prompts, completions)]


def number_only_scores(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 where the completion is a bare integer, right or wrong (:func:`is_number_only`)."""
    _check_lengths(prompts, completions)
    return [float(is_number_only(c)) for c in completions]


def sum_right_scores(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 where the completion's last integer is the sum, whatever surrounds it (:func:`sum_right`)."""
    _check_lengths(prompts, completions)
    return [float(sum_right(p, c)) for p, c in zip(prompts, completions)]


def reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Shaped reward for GRPO: 1.0 for exactly the right bare number; ``PARTIAL`` (0.25) for a
    bare but wrong number, or for the right sum with other text around it; 0.0 otherwise.

    Why partial credit: GRPO's advantage is the reward relative to the other samples of the
    same prompt, so a group whose samples all score the same teaches nothing. A model that
    never replies with a bare number would get all-zero groups under :func:`just_the_number`;
    crediting each of the two skills (format, arithmetic) separately gives most groups a
    spread. The two partial credits are equal, so neither skill is traded for the other, and
    together (0.5) they stay below a fully right answer (1.0), so the full answer always wins.
    """
    _check_lengths(prompts, completions)
    out = []
    for p, c in zip(prompts, completions):
        if is_correct(p, c):
            out.append(1.0)
        elif is_number_only(c) or sum_right(p, c):
            out.append(PARTIAL)
        else:
            out.append(0.0)
    return out


# Metrics `jaxalign eval --task arithmetic` reports beside the accuracy (just_the_number).
CHECKER = "jaxalign.data.arithmetic:just_the_number"
METRICS = {"number_only": "jaxalign.data.arithmetic:number_only_scores",
           "sum_right": "jaxalign.data.arithmetic:sum_right_scores"}


# ---------------------------------------------------------------------------- data


def make_splits(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(train, eval)`` lists of ``(a, b)`` with ``LOW <= a, b <= HIGH``, no pair twice, and no
    unordered pair in both (see the module docstring). The eval list depends only on ``seed``
    and is a prefix of any longer one."""
    numbers = range(LOW, HIGH + 1)
    unordered = [(a, b) for a in numbers for b in numbers if a <= b]
    if n_eval < 0 or n_train < 0 or n_eval > len(unordered):
        raise DataError(f"n_eval={n_eval}, n_train={n_train}: both must be >= 0 and n_eval <= {len(unordered)} "
                        f"(the distinct unordered pairs of numbers {LOW}..{HIGH})")
    rng = random.Random(seed)
    rng.shuffle(unordered)
    held = unordered[:n_eval]
    eval_pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in held]  # either order
    held_set = set(held)
    train_pool = [(a, b) for a in numbers for b in numbers if (min(a, b), max(a, b)) not in held_set]
    if n_train > len(train_pool):
        raise DataError(f"n_train={n_train} exceeds the {len(train_pool)} pairs left after holding out {n_eval}; "
                        "lower n_train or n_eval")
    random.Random(seed + 1).shuffle(train_pool)
    return train_pool[:n_train], eval_pairs


def make_rows(pairs: Sequence[tuple[int, int]], chat: bool = True) -> list[dict]:
    """Dataset rows (``prompt``, ``completion``, ``a``, ``b``, ``answer``) of ``pairs``."""
    rows = []
    for a, b in pairs:
        prompt, answer = make_prompt(a, b), str(a + b)
        if chat:
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "completion": [{"role": "assistant", "content": answer}]}
        else:
            row = {"prompt": prompt, "completion": answer}
        rows.append({**row, "a": a, "b": b, "answer": a + b})
    return rows


def eval_prompts(n: int = 64, seed: int = SEED) -> list[str]:
    """The first ``n`` held-out questions as plain strings (what ``jaxalign eval --task arithmetic`` asks)."""
    return [make_prompt(a, b) for a, b in make_splits(seed, 0, n)[1]]


def write_dataset(out_dir: str, seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL,
                  chat: bool = True) -> dict[str, str]:
    """Write ``train.jsonl`` and ``eval.jsonl`` to ``out_dir``; returns ``{split: path}``."""
    train, held = make_splits(seed, n_train, n_eval)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, pairs in (("train", train), ("eval", held)):
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for row in make_rows(pairs, chat):
                f.write(json.dumps(row) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxalign.data.arithmetic", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="directory to write train.jsonl and eval.jsonl to")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--n-eval", type=int, default=N_EVAL)
    ap.add_argument("--plain", action="store_true",
                    help="plain-string prompts/completions instead of chat messages (for models without a chat "
                         "template)")
    args = ap.parse_args(argv)
    paths = write_dataset(args.out_dir, args.seed, args.n_train, args.n_eval, chat=not args.plain)
    print(f"wrote {paths['train']} ({args.n_train} rows) and {paths['eval']} ({args.n_eval} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
