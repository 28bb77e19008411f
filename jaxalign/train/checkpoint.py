"""Checkpoints with orbax: train state + loop metadata, last-N retention, async saves,
integrity fingerprints, fallback to an older step when the newest is damaged, a
separate error when an intact checkpoint holds a different train state than the run's, and
one CheckpointError for a full disk (orbax's background-thread tracebacks of it are hidden)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil

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


def _disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it came from, is a full disk (OSError ENOSPC or tensorstore's message)."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _HideDiskFull(logging.Filter):
    """Drops orbax's error logs of a full disk (a traceback per writer thread): `Checkpointer` reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_disk_full(record.exc_info[1] if record.exc_info else None)
                    or "No space left on device" in record.getMessage())


_HIDE_DISK_FULL = _HideDiskFull()


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class Checkpointer:
    """Saves `(state, meta)` under `<dir>/<step>`; `meta` is a JSON dict (data position, ...)."""

    def __init__(self, directory: str, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                               create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._writing: tuple[int, int] | None = None  # (step, bytes) of the save in progress
        logging.getLogger("absl").addFilter(_HIDE_DISK_FULL)

    @contextlib.contextmanager
    def _full_disk_reported(self):
        """Turns a full disk during the save in progress into one CheckpointError (and closes the manager)."""
        try:
            yield
        except Exception as e:
            if not _disk_full(e) or self._writing is None:
                raise
            error = self._disk_full_error(*self._writing)
            with contextlib.suppress(Exception):
                self.manager.close()
            raise error from None

    def _disk_full_error(self, step: int, needed: int) -> CheckpointError:
        older = [s for s in self.steps() if s < step]
        resume = (f"a rerun of the same command resumes from step {older[-1]}, the newest complete checkpoint"
                  if older else "no earlier checkpoint exists, so a rerun starts over")
        return CheckpointError(
            f"disk full while saving checkpoint step {step} in {self.directory}: it needs about {_size(needed)}, "
            f"{_size(shutil.disk_usage(self.directory).free)} are free there. Free space (or lower "
            f"train.keep_checkpoints, or put output_dir on a larger disk); {resume}")

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving (async: in the background); a full disk, found ahead or while writing, is a CheckpointError."""
        self.wait()  # a failed background save is reported, naming its step, before the next one starts
        needed = sum(x.nbytes for x in jax.tree.leaves(state))
        self._writing = (step, needed)
        if needed > shutil.disk_usage(self.directory).free:
            raise self._disk_full_error(step, needed)
        meta = dict(meta, fingerprint=np.asarray(fingerprint(state)).tolist())
        with self._full_disk_reported():
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
        with self._full_disk_reported():
            self.manager.wait_until_finished()
        self._writing = None

    def close(self) -> None:
        self.wait()
        self.manager.close()
