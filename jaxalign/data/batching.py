"""Batches: padding to bucket lengths, packing, and a resumable per-process iterator.

A batch is a dict of numpy arrays, all ``[B, T]`` int32:

* ``input_ids``: token ids; padding = ``pad_id``.
* ``attention_mask``: 1 = real token, 0 = padding.
* ``loss_mask``: 1 = token ``t`` is a target (predicted from tokens ``< t`` of its own
  segment); never 1 on padding or on the first token of a segment.
* ``positions``: 0, 1, 2... within each segment (restarting per packed example); 0 on padding.
* ``segment_ids``: 0 = padding, ``k >= 1`` = the ``k``-th example in the row (always 1
  when not packing). Attention must stay within equal, non-zero segment ids.

Preference pairs (items with ``chosen_ids``) give ``chosen_*`` and ``rejected_*`` versions
of the five arrays, padded to one common ``T`` (one forward pass over both), where the
sequence is prompt + response and ``loss_mask`` covers the response; plus ``margin``
float32 ``[B]`` and, per side, ``score_at`` int32 ``[B, K]`` (:func:`score_positions`): the
prediction positions ``t`` whose output is scored (token ``t + 1`` is a target), left-aligned,
``-1`` = none, so a loss can run the LM head on those ``K`` positions only. ``K`` is the same
for both sides and follows the whole global batch (:func:`pairs_score_width`).

Right padding everywhere; ``T`` is one of a few bucket lengths (padding) or ``seq_len``
(packing), so the number of compiled shapes stays bounded (:attr:`BatchIterator.shapes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.errors import DataError

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")
SCORE_AT = "score_at"


def default_buckets(max_length: int, min_length: int = 16) -> list[int]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length``."""
    if max_length < 1:
        raise DataError(f"max_length must be positive, got {max_length}")
    out, b = [], min_length
    while b < max_length:
        out.append(b)
        b *= 2
    return out + [max_length]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= length``; ``DataError`` if none fits."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise DataError(
        f"a sequence of {length} tokens does not fit the largest bucket ({max(buckets)}); "
        "tokenize with max_length <= the largest bucket, or add a larger bucket"
    )


def _empty(rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((rows, length), np.int32) for k in BATCH_KEYS}
    out["input_ids"][:] = pad_id
    return out


