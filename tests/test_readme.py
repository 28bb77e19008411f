"""Every ```python block of README.md runs as written (in an empty working directory).

A block that cannot run here is preceded by an `<!-- not-run: reason -->` line."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCK = re.compile(r"(<!-- not-run: [^>]*-->\s*)?```python\n(.*?)```", re.S)


def python_blocks() -> list[tuple[int, str, bool]]:
    """(line number, code, marked not-run) of each python block."""
    text = open(README).read()
    return [(text[: m.start(2)].count("\n") + 1, m.group(2), m.group(1) is not None) for m in BLOCK.finditer(text)]


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert [line for line, _, skipped in BLOCKS if not skipped]


@pytest.mark.parametrize("line,code,skipped", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_python_block_runs(line, code, skipped, tmp_path, monkeypatch):
    if skipped:
        pytest.skip(f"README.md line {line} is marked not-run")
    monkeypatch.chdir(tmp_path)
    # Padded so that a traceback points at the README's own line numbers.
    exec(compile("\n" * (line - 1) + code, README, "exec"), {"__name__": "readme"})
