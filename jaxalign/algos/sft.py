"""Supervised fine-tuning: token cross-entropy on completion tokens (prompt masked),
packing-aware; eval adds token accuracy and greedy exact match."""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign.algos.logprobs import shifted_targets_mask, token_logprobs
from jaxalign.errors import DataError


def sft_sums(params, config, batch: dict, chunk_size: int | None = None) -> dict:
    """{name: (sum, count)} for a batch with input_ids, positions, segment_ids, loss_mask [B, T].

    loss: summed negative log-likelihood of every target token (loss_mask marks targets);
    token_accuracy: target tokens that are the unique argmax (a tie counts as wrong);
    exact_match: rows (examples) whose every target is, which is exactly "greedy decoding
    reproduces the completion" (unpacked rows only: a packed row counts as one).
    """
    logp, _, correct = token_logprobs(params, config, batch, chunk_size=chunk_size)
    m = shifted_targets_mask(batch["loss_mask"], batch["segment_ids"])
    n = jnp.sum(m)
    rows = jnp.any(m, axis=1)
    row_exact = jnp.all(correct | ~m, axis=1) & rows
    return {
        "loss": (-jnp.sum(jnp.where(m, logp, 0.0)), n.astype(jnp.float32)),
        "token_accuracy": (jnp.sum(correct & m).astype(jnp.float32), n.astype(jnp.float32)),
        "exact_match": (jnp.sum(row_exact).astype(jnp.float32), jnp.sum(rows).astype(jnp.float32)),
    }


def load_sft_examples(cfg, tokenizer, which: str):
    """Tokenized examples and stats of the train or eval data (`which`), per `cfg.data`."""
    from jaxalign.data import configured_rows, tokenize_sft

    d = cfg.data
    rows = configured_rows(d, which)
    if rows is None:
        return None, None
    examples, stats = tokenize_sft(rows, tokenizer, max_length=d.max_length, truncation=d.truncation,
                                   completion_only=d.completion_only_loss, on_bad_row=d.on_bad_row,
                                   columns=d.columns, system_prompt=d.system_prompt)
    if not examples:
        source = d.train if which == "train" else d.eval
        raise DataError(f"every row of data.{which} {source} was dropped ({stats.rows} rows; {stats.drops()}); "
                        "fix the rows, or check data.max_length")
    return examples, stats


def build(cfg, model, tokenizer):
    """The SFT objective: train/eval batches from `cfg.data` and the token cross-entropy."""
    import jax

    from jaxalign.data import BatchIterator
    from jaxalign.errors import ConfigError
    from jaxalign.train.objective import Objective, check_batch_size

    check_batch_size(cfg.train, model.mesh)
    if cfg.data.train is None:
        raise ConfigError("data.train is not set; give a Hub dataset name or a local json/jsonl/parquet file")
    examples, stats = load_sft_examples(cfg, tokenizer, "train")
    eval_examples, eval_stats = load_sft_examples(cfg, tokenizer, "eval")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    common = dict(batch_size=cfg.train.batch_size, pad_id=pad, buckets=cfg.data.buckets,
                  process_index=jax.process_index(), process_count=jax.process_count())
    train_batches = BatchIterator(examples, seed=cfg.train.seed, shuffle=True, packing=cfg.data.packing,
                                  seq_len=cfg.data.max_length, **common)
    chunk = cfg.train.logprob_chunk
    config = model.config

    def loss_fn(params, batch, rng):
        return sft_sums(params, config, batch, chunk)

    eval_batches = None
    if eval_examples:
        def eval_batches():
            return BatchIterator(eval_examples, shuffle=False, drop_last=False, num_epochs=1,
                                 seq_len=cfg.data.max_length, **common)

    summary = {"train data": {**stats.as_dict(), "left_out_per_epoch": train_batches.left_out_per_epoch},
               "batch shapes (local rows, T)": train_batches.shapes}
    if eval_stats is not None:
        summary["eval data"] = eval_stats.as_dict()
    return Objective(loss_fn=loss_fn, train_batches=train_batches, eval_batches=eval_batches, summary=summary)
