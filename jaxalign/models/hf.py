"""Hugging Face checkpoints <-> our parameter tree.

Names map generically: our path `model.layers.self_attn.q_proj.kernel` (stacked [L, in, out])
is HF's `model.layers.{i}.self_attn.q_proj.weight` ([out, in]) for each layer i; `kernel`
leaves are transposed, `scale`/`embedding` become `weight`, `bias` stays `bias`.
Only safetensors are read (pickle-based .bin files are refused).
"""

from __future__ import annotations

import glob
import json
import logging
import os

import jax
import numpy as np

from jaxalign.errors import CheckpointError
from jaxalign.models.tensorfiles import SafetensorsFile, save_file
from jaxalign.parallel.rules import path_str
from jaxalign.paths import inside

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def hf_names(path: str, num_layers: int) -> list[str]:
    """HF tensor names of the leaf at dotted `path` (one per layer for stacked leaves)."""
    parts = path.split(".")
    parts[-1] = _HF_LEAF.get(parts[-1], parts[-1])
    if "layers" in parts:
        i = parts.index("layers")
        return [".".join(parts[: i + 1] + [str(layer)] + parts[i + 1 :]) for layer in range(num_layers)]
    return [".".join(parts)]


def is_transposed(path: str) -> bool:
    """Whether the leaf at `path` is stored transposed relative to HF ([in, out] vs [out, in])."""
    return path.endswith(".kernel")


def read_config(model_dir: str) -> dict:
    """The parsed config.json of an HF model directory, with a clear error if absent or invalid."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist; pass a local HF checkpoint directory")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download or re-export the model") from e


def open_weights(model_dir: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the safetensors file holding it (single or sharded checkpoints)."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path} is corrupt ({e}); re-download or re-export the model") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path} is corrupt: its weight_map must map tensor names to shard file "
                                  "names; re-download or re-export the model")
        files: dict[str, SafetensorsFile] = {}
        for fname in sorted(set(weight_map.values())):
            fpath = inside(model_dir, fname)
            if fpath is None:
                raise CheckpointError(f"{index_path} lists shard {fname!r}, which points outside {model_dir}; "
                                      "shard names are relative to the model directory (no absolute paths or '..')")
            if not os.path.exists(fpath):
                raise CheckpointError(
                    f"{index_path} lists shard {fname}, which is missing from {model_dir}; "
                    "the download is incomplete: fetch the missing shard"
                )
            files[fname] = SafetensorsFile(fpath)
        return {name: files[fname] for name, fname in weight_map.items()}
    paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not paths:
        pickled = [p for ext in ("*.bin", "*.pt", "*.pth") for p in glob.glob(os.path.join(model_dir, ext))]
        if pickled:
            raise CheckpointError(
                f"{model_dir} holds only pickle-based weights ({os.path.basename(pickled[0])}); jaxalign loads "
                "safetensors only, since unpickling can run arbitrary code. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{model_dir} contains no *.safetensors weights")
    out: dict[str, SafetensorsFile] = {}
    for p in paths:
        f = SafetensorsFile(p)
        out.update({name: f for name in f.names()})
    return out


def load_params(model_dir: str, abstract_params, shardings, num_layers: int, tied: bool, transform=None):
    """Read each leaf of `abstract_params` (ShapeDtypeStructs) into its sharding.

    Each device's shard is read straight from the memory-mapped file: the whole model is
    never assembled on one device (or in host memory) first. `transform(path, array)`, if
    given, replaces each leaf as soon as it is read (e.g. quantization while loading, so
    peak memory stays near the transformed size).
    """
    weights = open_weights(model_dir)
    used: set[str] = set()

    def load_leaf(path, sds, sharding):
        p = path_str(path)
        names = hf_names(p, num_layers)
        stacked = len(names) > 1 or "layers" in p.split(".")
        transposed = is_transposed(p)
        expected = sds.shape[1:] if stacked else sds.shape
        hf_shape = tuple(reversed(expected)) if transposed else tuple(expected)
        for name in names:
            if name not in weights:
                raise CheckpointError(
                    f"checkpoint {model_dir} has no tensor {name} (expected shape {list(hf_shape)}), "
                    f"needed for {p}; the checkpoint does not match its config.json"
                )
            got = weights[name].shape(name)
            if got != hf_shape:
                raise CheckpointError(
                    f"tensor {name} in {weights[name].path} has shape {list(got)} but the config implies "
                    f"{list(hf_shape)}; the checkpoint does not match its config.json"
                )
        used.update(names)

        def read(index):
            if stacked:
                layer_idx, rest = index[0], index[1:]
                chunks = [read_one(names[i], rest) for i in range(num_layers)[layer_idx]]
                return np.stack(chunks).astype(sds.dtype)
            return read_one(names[0], index).astype(sds.dtype)

        def read_one(name, index):
            t = weights[name].tensor(name)
            if transposed:
                return np.asarray(t[index[1], index[0]]).T
            return np.asarray(t[tuple(index)])

        array = jax.make_array_from_callback(sds.shape, sharding, read)
        return transform(p, array) if transform is not None else array

    params = jax.tree_util.tree_map_with_path(load_leaf, abstract_params, shardings)
    unused = [n for n in weights if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if tied:
        unused = [n for n in unused if n != "lm_head.weight"]
    if unused:
        log.warning("ignored %d checkpoint tensors not used by the model, e.g. %s", len(unused), unused[:3])
    return params


def save_params(params, out_dir: str, num_layers: int, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `params` (dense arrays) as HF safetensors, sharded with an index past `max_shard_bytes`."""
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = path_str(path)
        arr = np.asarray(jax.device_get(leaf))
        if dtype is not None:
            arr = arr.astype(dtype)
        names = hf_names(p, num_layers)
        pieces = list(arr) if "layers" in p.split(".") else [arr]
        for name, piece in zip(names, pieces):
            if is_transposed(p):
                piece = piece.T
            if sizes[-1] and sizes[-1] + piece.nbytes > max_shard_bytes:
                shards.append({})
                sizes.append(0)
            shards[-1][name] = np.ascontiguousarray(piece)
            sizes[-1] += piece.nbytes
    os.makedirs(out_dir, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname))
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
