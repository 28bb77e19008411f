"""Checkpoints with orbax: train state + loop metadata, last-N retention, async saves,
integrity fingerprints, and fallback to an older step when the newest is damaged."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxalign.errors import CheckpointError

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


class Checkpointer:
    """Saves `(state, meta)` under `<dir>/<step>`; `meta` is a JSON dict (data position, ...)."""

    def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, meta: dict) -> None:
        meta = dict(meta, fingerprint=np.asarray(fingerprint(state)).tolist())
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state):
        """(state, meta, step) of the newest intact checkpoint, or None if there is none.

        A damaged newest checkpoint (unreadable or failing its fingerprint) is reported and
        the previous one is tried; if none is intact, CheckpointError says what to do.
        """
        steps = self.steps()
        if not steps:
            return None
        problems = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                state, meta = restored["state"], restored["meta"]
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                problems.append(f"step {step}: unreadable ({type(e).__name__}: {str(e)[:200]})")
                log.warning("checkpoint %s/%d is unreadable; trying an older one", self.directory, step)
                continue
            if not _matches(meta.get("fingerprint", []), fingerprint(state)):
                problems.append(f"step {step}: contents do not match the fingerprint saved with them")
                log.warning("checkpoint %s/%d failed its integrity check; trying an older one", self.directory, step)
                continue
            if problems:
                log.warning("resuming from step %d after skipping damaged checkpoints: %s", step, "; ".join(problems))
            return state, meta, step
        raise CheckpointError(
            f"every checkpoint in {self.directory} is damaged ({'; '.join(problems)}); delete the directory "
            "to start over, or restore it from a backup"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
