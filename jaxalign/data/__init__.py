"""Data layer: rows -> formats -> token ids + loss masks -> numpy batches.

* :mod:`~jaxalign.data.sources`: :func:`load_rows` (Hub name, local JSON/JSONL/parquet, list of dicts).
* :mod:`~jaxalign.data.formats`: format detection, chat templates, :func:`tokenize_sft`,
  :func:`tokenize_preference`, :func:`tokenize_unpaired`, :func:`tokenize_prompts`, :func:`map_columns` (loss-mask convention: ``loss_mask[t] = 1`` = token ``t`` is a target).
* :mod:`~jaxalign.data.batching`: bucketed padding, packing, :class:`BatchIterator`.
* :mod:`~jaxalign.data.tokenizer`: the embedded character-level tokenizer, :func:`load_tokenizer`.
* :mod:`~jaxalign.data.tasks`: the embedded copy/reverse task, :func:`check_answer`, :func:`quickstart_dir`.

Typical use::

    tok = load_tokenizer()                                   # embedded tiny tokenizer
    rows = load_rows(quickstart_file("train.jsonl"))
    examples, stats = tokenize_sft(rows, tok, max_length=64)
    it = BatchIterator(examples, batch_size=32, seed=0, pad_id=tok.pad_token_id)
    batch = next(it)                                         # dict of int32 [32, T] arrays
"""

from jaxalign.data.batching import (
    BATCH_KEYS,
    BatchIterator,
    bucket_for,
    default_buckets,
    first_fit_pack,
    pack_batch,
    pad_batch,
    pad_pairs,
    pair_sequences,
)
from jaxalign.data.formats import (
    FORMATS,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    DataStats,
    chat_pieces,
    detect_format,
    is_conversational,
    map_columns,
    render_chat,
    split_implicit_messages,
    split_implicit_prompt,
    tokenize_pieces,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
    tokenize_unpaired,
)
from jaxalign.data.sources import column_names, configured_rows, load_rows
from jaxalign.data.tokenizer import build_tokenizer, ensure_pad_token, load_tokenizer

_TASK_NAMES = ("check_answer", "expected_answer", "quickstart_dir", "quickstart_file", "score")


def __getattr__(name):
    # Lazy, so that `python -m jaxalign.data.tasks` does not import the module twice.
    if name in _TASK_NAMES:
        from jaxalign.data import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'jaxalign.data' has no attribute {name!r}")


__all__ = [
    "BATCH_KEYS", "BatchIterator", "bucket_for", "default_buckets", "first_fit_pack", "pack_batch",
    "pad_batch", "pad_pairs", "pair_sequences",
    "FORMATS", "PREFERENCE_FORMATS", "SFT_FORMATS", "DataStats", "chat_pieces", "detect_format",
    "is_conversational", "map_columns", "render_chat", "split_implicit_messages", "split_implicit_prompt",
    "tokenize_pieces", "tokenize_preference", "tokenize_prompts", "tokenize_sft", "tokenize_unpaired",
    "column_names", "configured_rows", "load_rows",
    "check_answer", "expected_answer", "quickstart_dir", "quickstart_file", "score",
    "build_tokenizer", "ensure_pad_token", "load_tokenizer",
]
