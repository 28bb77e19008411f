"""Exceptions that say what is wrong and what to do about it."""

import difflib
from collections.abc import Iterable


def closest(name: str, valid: Iterable[str], cutoff: float = 0.5) -> str | None:
    """The entry of `valid` most like `name` (difflib ratio >= `cutoff`), or None: the
    "did you mean" of an error message."""
    match = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=cutoff)
    return match[0] if match else None


class JaxalignError(Exception):
    """Base class of jaxalign's user-facing errors."""


class UnsupportedModelError(JaxalignError, ValueError):
    """A checkpoint uses a model family or feature jaxalign does not implement."""


class CheckpointError(JaxalignError, ValueError):
    """A model directory or checkpoint is missing, incomplete or corrupt."""


class ShardingError(JaxalignError, ValueError):
    """A mesh or sharding rule does not fit the devices or the parameter shapes."""


class ConfigError(JaxalignError, ValueError):
    """A configuration key or value is invalid."""


class DataError(JaxalignError, ValueError):
    """A dataset is missing, empty or lacks the columns its format needs."""


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint holds a different train state than this run's config builds."""


class NonFiniteLossError(JaxalignError, FloatingPointError):
    """Training produced a NaN/inf loss or gradient (or skipped more such steps than allowed)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says where it can be resumed from."""
