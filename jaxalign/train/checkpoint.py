"""Checkpoints with orbax: train state + loop metadata, last-N retention, async saves,
integrity fingerprints, fallback to an older step when the newest is damaged, and a
separate error when an intact checkpoint holds a different train state than the run's."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxalign.errors import CheckpointError, CheckpointMismatchError

log = logging.getLogger(__name__)


@jax.jit
def fingerprint(tree) -> jax.Array:
    """[num_leaves, 2] f32: sum and sum of squares of every leaf (cheap on-device integrity check)."""
    rows = [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
            for x in jax.tree.leaves(tree)]
    return jnp.stack(rows) if rows else jnp.zeros((0, 2))


def _matches(stored, actual) -> bool:
    stored, actual = np.asarray(stored, np.float64), np.asarray(actual, np.float64)
    return stored.shape == actual.shape and np.allclose(stored, actual, rtol=1e-4, atol=1e-6)


def _layout(tree) -> dict[str, tuple]:
    """{"params/layers/w": (shape, dtype)} of every leaf; dict keys, attributes and indices alike."""
    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    return {"/".join(name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def layout_differences(saved, wanted) -> list[str]:
    """Leaves that differ between two trees of arrays / shape-dtype structs, one line each."""
    a, b = _layout(saved), _layout(wanted)
    out = [f"{k}: only in the checkpoint" for k in a if k not in b]
    out += [f"{k}: not in the checkpoint" for k in b if k not in a]
    out += [f"{k}: {a[k][0]} {a[k][1]} in the checkpoint, {b[k][0]} {b[k][1]} here"
            for k in a if k in b and a[k] != b[k]]
    return out


class Checkpointer:
    """Saves `(state, meta)` under `<dir>/<step>`; `meta` is a JSON dict (data position, ...)."""

    def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state, meta: dict) -> None:
        meta = dict(meta, fingerprint=np.asarray(fingerprint(state)).tolist())
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)))
        if not saved:  # orbax refuses a step at or before one it already has
            raise CheckpointError(f"checkpoint step {step} was not saved: {self.directory} already has steps "
                                  f"{self.steps()}; use a new output_dir or delete the newer steps")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state):
        """(state, meta, step) of the newest intact checkpoint, or None if there is none.

        A damaged newest checkpoint (unreadable or failing its fingerprint) is reported and
        the previous one is tried; damaged steps newer than the one restored are deleted, so
        that the run saves those steps again. If none is intact, CheckpointError says what to
        do; an intact checkpoint whose tree differs from `abstract_state` (another model,
        LoRA or optimizer setup) raises CheckpointMismatchError naming the differing leaves.
        """
        steps = self.steps()
        if not steps:
            return None
        problems: dict[int, str] = {}
        for step in reversed(steps):
            self._check_layout(step, abstract_state)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                state, meta = restored["state"], restored["meta"]
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                problems[step] = f"step {step}: unreadable ({type(e).__name__}: {str(e)[:200]})"
                log.warning("checkpoint %s/%d is unreadable; trying an older one", self.directory, step)
                continue
            if not _matches(meta.get("fingerprint", []), fingerprint(state)):
                problems[step] = f"step {step}: contents do not match the fingerprint saved with them"
                log.warning("checkpoint %s/%d failed its integrity check; trying an older one", self.directory, step)
                continue
            if problems:
                log.warning("resuming from step %d after skipping damaged checkpoints (%s); deleting them",
                            step, "; ".join(problems.values()))
                for bad in problems:
                    self.manager.delete(bad)
            return state, meta, step
        raise CheckpointError(
            f"every checkpoint in {self.directory} is damaged ({'; '.join(problems.values())}); delete the "
            "directory to start over, or restore it from a backup"
        )

    def _check_layout(self, step: int, abstract_state) -> None:
        """CheckpointMismatchError if the saved tree's leaves (names, shapes, dtypes) differ
        from `abstract_state`'s; unreadable metadata is left to the restore to report."""
        try:
            saved = self.manager.item_metadata(step)["state"].tree
        except Exception:  # damaged metadata: the restore reports it as damage
            return
        diff = layout_differences(saved, abstract_state)
        if diff:
            raise CheckpointMismatchError(f"checkpoint {self.directory}/{step} holds a different train state than "
                                          f"this run builds ({len(diff)} leaves differ, e.g. {'; '.join(diff[:2])})")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
