"""`ja.Model` (config + params) and `ja.load_model` for Hugging Face checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxalign.errors import CheckpointError, ShardingError
from jaxalign.models import hf
from jaxalign.models.config import ModelConfig, from_hf_dict, to_hf_dict
from jaxalign.models.llama import hidden_states, init_params, unembed
from jaxalign.nn.seams import dense, is_weight_type
from jaxalign.parallel.rules import batch_sharding, batch_size_multiple, named_shardings, path_str

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def canonical_dtype(dtype) -> str:
    """'bf16' / jnp.bfloat16 / 'bfloat16' -> 'bfloat16' (and the same for f32, f16)."""
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
    return _DTYPES[name]


def resolve_compute_dtype(compute_dtype, dtype) -> str:
    """The activation dtype: `compute_dtype`, where "auto" means bfloat16 on accelerators
    (GPU, TPU) and float32 on CPU, and None means `dtype` (the params' dtype)."""
    if compute_dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return canonical_dtype(compute_dtype or dtype)


def positions_from_mask(attention_mask):
    """Positions [B, T] counting real tokens only (left padding starts at 0 after the pads)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _forward_logits(params, input_ids, attention_mask, config):
    mask = attention_mask.astype(jnp.int32)
    h = hidden_states(params, config, input_ids, positions_from_mask(mask), mask)
    return unembed(params, h, config).astype(jnp.float32)


_logits = jax.jit(_forward_logits, static_argnames=("config",))


def _forward_scores(params, config, input_ids, attention_mask):
    from jaxalign.models.heads import sequence_scores

    return sequence_scores(params, config, input_ids, attention_mask)


_scores = jax.jit(_forward_scores, static_argnames=("config",))


@functools.lru_cache(maxsize=32)
def _sharded_logits_fn(config: ModelConfig, mesh: Mesh, param_shardings_key):
    param_shardings = param_shardings_key.tree
    data = batch_sharding(mesh, 2)
    out = batch_sharding(mesh, 3)

    def fn(params, input_ids, attention_mask):
        return _forward_logits(params, input_ids, attention_mask, config)

    return jax.jit(fn, in_shardings=(param_shardings, data, data), out_shardings=out)


class _TreeKey:
    """Hashable, comparable wrapper of a tree of shardings (for caching jitted functions)."""

    def __init__(self, tree):
        self.tree = tree
        self.leaves, self.treedef = jax.tree_util.tree_flatten(tree)

    def __hash__(self):
        return hash((str(self.treedef), tuple(self.leaves)))

    def __eq__(self, other):
        return isinstance(other, _TreeKey) and self.treedef == other.treedef and self.leaves == other.leaves


@dataclasses.dataclass(frozen=True)
class Model:
    """A causal LM: `config` (ModelConfig) and `params` (nested dict of arrays / weight types).

    `mesh` is the device mesh the params are sharded over (None: one device).
    """

    config: ModelConfig
    params: Any
    mesh: Mesh | None = None

    def logits(self, input_ids, attention_mask=None):
        """Logits [B, T, V] (f32) for ids [B, T]; mask [B, T] is 1 on real tokens.

        Left or right padding: positions count real tokens only, pads are never attended.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if self.mesh is None:
            return _logits(self.params, input_ids, attention_mask, self.config)
        n = batch_size_multiple(self.mesh)
        if input_ids.shape[0] % n:
            raise ShardingError(
                f"batch size {input_ids.shape[0]} is not divisible by the mesh's data x fsdp size {n}; "
                "pad the batch to a multiple of it"
            )
        shardings = jax.tree.map(lambda x: x.sharding, self.params)
        fn = _sharded_logits_fn(self.config, self.mesh, _TreeKey(shardings))
        return fn(self.params, input_ids, attention_mask)

    def hidden_states(self, input_ids, positions, segment_ids):
        """Final hidden states [B, T, D]; see `jaxalign.models.llama.hidden_states`."""
        return hidden_states(self.params, self.config, input_ids, positions, segment_ids)

    def scores(self, input_ids, attention_mask=None):
        """Reward scores [B] (f32) at each row's last real token; needs a `score` head
        (a reward model, see `jaxalign.models.heads`)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return _scores(self.params, self.config, input_ids, jnp.asarray(attention_mask, jnp.int32))

    def num_params(self) -> int:
        return self.config.num_params()

    def save_pretrained(self, out_dir: str, dtype=None, max_shard_bytes: int = 5 * 2**30,
                        pad_token_id: int | None = None) -> None:
        """Write config.json + safetensors that transformers' AutoModelForCausalLM loads.

        LoRA adapters are merged and quantized weights dequantized on the way out. Params
        with a `score` head (a reward model) are written as `*ForSequenceClassification`
        (num_labels=1; pad_token_id as given, else the config's, else EOS) without lm_head.
        """
        from jaxalign.models import heads

        params = jax.tree.map(dense, self.params, is_leaf=is_weight_type)
        dtype = canonical_dtype(dtype or self.config.param_dtype)
        reward = heads.has_score_head(params)
        if reward:
            params = {k: v for k, v in params.items() if k != "lm_head"}
        hf.save_params(params, out_dir, self.config.num_hidden_layers, dtype=jnp.dtype(dtype),
                       max_shard_bytes=max_shard_bytes)
        d = to_hf_dict(self.config, torch_dtype=dtype)
        if reward:
            d = heads.seq_cls_hf_dict(d, self.config.model_type, heads.export_pad_token_id(self.config, pad_token_id))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(d, f, indent=2)


def _shardings(abstract, mesh: Mesh | None, rules=None):
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract)
    return named_shardings(abstract, mesh, rules)


def load_model(path: str, dtype=None, mesh: Mesh | None = None, *, compute_dtype=None, rules=None,
               quantize: str | None = None, quant_block_size: int | None = None, double_quant: bool = False,
               head: str = "auto", **config_overrides) -> Model:
    """Load an HF checkpoint directory (config.json + safetensors), or a llama.cpp `.gguf`
    file (converted once into the cache, see `jaxalign.models.gguf`), as a `Model`.

    dtype: the params' dtype (default: the checkpoint's declared dtype, else float32).
    compute_dtype: activation dtype (default: dtype; "auto": see `resolve_compute_dtype`).
    mesh: shard each tensor straight into its devices per the sharding rules. quantize:
    "int8" | "int4" | "nf4" quantizes the decoder-layer kernels tensor by tensor while
    loading (see `jaxalign.quant`).
    head: which output head to load: "lm" (`lm_head`, absent when tied), "score" (a reward
    head `score.weight` [1, D] of a *ForSequenceClassification checkpoint, as params["score"]
    = {"kernel": [D, 1]}), "none" (the decoder only), "auto" ("score" for a
    *ForSequenceClassification checkpoint, else "lm"). See `jaxalign.models.heads`.
    Extra keyword arguments override ModelConfig fields (e.g. remat="full").
    """
    from jaxalign.models import gguf, heads

    path = gguf.resolve(path)
    if head not in ("auto", "lm", "score", "none"):
        raise ValueError(f"head={head!r} is not valid; use 'auto', 'lm', 'score' or 'none'")
    d = hf.read_config(path)
    if head == "auto":
        head = "score" if heads.is_sequence_classification(d) else "lm"
    declared = d.get("dtype") or d.get("torch_dtype") or "float32"
    dtype = canonical_dtype(dtype or declared)
    config = from_hf_dict(d, os.path.join(path, "config.json"), param_dtype=dtype,
                          dtype=resolve_compute_dtype(compute_dtype, dtype), **config_overrides)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    if head != "lm":
        abstract = {k: v for k, v in abstract.items() if k != "lm_head"}
    if head == "score":
        abstract["score"] = {"kernel": jax.ShapeDtypeStruct((config.hidden_size, 1), jnp.dtype(dtype))}
    transform = None
    if quantize is not None:
        from jaxalign.peft import quant

        def transform(p, array):
            if quant.is_kernel_path(p) and "layers" in p.split("."):
                return quant.quantize_array(array, quantize, quant_block_size, double_quant, name=p)
            return array

    params = hf.load_params(path, abstract, _shardings(abstract, mesh, rules), config.num_hidden_layers,
                            config.tie_word_embeddings or head != "lm", transform)
    if quantize is not None and mesh is not None:
        params = jax.device_put(params, named_shardings(params, mesh, rules))
    return Model(config, params, mesh)


@jax.jit
def _nonfinite_counts(params) -> list[jax.Array]:
    """Per leaf: NaN/inf counts per layer `[L]` for stacked (`layers`) leaves, else one count `[1]`."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        bad = ~jnp.isfinite(x) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, bool)
        stacked = "layers" in path_str(path).split(".") and x.ndim > 0
        out.append(jnp.sum(bad.reshape(x.shape[0], -1) if stacked else bad.reshape(1, -1), axis=1))
    return out


def check_finite(params, source: str) -> None:
    """CheckpointError naming the first tensor (by its HF name) of `params` that holds NaN
    or inf values: the checkpoint at `source` is damaged, training on it gives NaN losses."""
    counts = jax.device_get(_nonfinite_counts(params))
    for (path, leaf), per_layer in zip(jax.tree_util.tree_flatten_with_path(params)[0], counts):
        if per_layer.any():
            i = int(np.argmax(per_layer > 0))
            name = hf.hf_names(path_str(path), len(per_layer))[i]
            raise CheckpointError(
                f"the weights loaded from {source} are not finite: tensor {name} has {int(per_layer[i])} NaN/inf "
                f"values; the checkpoint is damaged: re-download or re-export it")


def init_model(config: ModelConfig, rng, mesh: Mesh | None = None, rules=None) -> Model:
    """A randomly initialized Model, created directly in its shards."""
    abstract = jax.eval_shape(lambda: init_params(config, rng))
    shardings = _shardings(abstract, mesh, rules)
    params = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(config, rng)
    return Model(config, params, mesh)


__all__ = ["Model", "canonical_dtype", "check_finite", "init_model", "load_model", "positions_from_mask",
           "resolve_compute_dtype"]
