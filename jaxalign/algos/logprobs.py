"""Log-probabilities of label tokens, computed in chunks over the sequence.

The one log-prob function every objective uses (SFT cross-entropy, DPO sequence log-probs,
PPO ratios). When the batch's f32 logits are small (at most `LOGITS_BUDGET_BYTES`) they
are formed in one piece and kept for the backward pass, which then costs two LM-head
matmuls. Larger ones are formed chunk by chunk over the sequence from the final hidden
states, reduced to per-token statistics in f32 and rematerialized in the backward pass,
so `[B, T, V]` f32 logits never exist at once (vocabularies are 128k-152k); that trades
a third LM-head matmul for the memory. Objectives that score a few positions of each row
(a response after its prompt) gather those positions' hidden states first
(`token_logprobs_at`), so the LM head never sees the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import hidden_states, unembed

# Largest f32 logits tensor formed in one piece when no chunk size is given (1 GiB).
LOGITS_BUDGET_BYTES = 1 << 30
# Sequence chunk used when the logits exceed the budget.
DEFAULT_CHUNK = 128


def _chunk_stats(params, config: ModelConfig, hidden, labels, temperature):
    logits = unembed(params, hidden, config).astype(jnp.float32) / temperature
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    shifted = logits - top[..., None]
    exp = jnp.exp(shifted)
    total = jnp.sum(exp, axis=-1)
    lse = jnp.log(total)
    label_shifted = jnp.take_along_axis(shifted, labels[..., None], axis=-1)[..., 0]
    entropy = lse - jnp.sum(exp * shifted, axis=-1) / total
    # The label is the one largest logit: a tie (e.g. a collapsed model's equal logits) is wrong.
    correct = (label_shifted >= 0) & (jnp.sum(shifted >= 0, axis=-1) == 1)
    return label_shifted - lse, entropy, correct


def label_logprobs(params, config: ModelConfig, hidden, labels, *, chunk_size: int | None = None,
                   temperature: float = 1.0):
    """Per-token statistics of predicting `labels` from `hidden`.

    hidden [B, T, D] (final-norm hidden states), labels [B, T] int (the token each position
    predicts). Returns (logp, entropy, correct), each [B, T]: log p(label) under
    softmax(logits / temperature), the distribution's entropy, and whether label is the
    unique largest logit (ties count as wrong). chunk_size: sequence positions per
    rematerialized chunk; one >= T means one piece without remat; None picks one piece when
    the f32 logits fit `LOGITS_BUDGET_BYTES`, else `DEFAULT_CHUNK`.
    """
    b, t, d = hidden.shape
    if chunk_size is None:
        chunk_size = t if b * t * config.vocab_size * 4 <= LOGITS_BUDGET_BYTES else DEFAULT_CHUNK
    if chunk_size >= t:
        return _chunk_stats(params, config, hidden, labels, temperature)
    c = chunk_size
    pad = (-t) % c
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
    n = (t + pad) // c
    hs = hidden.reshape(b, n, c, d).swapaxes(0, 1)
    ls = labels.reshape(b, n, c).swapaxes(0, 1)
    stats = jax.checkpoint(lambda h, l: _chunk_stats(params, config, h, l, temperature))

    def body(_, xs):
        return None, stats(*xs)

    _, (logp, ent, cor) = jax.lax.scan(body, None, (hs, ls))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * c)[:, :t]  # noqa: E731
    return unchunk(logp), unchunk(ent), unchunk(cor)


def token_logprobs(params, config: ModelConfig, batch: dict, *, chunk_size: int | None = None,
                   temperature: float = 1.0):
    """Log-prob stats of each token given its prefix, for a batch dict.

    batch: input_ids, positions, segment_ids [B, T]. Returns (logp, entropy, correct) [B, T]
    where entry t scores token t+1 (the last column is 0 / padding): i.e. aligned with
    `targets = input_ids[:, 1:]`, shifted so index t is the prediction made at position t.
    Use `shifted_targets_mask(loss_mask)` to pick the scored entries.
    """
    h = hidden_states(params, config, batch["input_ids"], batch["positions"], batch["segment_ids"])
    return label_logprobs(params, config, h, _next_tokens(batch["input_ids"]), chunk_size=chunk_size,
                          temperature=temperature)


def token_logprobs_at(params, config: ModelConfig, batch: dict, score_at, *, chunk_size: int | None = None,
                      temperature: float = 1.0):
    """`token_logprobs` at the prediction positions `score_at` only: the LM head and softmax
    run on `K` positions instead of `T` (a response's tokens, not the prompt's and padding's).

    batch as `token_logprobs`; score_at [B, K] int: prediction positions t (scoring token t+1),
    -1 = none (e.g. `jaxalign.data.batching.score_positions`). Returns (logp, entropy,
    correct) [B, K]; entries at -1 are meaningless: mask them with `score_at >= 0`.
    """
    h = hidden_states(params, config, batch["input_ids"], batch["positions"], batch["segment_ids"])
    at = jnp.maximum(score_at, 0)
    h = jnp.take_along_axis(h, at[..., None], axis=1)
    labels = jnp.take_along_axis(_next_tokens(batch["input_ids"]), at, axis=1)
    return label_logprobs(params, config, h, labels, chunk_size=chunk_size, temperature=temperature)


def _next_tokens(input_ids):
    """[B, T] labels: entry t is token t+1 (the last is 0)."""
    return jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)


def shifted_targets_mask(loss_mask, segment_ids):
    """[B, T] mask of prediction positions t whose target token t+1 is marked in loss_mask
    and belongs to the same example (packed rows never predict across a boundary)."""
    nxt = loss_mask[:, 1:].astype(bool) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return jnp.concatenate([nxt, jnp.zeros_like(nxt[:, :1])], axis=1)
