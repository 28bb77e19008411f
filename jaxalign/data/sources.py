"""Loading dataset rows: a Hub dataset name, local JSON/JSONL/parquet files, or a list of dicts.

Rows are returned as a ``datasets.Dataset`` (Hub or files) or the given list of dicts; both
iterate as ``dict`` rows and work with :func:`column_names` and the format adapters in
:mod:`jaxalign.data.formats`.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxalign.errors import DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SUFFIXES = (".json.gz", ".jsonl.gz") + tuple(_BUILDERS)


def _builder_for(path: str) -> str:
    for suffix in (".json.gz", ".jsonl.gz"):
        if path.endswith(suffix):
            return "json"
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDERS:
        raise DataError(
            f"cannot tell the file type of {path!r}: expected a .json, .jsonl or .parquet file"
        )
    return _BUILDERS[ext]


def _expand(files: Sequence[str]) -> list[str]:
    """Expand globs and check that every file exists."""
    out: list[str] = []
    for f in files:
        f = os.path.expanduser(str(f))
        matches = sorted(glob.glob(f)) if any(c in f for c in "*?[") else [f]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise DataError(
                f"data file not found: {f!r} (working directory {os.getcwd()!r}); "
                "check the path or pass a Hub dataset name"
            )
        out.extend(matches)
    return out


def _json_problem(path: str) -> str | None:
    """What makes a local .json/.jsonl(.gz) file unreadable as rows: empty, or the first line
    (or, for a JSON array, the position) that is not JSON; None if it parses."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        text = f.read()
    if not text.strip():
        return f"data file {path!r} is empty: it has no rows"
    if ".jsonl" not in path or text.lstrip().startswith("["):  # one JSON document (an array of rows)
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                return f"data file {path!r} is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    for i, line in enumerate(text.splitlines()):  # JSON Lines: one object per line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"data file {path!r} line {i + 1} is not JSON ({e.msg} at column {e.colno}): {line.strip()[:60]!r}"
        if not isinstance(row, dict):
            return f"data file {path!r} line {i + 1} is a JSON {type(row).__name__}, not an object (one row per line)"
    return None


def _looks_like_path(source: str) -> bool:
    return (
        source.lower().endswith(_SUFFIXES)
        or source.startswith((".", "/", "~"))
        or os.path.exists(os.path.expanduser(source))
    )


@contextlib.contextmanager
def _json_loader_quiet():
    """Silences the error log of datasets' JSON loader: `load_rows` reports the failure, naming the line."""
    logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_error(e: Exception, what: str, split: str, local: list[str]) -> DataError:
    """The DataError for `datasets.load_dataset` failing with `e`: a local JSON file's own
    problem (empty, a line that is not JSON) first, else the loader's message with a hint."""
    problem = next((p for f in local if _builder_for(f) == "json" and (p := _json_problem(f))), None)
    if problem is not None:
        return DataError(f"{problem}; fix the file")
    if isinstance(e, (ValueError, KeyError)):
        if "split" in str(e).lower():
            return DataError(f"dataset {what} has no split {split!r}: {e}")
        return DataError(f"cannot load dataset {what}: {e}")
    hint = (
        "if it is a local file, check the path and extension (.json, .jsonl, .parquet); "
        "if it is a Hub dataset, check the name and that the Hub is reachable (or set HF_DATASETS_OFFLINE=1 with a cached copy)"
    )
    return DataError(f"cannot load dataset {what}: {type(e).__name__}: {e}; {hint}")


def load_rows(
    source: str | Sequence[Mapping[str, Any]],
    split: str = "train",
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
):
    """Load dataset rows.

    ``source`` is one of:
      * a list of dicts (returned as a list, after checks);
      * a local ``.json`` / ``.jsonl`` / ``.parquet`` file (globs allowed) - one file is
        one split, so ``split`` is ignored unless ``data_files`` maps split names to files;
      * a local directory of such files, or ``"json"`` / ``"parquet"`` with ``data_files``;
      * a Hugging Face Hub dataset name (``datasets.load_dataset(name, split=split)``).
    Raises :class:`~jaxalign.errors.DataError` for a missing file, an unknown split, a Hub
    dataset that cannot be loaded, or an empty dataset.
    """
    if not isinstance(source, str):
        rows = list(source)
        if not rows:
            raise DataError("the list of rows is empty; pass at least one row (a dict)")
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise DataError(f"row {bad} is a {type(rows[bad]).__name__}, not a dict; rows must be dicts")
        return rows

    import datasets

    what = repr(source)
    local: list[str] = []  # local files, checked when loading fails
    if data_files is not None:
        if isinstance(data_files, Mapping):
            files = {k: _expand([v] if isinstance(v, str) else v) for k, v in data_files.items()}
            first = next(iter(files.values()))[0]
            ds_split = split
            local = [f for fs in files.values() for f in fs]
        else:
            files = _expand([data_files] if isinstance(data_files, str) else list(data_files))
            first = files[0]
            ds_split = "train"
            local = files
        builder = source if source in ("json", "parquet") else _builder_for(first)
        what = f"{source!r} with data_files={data_files!r}"
        kwargs: dict[str, Any] = dict(path=builder, data_files=files, split=ds_split)
    elif _looks_like_path(source):
        path = os.path.expanduser(source)
        if os.path.isdir(path):
            kwargs = dict(path=path, split=split)
        else:
            local = _expand([path])
            kwargs = dict(path=_builder_for(local[0]), data_files=local, split="train")
    else:
        kwargs = dict(path=source, split=split)

    try:
        with _json_loader_quiet():
            ds = datasets.load_dataset(**kwargs)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - network, missing dataset, bad file: all re-raised with context
        raise _load_error(e, what, split, local) from e
    if len(ds) == 0:
        raise DataError(f"dataset {what} (split {kwargs.get('split')!r}) is empty: it has no rows")
    return ds


def column_names(rows) -> list[str]:
    """Column names of a ``datasets.Dataset`` or a list of dicts (union of the first 100 rows' keys)."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    seen: dict[str, None] = {}
    for r in list(rows[:100]):
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def configured_rows(data_cfg, which: str):
    """Rows of the run's `data.train` or `data.eval` (`which`), honouring the configured
    split and `max_eval_examples`; None when that source is not set.

    `data_cfg` is the `data` section of a run config (`jaxalign.config.DataSection`).
    """
    from jaxalign.config import builtin_path

    source = data_cfg.train if which == "train" else data_cfg.eval
    if source is None:
        return None
    rows = load_rows(builtin_path(source), split=data_cfg.train_split if which == "train" else data_cfg.eval_split)
    limit = data_cfg.max_eval_examples
    if which == "eval" and limit is not None:
        rows = rows[:limit] if isinstance(rows, list) else rows.select(range(min(len(rows), limit)))
    return rows
