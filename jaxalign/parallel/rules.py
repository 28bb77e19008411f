"""Logical axis names for every param, and the rules mapping them to mesh axes.

`logical_axes(params)` names each dimension of each leaf from its path (the HF module
name); `partition_specs(params, mesh)` turns names into `PartitionSpec`s through
`RULES` and checks that every sharded dimension divides by its mesh axes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign.errors import ShardingError
from jaxalign.nn.seams import is_weight_type

# Logical axis -> mesh axes (None = replicated). Batch splits over data and fsdp (ZeRO-3:
# params are sharded over fsdp and gathered per layer); tensor does Megatron splits.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "head_dim": None,
}

# (module name, leaf name) -> logical axes of one (unstacked) leaf.
_LEAF_AXES = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("o_proj", "bias"): ("embed",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "bias"): ("mlp",),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("down_proj", "bias"): ("embed",),
    ("q_norm", "scale"): ("head_dim",),
    ("k_norm", "scale"): ("head_dim",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("score", "kernel"): ("embed", None),  # reward / value head [D, 1]
}


def path_str(path) -> str:
    """Dotted path of a tree leaf, e.g. `model.layers.self_attn.q_proj.kernel`."""
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return ".".join(parts)


def axes_for_path(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a plain-array leaf at `path` with `ndim` dims (unknown -> replicated)."""
    parts = path.split(".")
    axes: tuple[str | None, ...]
    if len(parts) >= 2 and (parts[-2], parts[-1]) in _LEAF_AXES:
        axes = _LEAF_AXES[(parts[-2], parts[-1])]
    elif parts[-1] == "scale":
        axes = ("norm",)
    else:
        axes = (None,) * (ndim - ("layers" in parts))
    if "layers" in parts:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        return (None,) * ndim
    return axes


def logical_axes(params):
    """A tree like `params` whose leaves are tuples of logical axis names.

    A weight type (LoRA, quantized) gets a subtree from its `logical_axes(base_axes)`
    method, derived from the axes of the dense weight it stands for.
    """

    def leaf_axes(path, leaf):
        p = path_str(path)
        if is_weight_type(leaf):
            if not jax.tree.leaves(leaf):  # a frozen weight in the trainable half of `lora.split`
                return leaf
            base_ndim = len(leaf.dense_shape) if hasattr(leaf, "dense_shape") else leaf.dense().ndim
            return leaf.logical_axes(axes_for_path(p, base_ndim))
        return axes_for_path(p, np.ndim(leaf))

    return jax.tree_util.tree_map_with_path(leaf_axes, params, is_leaf=is_weight_type)


def spec_for(axes, shape, mesh, rules=None, where: str = "") -> PartitionSpec:
    """PartitionSpec for a leaf with logical `axes` and `shape`; errors on non-divisible dims."""
    rules = RULES if rules is None else rules
    spec = []
    used: set[str] = set()
    for dim, name in zip(shape, axes):
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape.get(a, 1) > 1)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if size > 1 and dim % size:
            raise ShardingError(
                f"{where or 'array'}: dimension '{name}' of size {dim} is not divisible by mesh axes "
                f"{mesh_axes} of total size {size}; choose mesh sizes that divide {dim} "
                f"or map '{name}' to other mesh axes in the sharding rules"
            )
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def partition_specs(params, mesh, rules=None):
    """A tree of PartitionSpec matching `params` (arrays or ShapeDtypeStructs)."""
    axes = logical_axes(params)
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs = [
        spec_for(a, np.shape(leaf), mesh, rules, where=path_str(path))
        for a, (path, leaf) in zip(flat_axes, flat)
    ]
    return jax.tree_util.tree_unflatten(treedef, specs)


def named_shardings(params, mesh, rules=None):
    """A tree of NamedSharding matching `params`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(params, mesh, rules))


def batch_sharding(mesh, ndim: int = 2, rules=None) -> NamedSharding:
    """Sharding of a batch array: leading dim over the batch axes, the rest replicated."""
    rules = RULES if rules is None else rules
    axes = rules["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def batch_size_multiple(mesh) -> int:
    """The product of the mesh axes a batch is split over (data x fsdp): every global batch's
    rows must be a multiple of it (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in batch_sharding(mesh, 2).spec[0]]))
