"""LoRA as a parameter-tree transform: selected leaves `W` -> `LoraWeight(base=W, a, b, scale)`.

A LoRA leaf stands for `W + scale * a @ b` without ever forming it in the forward pass:

    base [..., in, out]   (plain array or `QuantizedWeight`: QLoRA; frozen)
    a    [..., in, r]     float32, trainable
    b    [..., r, out]    float32, trainable (zero at init, so the model starts unchanged)

`...` is the stacked `layers` axis of scanned decoder layers (or nothing). Embedding
tables `[vocab, dim]` take the same form (`a [vocab, r]`, `b [r, dim]`), as in PEFT.

Typical use::

    params = lora.apply(params, rank=8, alpha=16, targets=["q_proj", "v_proj"], rng=key)
    trainable, frozen = lora.split(params)       # grads and optimizer state for a, b only
    loss(lora.combine(trainable, frozen))        # policy
    loss(lora.disable(params))                   # reference model: same arrays, adapters off
    lora.save_adapter(params, "out/adapter", base="meta-llama/Llama-3.2-1B")  # HF PEFT format

Dropout (PEFT's `lora_dropout`, on the adapter input only) needs randomness the seam does
not have: a training step passes a key with `with_dropout_rng(params, rng)`; without one
(evaluation, generation, the reference model) dropout is off.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from safetensors.numpy import load_file, save_file

from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.nn import seams
from jaxalign.peft import quant
from jaxalign.peft.quant import (QuantizedWeight, dense_shape, is_kernel_path, leaves_by_path,
                                 module_of, path_str, select_targets)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|"
                       r"lora_embedding_A|lora_embedding_B|base_layer\.weight)$")


@struct.dataclass
class LoraWeight:
    """`base + scale * a @ b` (see the module docstring for shapes).

    Static (pytree aux data): `scale` (alpha / r, or alpha / sqrt(r) with rsLoRA),
    `enabled` (False: behaves as `base`), `dropout` (rate on the adapter input).
    `dropout_rng`: a key per layer `[...]`, set by `with_dropout_rng`; None disables dropout.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False)
    enabled: bool = struct.field(pytree_node=False, default=True)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    dropout_rng: jax.Array | None = None

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Shape of the dense weight `[..., in, out]` (from the adapters when they are there: the
        trainable half of `split` has no base)."""
        if hasattr(self.a, "shape") and hasattr(self.b, "shape"):
            return (*self.a.shape[:-1], self.b.shape[-1])
        return dense_shape(self.base)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def logical_axes(self, base_axes: tuple):
        """See `logical_axes_for`."""
        return logical_axes_for(self, base_axes)

    def linear(self, x: jax.Array) -> jax.Array:
        """`x [..., in] -> [..., out]` in `x.dtype`: `x @ base + scale * (x @ a) @ b`.
        The base is frozen: no gradient flows into it."""
        y = seams.linear(x, jax.lax.stop_gradient(self.base))
        if not self.enabled:
            return y
        if self.dropout > 0 and self.dropout_rng is not None:
            keep = jax.random.bernoulli(self.dropout_rng, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.dot(x, self.a.astype(x.dtype)) * self.scale
        return y + jnp.dot(h, self.b.astype(x.dtype))

    def embed(self, ids: jax.Array) -> jax.Array:
        """Rows `ids [...] -> [..., dim]` of `base + scale * a @ b`, in the base dtype."""
        rows = jnp.take(jax.lax.stop_gradient(self.base), ids, axis=0)
        if not self.enabled:
            return rows
        delta = jnp.dot(jnp.take(self.a, ids, axis=0) * self.scale, self.b)
        return (rows + delta).astype(rows.dtype)

    def dense(self) -> jax.Array:
        """The merged weight `base + scale * a @ b` [..., in, out] in the base dtype
        (just the dense base when disabled)."""
        w = seams.dense(self.base)
        if not self.enabled:
            return w
        delta = jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32)) * self.scale
        return (w.astype(jnp.float32) + delta).astype(w.dtype)


def is_lora(x) -> bool:
    """Whether `x` is a LoRA leaf."""
    return isinstance(x, LoraWeight)


def has_lora(params) -> bool:
    """Whether any leaf of `params` is a LoRA leaf."""
    return any(is_lora(x) for x in jax.tree.leaves(params, is_leaf=seams.is_weight_type))


def bases(params):
    """`params` with every LoRA leaf replaced by its (frozen) base: the same arrays."""
    return jax.tree.map(lambda w: w.base if is_lora(w) else w, params, is_leaf=is_lora)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key `k` such that
    `module` matches `(.*\\.)?(k)$`, else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_patterns(patterns: dict, modules: list[str], name: str):
    for key in patterns:
        if not any(re.match(rf"(.*\.)?({key})$", m) for m in modules):
            raise ConfigError(f"{name} key {key!r} matches none of the LoRA target modules "
                              f"{sorted(set(modules))}")


def apply(params, rank: int, alpha: float, targets, rng, dropout: float = 0.0,
          use_rslora: bool = False, rank_pattern: dict | None = None,
          alpha_pattern: dict | None = None):
    """Wrap the targeted leaves of `params` in `LoraWeight`s.

    targets: module names (PEFT-style: `["q_proj", "v_proj"]`, each must match), the string
      `"all-linear"` (every linear kernel except `lm_head`), or one regex searched in module
      paths such as `model.layers.self_attn.q_proj` (paths have no layer index: layers are
      stacked). Candidates are linear kernels (plain or `QuantizedWeight`) and embedding tables.
    rank_pattern / alpha_pattern: `{name_or_regex: value}` overrides, matched like PEFT
      (`(.*\\.)?(key)$` against the module path); every key must match a target.
    Init as PEFT: `a ~ U(+-1/sqrt(in))` (kaiming-uniform, a=sqrt(5)), `b = 0`; for embeddings
    `a = 0`, `b ~ N(0, 1)`. scale = alpha / r (alpha / sqrt(r) if `use_rslora`).
    """
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
    leaves = leaves_by_path(params)
    candidates = [p for p, v in leaves.items()
                  if (is_kernel_path(p) and len(dense_shape(v)) >= 2)
                  or (p.endswith(".embedding") and len(dense_shape(v)) == 2)]
    chosen = sorted(select_targets(candidates, targets, "LoRA"))
    modules = [module_of(p) for p in chosen]
    _check_patterns(rank_pattern, modules, "rank_pattern")
    _check_patterns(alpha_pattern, modules, "alpha_pattern")
    new = {}
    for i, (p, module) in enumerate(zip(chosen, modules)):
        w = leaves[p]
        if is_lora(w):
            raise ConfigError(f"{p} already has a LoRA adapter; merge it first (lora.merge)")
        r = _pattern_value(rank_pattern, module, rank)
        a_ = _pattern_value(alpha_pattern, module, alpha)
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"LoRA rank for {module} must be a positive int, got {r!r}")
        *lead, d_in, d_out = dense_shape(w)
        key = jax.random.fold_in(rng, i)
        if p.endswith(".embedding"):
            a = jnp.zeros((*lead, d_in, r), jnp.float32)
            b = jax.random.normal(key, (*lead, r, d_out), jnp.float32)
        else:
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(key, (*lead, d_in, r), jnp.float32, -bound, bound)
            b = jnp.zeros((*lead, r, d_out), jnp.float32)
        scale = a_ / math.sqrt(r) if use_rslora else a_ / r
        new[p] = LoraWeight(w, a, b, float(scale), dropout=float(dropout))
    return jax.tree_util.tree_map_with_path(lambda path, w: new.get(path_str(path), w),
                                            params, is_leaf=seams.is_weight_type)


def merge(params):
    """Replace every `LoraWeight` by its dense merged weight (a quantized base is
    dequantized first; a disabled adapter merges to its base)."""
    return jax.tree.map(lambda w: w.dense() if is_lora(w) else w, params, is_leaf=is_lora)


def disable(params):
    """The same tree with every adapter switched off (same arrays, no copy): the
    reference model of DPO / PPO."""
    return jax.tree.map(lambda w: w.replace(enabled=False) if is_lora(w) else w,
                        params, is_leaf=is_lora)


def enable(params):
    """The same tree with every adapter switched on."""
    return jax.tree.map(lambda w: w.replace(enabled=True) if is_lora(w) else w,
                        params, is_leaf=is_lora)


def with_dropout_rng(params, rng):
    """Give every adapter with dropout > 0 its own key (one per stacked layer), so that
    `linear` applies dropout; call inside the training step with a fresh key each step."""
    counter = itertools.count()

    def one(w):
        if not (is_lora(w) and w.dropout > 0):
            return w
        key = jax.random.fold_in(rng, next(counter))
        lead = w.a.shape[:-2]
        return w.replace(dropout_rng=jax.random.split(key, lead) if lead else key)

    return jax.tree.map(one, params, is_leaf=is_lora)


def trainable_mask(params):
    """A bool tree with the structure of `params`: True exactly at LoRA `a` and `b`."""
    def false(tree):
        return jax.tree.map(lambda _: False, tree)

    def one(w):
        if is_lora(w):
            return w.replace(base=false(w.base), a=True, b=True, dropout_rng=false(w.dropout_rng))
        return false(w)

    return jax.tree.map(one, params, is_leaf=is_lora)


def trainable(params):
    """What trains, decided once from the leaf types: a bool tree like `params`, True at the
    LoRA `a` and `b` when the tree has adapters (`trainable_mask`), else True everywhere."""
    return trainable_mask(params) if has_lora(params) else jax.tree.map(lambda _: True, params)


def split(params, mask=None):
    """`(trainable, frozen)`: two trees shaped like `params`, holding the leaves where `mask`
    (default `trainable_mask(params)`; a bool tree or prefix of one) is True / False and None
    elsewhere. Differentiate and build optimizer state on `trainable` only."""
    mask = trainable_mask(params) if mask is None else mask
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of `split`: take each leaf from whichever tree has it."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def logical_axes_for(leaf: LoraWeight, base_axes: tuple):
    """Logical axis names of each child of `leaf` given the base kernel's axes, e.g.
    `('layers', 'embed', 'heads')` -> a `('layers', 'embed', None)`, b `('layers', None,
    'heads')`; a quantized base gets `quant.logical_axes_for`. Returns a `LoraWeight` of tuples."""
    base_axes = tuple(base_axes)
    if len(base_axes) != len(leaf.dense_shape):
        raise ConfigError(f"base_axes {base_axes} do not fit a weight of shape {leaf.dense_shape}")
    lead, in_axis, out_axis = base_axes[:-2], base_axes[-2], base_axes[-1]
    base = (quant.logical_axes_for(leaf.base, base_axes)
            if isinstance(leaf.base, QuantizedWeight) and jax.tree.leaves(leaf.base) else base_axes)
    rng = leaf.dropout_rng
    rng_axes = None if rng is None else (*lead, *(None,) * (rng.ndim - len(lead)))

    def present(child, axes):  # a half removed by `split` (no arrays) gets no axes
        return axes if jax.tree.leaves(child) else None

    return leaf.replace(base=present(leaf.base, base), a=present(leaf.a, (*lead, in_axis, None)),
                        b=present(leaf.b, (*lead, None, out_axis)), dropout_rng=rng_axes)


# --------------------------------------------------------------------------- HF PEFT format

def _peft_modules(module: str, n_layers: int | None) -> list[str]:
    """HF module names of one of our module paths: the stacked `layers` axis becomes an index
    (`model.layers.self_attn.q_proj` -> `model.layers.{i}.self_attn.q_proj`)."""
    if n_layers is None:
        return [module]
    parts = module.split(".")
    if "layers" not in parts:
        raise ConfigError(f"{module} has a stacked leading axis but no `layers` path "
                          "component to index; cannot name it in PEFT format")
    i = parts.index("layers") + 1
    return [".".join(parts[:i] + [str(k)] + parts[i:]) for k in range(n_layers)]


def _peft_pattern(module: str, stacked: bool) -> str:
    """A regex matching the HF names of `module` in every layer."""
    parts = [re.escape(part) for part in module.split(".")]
    if stacked:
        parts.insert(parts.index("layers") + 1, r"\d+")
    return r"\.".join(parts)


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _json_number(x: float):
    x = float(x)
    return int(round(x)) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else x


def save_adapter(params, out_dir: str, base: str | None = None) -> None:
    """Write the adapters of `params` as a Hugging Face PEFT LoRA adapter: `out_dir/`
    `adapter_config.json` + `adapter_model.safetensors` (float32), loadable with
    `peft.PeftModel.from_pretrained(hf_model, out_dir)`. `base` is recorded as
    `base_model_name_or_path`. Stacked layers are written one tensor per layer
    (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in],
    `...lora_B.weight` [out, r]; embeddings: `lora_embedding_A` [r, vocab], `..._B` [dim, r]).
    Scales are written as `lora_alpha = scale * r` with `use_rslora: false` (same scale).
    Arrays are fetched to this host: on several hosts, call it where they are addressable.
    """
    leaves = leaves_by_path(params)
    loras = {p: w for p, w in leaves.items() if is_lora(w)}
    if not loras:
        raise ConfigError("save_adapter: params hold no LoraWeight; call lora.apply or "
                          "lora.load_adapter first")
    tensors, ranks, alphas, dropouts, stacked = {}, {}, {}, {}, {}
    for p, w in loras.items():
        module = module_of(p)
        a = np.asarray(jax.device_get(w.a), np.float32)
        b = np.asarray(jax.device_get(w.b), np.float32)
        if a.ndim not in (2, 3):
            raise ConfigError(f"{p}: expected a of shape [in, r] or [layers, in, r], got {a.shape}")
        stacked[module] = a.ndim == 3
        names = _peft_modules(module, a.shape[0] if a.ndim == 3 else None)
        a_layers, b_layers = (a, b) if a.ndim == 3 else (a[None], b[None])
        suffix = ("lora_embedding_A", "lora_embedding_B") if p.endswith(".embedding") \
            else ("lora_A.weight", "lora_B.weight")
        for name, la, lb in zip(names, a_layers, b_layers):
            tensors[f"{_PEFT_PREFIX}{name}.{suffix[0]}"] = np.ascontiguousarray(la.T)
            tensors[f"{_PEFT_PREFIX}{name}.{suffix[1]}"] = np.ascontiguousarray(lb.T)
        ranks[module] = w.rank
        alphas[module] = _json_number(w.scale * w.rank)
        dropouts[module] = w.dropout
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    rank_pattern = {_peft_pattern(m, stacked[m]): v for m, v in ranks.items() if v != r}
    alpha_pattern = {_peft_pattern(m, stacked[m]): v for m, v in alphas.items() if v != alpha}
    names = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    others = [module_of(p) for p, v in leaves.items()
              if (is_kernel_path(p) or p.endswith(".embedding")) and p not in loras]
    if any(o == n or o.endswith("." + n) for o in others for n in names):
        # a bare name would also select an un-adapted module: name the modules exactly
        target_modules: Any = "|".join(_peft_pattern(m, stacked[m]) for m in sorted(ranks))
    else:
        target_modules = names
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base is None else str(base),
        "r": r, "lora_alpha": alpha, "lora_dropout": _most_common(dropouts.values()),
        "target_modules": target_modules, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter: {ADAPTER_CONFIG} is missing")
    with open(path) as f:
        cfg = json.load(f)
    unsupported = {
        "peft_type": (cfg.get("peft_type") != "LORA", "only LoRA adapters are supported"),
        "use_dora": (bool(cfg.get("use_dora")), "DoRA is not supported"),
        "bias": (cfg.get("bias", "none") != "none", "trained biases are not supported"),
        "lora_bias": (bool(cfg.get("lora_bias")), "LoRA biases are not supported"),
        "modules_to_save": (bool(cfg.get("modules_to_save")),
                            "fully trained modules are not supported; merge them into the base"),
        "fan_in_fan_out": (bool(cfg.get("fan_in_fan_out")),
                           "fan_in_fan_out (GPT-2 Conv1D) layouts are not supported"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise CheckpointError(f"{path}: {key}={cfg.get(key)!r}: {why}")
    return cfg


def _our_module(hf_module: str) -> tuple[str, int | None]:
    """`model.layers.3.self_attn.q_proj` -> (`model.layers.self_attn.q_proj`, 3)."""
    parts = hf_module.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[:i + 1] + parts[i + 2:]), int(parts[i + 1])
    return hf_module, None


def load_adapter(params, adapter_dir: str):
    """Attach a Hugging Face PEFT LoRA adapter (`adapter_config.json` +
    `adapter_model.safetensors`; pickled `.bin` files are refused) to `params`, returning
    the tree with `LoraWeight` leaves (float32 a, b). The base leaves may be quantized.
    Raises `CheckpointError` naming the tensor when a module is missing from `params`,
    shapes disagree, or layers are missing.
    """
    cfg = _read_adapter_config(adapter_dir)
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        found = sorted(os.listdir(adapter_dir))
        raise CheckpointError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (found {found}); only "
                              "safetensors adapters are loaded (pickle files are unsafe): "
                              "re-save the adapter with safe_serialization=True")
    tensors = load_file(weights)
    leaves = leaves_by_path(params)
    groups: dict[str, dict] = collections.defaultdict(dict)
    replaced = {}   # base weights saved with the adapter (PEFT does so for targeted embeddings)
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise CheckpointError(f"unsupported tensor {key!r} in {weights}: only LoRA A/B "
                                  "matrices (lora_A/lora_B, lora_embedding_A/B) and embedding "
                                  "base layers are loaded")
        hf_module, kind = m.groups()
        module, layer = _our_module(hf_module)
        is_table = kind.startswith("lora_embedding") or (
            kind == "base_layer.weight" and module + ".embedding" in leaves)
        path = module + (".embedding" if is_table else ".kernel")
        if path not in leaves:
            available = sorted(module_of(p) for p in leaves if is_kernel_path(p)
                               or p.endswith(".embedding"))
            raise CheckpointError(f"adapter tensor {key!r} targets {path}, which is not in "
                                  f"params (available modules: {available}); the adapter was "
                                  "made for a different model")
        if kind == "base_layer.weight":
            w, value = leaves[path], value if is_table else value.T
            if seams.is_weight_type(w) or layer is not None or value.shape != w.shape:
                raise CheckpointError(
                    f"adapter tensor {key!r} of shape {value.shape} should replace {path} "
                    f"({type(w).__name__} {dense_shape(w)}) but does not fit it; adapters for "
                    "resized vocabularies or quantized embeddings are not supported")
            replaced[path] = jax.device_put(value.astype(w.dtype), w.sharding)
        else:
            groups[path][(layer, kind.replace(".weight", "")[-1])] = (key, value)  # "A" / "B"

    new = dict(replaced)
    for path, group in groups.items():
        w = replaced.get(path, leaves[path])
        if is_lora(w):
            raise CheckpointError(f"{path} already has a LoRA adapter; load into params "
                                  "without one (or lora.merge first)")
        *lead, d_in, d_out = dense_shape(w)
        if len(lead) > 1:
            raise CheckpointError(f"{path}: weight shape {dense_shape(w)} has more than one leading axis")
        layers = list(range(lead[0])) if lead else [None]
        found = sorted({layer for layer, _ in group}, key=lambda x: -1 if x is None else x)
        if found != layers:
            raise CheckpointError(
                f"adapter for {module_of(path)} covers layers {found} but params have "
                f"{'layers ' + str(layers) if lead else 'an unstacked weight'}; adapters on a "
                "subset of layers (layers_to_transform) are not supported")
        a_list, b_list = [], []
        for layer in layers:
            for ab in "AB":
                if (layer, ab) not in group:
                    have = [k for k, _ in group.values()]
                    raise CheckpointError(f"adapter for {module_of(path)} layer {layer} lacks "
                                          f"its {ab} matrix (has {have})")
            (name_a, ta), (name_b, tb) = group[(layer, "A")], group[(layer, "B")]
            r = ta.shape[0]
            if ta.shape != (r, d_in) or tb.shape != (d_out, r):
                raise CheckpointError(
                    f"adapter tensors {name_a} {ta.shape} / {name_b} {tb.shape} do not fit "
                    f"{path} [in={d_in}, out={d_out}]: expected A [r, {d_in}] and B [{d_out}, r]")
            a_list.append(np.asarray(ta, np.float32).T)
            b_list.append(np.asarray(tb, np.float32).T)
        if len({x.shape for x in a_list}) > 1:
            raise CheckpointError(f"adapter for {module_of(path)} has different ranks per layer "
                                  f"{[x.shape[-1] for x in a_list]}; one rank per module is supported")
        hf_names = _peft_modules(module_of(path), lead[0] if lead else None)
        r = a_list[0].shape[-1]
        alpha_of = [_pattern_value(cfg.get("alpha_pattern") or {}, n, cfg.get("lora_alpha", 8))
                    for n in hf_names]
        if len(set(alpha_of)) > 1:
            raise CheckpointError(f"alpha_pattern gives {module_of(path)} different alphas per "
                                  f"layer {alpha_of}; one alpha per module is supported")
        alpha = alpha_of[0]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        stack = (lambda xs: jnp.asarray(np.stack(xs))) if lead else (lambda xs: jnp.asarray(xs[0]))
        new[path] = LoraWeight(w, stack(a_list), stack(b_list), float(scale),
                               dropout=float(cfg.get("lora_dropout", 0.0) or 0.0))
    return jax.tree_util.tree_map_with_path(lambda p, w: new.get(path_str(p), w), params,
                                            is_leaf=seams.is_weight_type)
