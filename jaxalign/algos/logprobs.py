"""Log-probabilities of label tokens, computed in chunks over the sequence.

The one log-prob function every objective uses (SFT cross-entropy, DPO sequence log-probs,
PPO ratios). Logits are formed chunk by chunk from the final hidden states and the LM
head, reduced to per-token statistics in f32, and rematerialized in the backward pass,
so `[B, T, V]` f32 logits never exist at once (vocabularies are 128k-152k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import hidden_states, unembed


def _chunk_stats(params, config: ModelConfig, hidden, labels, temperature):
    logits = unembed(params, hidden, config).astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    probs = jax.nn.softmax(logits, axis=-1)
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    correct = jnp.argmax(logits, axis=-1) == labels
    return label_logit - lse, entropy, correct


def label_logprobs(params, config: ModelConfig, hidden, labels, *, chunk_size: int = 128, temperature: float = 1.0):
    """Per-token statistics of predicting `labels` from `hidden`.

    hidden [B, T, D] (final-norm hidden states), labels [B, T] int (the token each position
    predicts). Returns (logp, entropy, correct), each [B, T]: log p(label) under
    softmax(logits / temperature), the distribution's entropy, and whether label is the argmax.
    """
    b, t, d = hidden.shape
    c = min(chunk_size, t)
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


def token_logprobs(params, config: ModelConfig, batch: dict, *, chunk_size: int = 128, temperature: float = 1.0):
    """Log-prob stats of each token given its prefix, for a batch dict.

    batch: input_ids, positions, segment_ids [B, T]. Returns (logp, entropy, correct) [B, T]
    where entry t scores token t+1 (the last column is 0 / padding): i.e. aligned with
    `targets = input_ids[:, 1:]`, shifted so index t is the prediction made at position t.
    Use `shifted_targets_mask(loss_mask)` to pick the scored entries.
    """
    h = hidden_states(params, config, batch["input_ids"], batch["positions"], batch["segment_ids"])
    labels = jnp.concatenate([batch["input_ids"][:, 1:], jnp.zeros_like(batch["input_ids"][:, :1])], axis=1)
    return label_logprobs(params, config, h, labels, chunk_size=chunk_size, temperature=temperature)


def shifted_targets_mask(loss_mask, segment_ids):
    """[B, T] mask of prediction positions t whose target token t+1 is marked in loss_mask
    and belongs to the same example (packed rows never predict across a boundary)."""
    nxt = loss_mask[:, 1:].astype(bool) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return jnp.concatenate([nxt, jnp.zeros_like(nxt[:, :1])], axis=1)
