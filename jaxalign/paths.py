"""Path checks done before any work starts: a name must stay inside its directory, and an
output path must be writable (so a long run does not fail at its first write)."""

from __future__ import annotations

import os

from jaxalign.errors import ConfigError


def inside(directory: str, name: str) -> str | None:
    """`directory/name`, or None when `name` is absolute or climbs out of `directory` with `..`."""
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        return None
    return os.path.join(directory, name)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _check_creatable(path: str, what: str) -> None:
    """ConfigError unless `path` (absent) can be created: its nearest existing ancestor is a writable directory."""
    parent = _nearest_existing(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} {path!r} cannot be created: {parent!r} is a file, not a directory; "
                          "choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path!r} cannot be created: directory {parent!r} is not writable; "
                          "choose a path you can write to")


def check_output_dir(path: str, what: str = "output_dir") -> None:
    """ConfigError unless `path` is a writable directory or can be created as one."""
    if not os.path.lexists(path):
        _check_creatable(path, what)
    elif not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a file, not a directory; choose another path or move the file away")
    elif not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path!r} is not writable; choose a directory you can write to")


def check_output_file(path: str, what: str = "--out") -> None:
    """ConfigError unless the file `path` can be written (created or replaced)."""
    if not os.path.lexists(path):
        _check_creatable(path, what)
    elif os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a directory; give a file path")
    elif not os.access(path, os.W_OK) or not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        raise ConfigError(f"{what} {path!r} is not writable; choose a path you can write to")