def pad_batch(examples: Sequence[Mapping[str, np.ndarray] | None], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, right-padded to ``length``; ``None`` entries are all-padding rows."""
    out = _empty(len(examples), length, pad_id)
    for r, ex in enumerate(examples):
        if ex is None:
            continue
        n = len(ex["input_ids"])
        if n > length:
            raise DataError(f"example of {n} tokens is longer than the batch length {length}")
        out["input_ids"][r, :n] = ex["input_ids"]
        out["attention_mask"][r, :n] = 1
        out["loss_mask"][r, :n] = ex["loss_mask"]
        out["loss_mask"][r, 0] = 0
        out["positions"][r, :n] = np.arange(n)
        out["segment_ids"][r, :n] = 1
    return out


def pack_batch(rows: Sequence[Sequence[Mapping[str, np.ndarray]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Several examples per row (segments 1, 2, ...), right-padded to ``seq_len``."""
    out = _empty(len(rows), seq_len, pad_id)
    for r, row in enumerate(rows):
        pos = 0
        for k, ex in enumerate(row, start=1):
            n = len(ex["input_ids"])
            if pos + n > seq_len:
                raise DataError(f"packed row {r} needs {pos + n} tokens > seq_len={seq_len}")
            sl = slice(pos, pos + n)
            out["input_ids"][r, sl] = ex["input_ids"]
            out["attention_mask"][r, sl] = 1
            out["loss_mask"][r, sl] = ex["loss_mask"]
            out["loss_mask"][r, pos] = 0  # the first token of a segment has nothing to predict it
            out["positions"][r, sl] = np.arange(n)
            out["segment_ids"][r, sl] = k
            pos += n
    return out


def pair_sequences(pair: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A preference pair as two examples: prompt + chosen and prompt + rejected (response targets)."""
    p = np.asarray(pair["prompt_ids"], np.int32)
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        r = np.asarray(pair[key], np.int32)
        mask = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(r), np.int32)])
        out.append({"input_ids": np.concatenate([p, r]), "loss_mask": mask})
    return out[0], out[1]


def score_width(count: int, length: int) -> int:
    """``K`` for a batch of length ``T`` whose rows score at most ``count`` positions: rounded up
    to a multiple of ``max(16, T // 8)`` and at most ``T``: each bucket length gives at most 8
    widths (bounded recompiles), and fewer than ``max(16, T // 8)`` positions are padding."""
    step = max(16, length // 8)
    return min(-(-max(count, 1) // step) * step, length)


def pairs_score_width(pairs: Sequence[Mapping[str, Any] | None], length: int) -> int:
    """:func:`score_width` of preference pairs: a response of ``n`` tokens scores at most ``n``
    positions. Give it the pairs of the whole global batch so every process gets the same ``K``."""
    longest = max((max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs if p is not None), default=0)
    return score_width(longest, length)


def score_positions(loss_mask: np.ndarray, segment_ids: np.ndarray, width: int) -> np.ndarray:
    """``[N, width]`` int32: each row's prediction positions ``t`` (token ``t + 1`` is marked in
    ``loss_mask`` and in the same segment as ``t``), in order, then ``-1``. The host-side twin
    of ``jaxalign.algos.logprobs.shifted_targets_mask`` (same rule, as indices)."""
    nxt = loss_mask[:, 1:].astype(bool) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    out = np.full((len(nxt), width), -1, np.int32)
    for r, row in enumerate(nxt):
        t = np.flatnonzero(row)
        if len(t) > width:
            raise DataError(f"row {r} scores {len(t)} positions > width {width}")
        out[r, : len(t)] = t
    return out


def pad_pairs(pairs: Sequence[Mapping[str, Any] | None], length: int, pad_id: int,
              width: int | None = None) -> dict[str, np.ndarray]:
    """Preference pairs as ``chosen_*``/``rejected_*`` ``[B, length]`` arrays, ``*_score_at``
    ``[B, width]`` (default: :func:`pairs_score_width` of these pairs) + ``margin`` ``[B]``."""
    width = pairs_score_width(pairs, length) if width is None else width
    seqs = [pair_sequences(p) if p is not None else (None, None) for p in pairs]
    out = {}
    for i, name in enumerate(("chosen", "rejected")):
        padded = pad_batch([s[i] for s in seqs], length, pad_id)
        padded[SCORE_AT] = score_positions(padded["loss_mask"], padded["segment_ids"], width)
        for k, v in padded.items():
            out[f"{name}_{k}"] = v
    out["margin"] = np.array([0.0 if p is None else float(p.get("margin", 0.0)) for p in pairs], np.float32)
    return out


def _length(item: Mapping[str, Any]) -> int:
    if "input_ids" in item:
        return len(item["input_ids"])
    if "completion_ids" in item:
        return len(item["prompt_ids"]) + len(item["completion_ids"])
    return len(item["prompt_ids"]) + max(len(item["chosen_ids"]), len(item["rejected_ids"]))


def first_fit_pack(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedy first-fit: each item (in ``order``) goes into the first row with room.

    Returns rows as lists of item indices, in row-creation order. O(n log n): a max-tree
    over row capacities, where not-yet-opened rows have full capacity.
    """
    n = len(order)
    if n == 0:
        return []
    size = 1
    while size < n:
        size *= 2
    tree = [seq_len] * (2 * size)
    rows: list[list[int]] = []
    for idx in order:
        need = int(lengths[idx])
        if need > seq_len:
            raise DataError(
                f"example {idx} has {need} tokens > seq_len={seq_len}; tokenize with max_length <= seq_len"
            )
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        leaf = node - size
        if leaf == len(rows):
            rows.append([])
        rows[leaf].append(idx)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


class BatchIterator:
    """Deterministic, resumable iterator of batches (dicts of numpy arrays, see module doc).

    ``examples``: SFT examples (``input_ids``, ``loss_mask``) or preference pairs
    (``prompt_ids``, ``chosen_ids``, ``rejected_ids``[, ``margin``]); unpaired examples
    (``prompt_ids``, ``completion_ids``) need a subclass that builds their batches (KTO's).
    ``batch_size``: the *global* batch size in rows; this process yields rows
    ``[process_index * B/P, (process_index + 1) * B/P)`` of each global batch, so each
    yielded batch has ``B // process_count`` rows. The global batch sequence depends only
    on (examples, batch_size, seed, shuffle, packing, seq_len, buckets, drop_last), never on
    the process count.

    Each epoch visits examples in ``np.random.default_rng([seed, epoch]).permutation`` order
    (or in order with ``shuffle=False``).
    * padding (``packing=False``): consecutive runs of B examples form a batch, padded to the
      smallest of ``buckets`` that fits its longest sequence (default
      :func:`default_buckets` of the longest example).
    * packing (``packing=True``, SFT only): examples are first-fit packed into rows of
      ``seq_len`` tokens; consecutive runs of B rows form a batch.
    ``drop_last``: drop the last incomplete batch of an epoch (:attr:`left_out_per_epoch`
    counts its examples in epoch 0: a different random subset each epoch when shuffling);
    otherwise it is filled with all-padding rows (every mask 0), so shapes stay the same.
    ``num_epochs=None`` repeats forever. :meth:`state` / :meth:`restore` resume exactly at
    the next batch.
    ``len(it)`` / ``steps_per_epoch``: batches in epoch 0 (with packing, later epochs can
    differ by a batch or so, since rows depend on the order).
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        packing: bool = False,
        buckets: Sequence[int] | None = None,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        *,
        seq_len: int | None = None,
        pad_id: int = 0,
        num_epochs: int | None = None,
    ):
        if len(examples) == 0:
            raise DataError("no examples to batch (did every row get dropped? check the DataStats)")
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
        if batch_size % process_count:
            raise DataError(
                f"global batch_size={batch_size} is not divisible by process_count={process_count}; "
                "use a multiple of the number of processes"
            )
        self.examples = examples
        self.pairs = "input_ids" not in examples[0]
        keys = set(examples[0])
        if self.pairs and not ({"prompt_ids", "chosen_ids", "rejected_ids"} <= keys
                               or {"prompt_ids", "completion_ids"} <= keys):
            raise DataError(
                f"examples must have input_ids + loss_mask (SFT), prompt_ids + chosen_ids + rejected_ids "
                f"(preference) or prompt_ids + completion_ids (unpaired); got keys {sorted(examples[0])}"
            )
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.seed, self.shuffle, self.packing, self.drop_last = seed, shuffle, packing, drop_last
        self.process_index, self.process_count = process_index, process_count
        self.pad_id, self.num_epochs = pad_id, num_epochs
        self.lengths = np.fromiter((_length(e) for e in examples), np.int64, len(examples))
        longest = int(self.lengths.max())
        if packing:
            if self.pairs:
                raise DataError("packing is not supported for preference pairs; use packing=False (buckets)")
            if seq_len is None:
                raise DataError("packing=True needs seq_len (the packed row length)")
            if longest > seq_len:
                bad = int(np.argmax(self.lengths))
                raise DataError(
                    f"example {bad} has {longest} tokens > seq_len={seq_len}; tokenize with max_length <= seq_len"
                )
            self.seq_len = seq_len
            self.buckets = [seq_len]
        else:
            self.buckets = sorted(set(int(b) for b in buckets)) if buckets else default_buckets(seq_len or longest)
            if longest > self.buckets[-1]:
                bad = int(np.argmax(self.lengths))
                raise DataError(
                    f"example {bad} has {longest} tokens > largest bucket {self.buckets[-1]}; "
                    "tokenize with max_length <= the largest bucket, or add a larger bucket"
                )
            self.seq_len = self.buckets[-1]
        self.epoch, self.step = 0, 0
        self._plan_epoch, self._plan = None, None
        self.seen_shapes: set[tuple[int, int]] = set()
        plan = self._epoch_plan(0)
        self.steps_per_epoch = len(plan)
        self.left_out_per_epoch = len(examples) - sum(len(row) for batch in plan for row in batch)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(examples)} examples ({'packed rows' if packing else 'rows'}: too few) make no full batch of "
                f"{batch_size}; lower batch_size or pass drop_last=False"
            )

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every ``[rows, T]`` shape this iterator can yield (one per bucket)."""
        return [(self.local_batch_size, b) for b in self.buckets]

    def _epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        """Global batches of the epoch: each a list of B rows, a row a list of example indices."""
        if self._plan_epoch == epoch:
            return self._plan
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.packing:
            rows = first_fit_pack(self.lengths, order.tolist(), self.seq_len)
        else:
            rows = [[int(i)] for i in order]
        B = self.batch_size
        batches = [rows[i : i + B] for i in range(0, len(rows), B)]
        if batches and len(batches[-1]) < B:
            if self.drop_last:
                batches.pop()
            else:
                batches[-1] = batches[-1] + [[] for _ in range(B - len(batches[-1]))]
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def _materialize(self, batch: list[list[int]]) -> dict[str, np.ndarray]:
        lo = self.process_index * self.local_batch_size
        local = batch[lo : lo + self.local_batch_size]
        if self.packing:
            out = pack_batch([[self.examples[i] for i in row] for row in local], self.seq_len, self.pad_id)
        else:
            # The bucket (and pairs' score width) follows the whole *global* batch so every process
            # gets the same shapes.
            longest = max((int(self.lengths[row[0]]) for row in batch if row), default=1)
            length = bucket_for(longest, self.buckets)
            items = [self.examples[row[0]] if row else None for row in local]
            if self.pairs:
                width = pairs_score_width([self.examples[row[0]] for row in batch if row], length)
                out = pad_pairs(items, length, self.pad_id, width)
            else:
                out = pad_batch(items, length, self.pad_id)
        self.seen_shapes.add(next(iter(out.values())).shape)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        plan = self._epoch_plan(self.epoch)
        out = self._materialize(plan[self.step])
        self.step += 1
        if self.step >= len(plan):
            self.epoch, self.step = self.epoch + 1, 0
        return out

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def state(self) -> dict[str, int]:
        """Where the next batch comes from: ``{"epoch", "step", "seed", "num_examples"}`` (JSON-able)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_examples": len(self.examples)}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from :meth:`state`; the following batches equal those of the saved run."""
        for key in ("seed", "num_examples"):
            mine = self.seed if key == "seed" else len(self.examples)
            if key in state and int(state[key]) != mine:
                raise DataError(
                    f"iterator state has {key}={state[key]} but this iterator has {key}={mine}; "
                    "restore with the same dataset and seed as the saved run"
                )
        epoch, step = int(state["epoch"]), int(state["step"])
        if step < 0 or epoch < 0 or step >= len(self._epoch_plan(epoch)):
            raise DataError(f"iterator state {dict(state)} is out of range ({self.steps_per_epoch} steps per epoch)")
        self.epoch, self.step = epoch, step
