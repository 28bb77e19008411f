"""Weight quantization as a parameter-tree transform: kernels -> `QuantizedWeight`.

Methods (kernel `w [..., in, out]`, blocks run along the input dim, axis -2):

- ``int8``: symmetric, `q = round(w / s)` in [-127, 127], `s = absmax / 127`; one scale per
  output channel by default (`block_size=None`), or per group of `block_size` inputs.
- ``int4``: symmetric, `q` in [-7, 7] stored as `q + 8`, `s = absmax / 7`, groups of
  `block_size` inputs (default 64; 32..256 is the usual range); two 4-bit codes per byte.
- ``nf4``: QLoRA's NormalFloat4: each block of `block_size` inputs (default 64) is divided
  by its absmax and rounded to the nearest of the 16 `NF4_CODEBOOK` values; packed like int4.

`double_quant=True` (QLoRA's double quantization) stores the float32 scales as int8:
the per-matrix mean is subtracted, then blocks of 256 consecutive scales share one float32
second-level scale (symmetric linear int8; bitsandbytes uses its dynamic 8-bit code here).

Every child array keeps the weight's leading axes (e.g. the stacked `layers` axis), so
`nn.scan` / `lax.scan` can slice a `QuantizedWeight` along axis 0 like a plain kernel.
This module also holds the path / target-selection helpers shared with `lora.py`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxalign.errors import ConfigError
from jaxalign.nn.seams import is_weight_type
from jaxalign.parallel.rules import path_str

METHODS = ("int8", "int4", "nf4")
DEFAULT_BLOCK_SIZE = {"int8": None, "int4": 64, "nf4": 64}
DOUBLE_QUANT_BLOCK = 256

# The NF4 data type of QLoRA (Dettmers et al. 2023, appendix E), as in bitsandbytes.
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


# --------------------------------------------------------------------------- paths & targets

def module_of(leaf_path: str) -> str:
    """The module path of a leaf path: `...q_proj.kernel` -> `...q_proj`."""
    return leaf_path.rsplit(".", 1)[0]


def leaves_by_path(params) -> dict[str, Any]:
    """{dotted leaf path: leaf}, treating weight types (LoRA, quantized) as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_type)
    return {path_str(p): leaf for p, leaf in flat}


def dense_shape(leaf) -> tuple[int, ...]:
    """Shape of the dense weight a leaf stands for (plain array or weight type)."""
    return tuple(leaf.dense_shape) if is_weight_type(leaf) else np.shape(leaf)


def is_kernel_path(leaf_path: str) -> bool:
    """True for the kernel of a linear layer (the only leaves quantization targets)."""
    return leaf_path.rsplit(".", 1)[-1] == "kernel"


def select_targets(candidates: list[str], targets, what: str) -> list[str]:
    """The candidate leaf paths selected by `targets`.

    `targets` is either a list of module names, matched PEFT-style against module paths
    (the leaf path without its last component): a name selects every module whose path
    equals it or ends with `"." + name` (`"q_proj"`, `"self_attn.o_proj"`); every name must
    select something. Or a single string: `"all-linear"` (every kernel except `lm_head`), or
    else a regular expression searched (`re.search`) in each module path, e.g.
    `"layers.*(q|v)_proj"` or `"(q|v)_proj$"`. Raises `ConfigError` when nothing matches.
    """
    modules = {p: module_of(p) for p in candidates}
    available = sorted({m.rsplit(".", 1)[-1] for m in modules.values()})
    hint = (f"available modules for {what}: {available}; pass module names like "
            f"['q_proj', 'v_proj'] or a regex searched in paths like "
            f"{sorted(set(modules.values()))[:3]}")
    if isinstance(targets, str):
        if targets == "all-linear":
            chosen = [p for p, m in modules.items() if is_kernel_path(p) and m != "lm_head"]
        else:
            try:
                pattern = re.compile(targets)
            except re.error as e:
                raise ConfigError(f"{what} targets {targets!r} is not a valid regex: {e}") from None
            chosen = [p for p, m in modules.items() if pattern.search(m)]
        if not chosen:
            raise ConfigError(f"{what} targets {targets!r} match no module; {hint}")
        return chosen
    names = list(targets)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{what} targets must be a non-empty list of module names or a "
                          f"regex string, got {targets!r}; {hint}")
    unmatched = [n for n in names
                 if not any(m == n or m.endswith("." + n) for m in modules.values())]
    if unmatched:
        raise ConfigError(f"{what} targets {unmatched} (of {names}) match no module; {hint}")
    return [p for p, m in modules.items()
            if any(m == n or m.endswith("." + n) for n in names)]


# --------------------------------------------------------------------------- the leaf type

@struct.dataclass
class QuantizedWeight:
    """A quantized kernel standing for `w [..., in, out]`.

    q:       int8 [..., in, out] (int8), or uint8 [..., in // 2, out] (int4/nf4: rows 2i and
             2i+1 in the low and high nibble of byte i).
    scales:  float32 [..., in // block, out]; int8 when double-quantized.
    scales2: double quant only: float32 [..., ceil(in // block * out / 256)] second-level scales.
    offset:  double quant only: float32 [...], the mean that was subtracted from the scales.
    Static: method, block_size (None = per output channel), dtype (of the original weight).
    """

    q: jax.Array
    scales: jax.Array
    scales2: jax.Array | None = None
    offset: jax.Array | None = None
    method: str = struct.field(pytree_node=False, default="int8")
    block_size: int | None = struct.field(pytree_node=False, default=None)
    dtype: str = struct.field(pytree_node=False, default="float32")

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """Shape of the dense weight `[..., in, out]`."""
        *lead, rows, out = self.q.shape
        return (*lead, rows * 2 if self.method in ("int4", "nf4") else rows, out)

    def logical_axes(self, base_axes: tuple):
        """See `logical_axes_for`."""
        return logical_axes_for(self, base_axes)

    def _scales(self) -> jax.Array:
        """float32 scales [..., in // block, out], undoing double quantization."""
        if self.scales2 is None:
            return self.scales
        *lead, nb, out = self.scales.shape
        n = nb * out
        flat = self.scales.reshape(*lead, n).astype(jnp.float32)
        pad = -n % DOUBLE_QUANT_BLOCK
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)])
        blocks = flat.reshape(*lead, -1, DOUBLE_QUANT_BLOCK) * self.scales2[..., None]
        s = blocks.reshape(*lead, n + pad)[..., :n].reshape(*lead, nb, out)
        return s + self.offset[..., None, None]

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense weight [..., in, out] in `dtype` (default: the original dtype)."""
        if self.method == "int8":
            values = self.q.astype(jnp.float32)
        else:
            codes = _unpack4(self.q)
            if self.method == "nf4":
                values = jnp.asarray(NF4_CODEBOOK)[codes]
            else:
                values = codes.astype(jnp.float32) - 8.0
        s = self._scales()
        *lead, rows, out = values.shape
        nb = s.shape[-2]
        w = values.reshape(*lead, nb, rows // nb, out) * s[..., :, None, :]
        return w.reshape(*lead, rows, out).astype(self.dtype if dtype is None else dtype)

    def dense(self) -> jax.Array:
        """The dense weight [..., in, out] in the original dtype."""
        return self.dequantize()

    def linear(self, x: jax.Array) -> jax.Array:
        """`x [..., in] @ w -> [..., out]` in `x.dtype`; the weight is frozen (no gradient)
        and dequantized inside the computation, recomputed in the backward pass rather than
        kept as a residual."""
        return _dequant_matmul(x, self)


@jax.checkpoint
def _dequant_matmul(x, w: QuantizedWeight):
    return jnp.dot(x, jax.lax.stop_gradient(w.dequantize(x.dtype)))


# --------------------------------------------------------------------------- quantize

def _pack4(codes: jax.Array) -> jax.Array:
    """uint8 codes in [0, 16) [..., 2n, out] -> packed uint8 [..., n, out]."""
    codes = codes.astype(jnp.uint8)
    return codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)


def _unpack4(packed: jax.Array) -> jax.Array:
    """packed uint8 [..., n, out] -> codes uint8 [..., 2n, out] (inverse of `_pack4`)."""
    lo, hi = packed & 0xF, packed >> 4
    *lead, n, out = packed.shape
    return jnp.stack([lo, hi], axis=-2).reshape(*lead, 2 * n, out)


def _double_quantize(s: jax.Array):
    """float32 scales [..., nb, out] -> (int8 [..., nb, out], scales2 [..., m], offset [...])."""
    *lead, nb, out = s.shape
    n = nb * out
    offset = s.mean(axis=(-2, -1))
    flat = (s - offset[..., None, None]).reshape(*lead, n)
    pad = -n % DOUBLE_QUANT_BLOCK
    blocks = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, DOUBLE_QUANT_BLOCK)
    s2 = jnp.abs(blocks).max(axis=-1) / 127.0
    q = jnp.round(blocks / jnp.where(s2 == 0, 1.0, s2)[..., None]).astype(jnp.int8)
    return q.reshape(*lead, n + pad)[..., :n].reshape(*lead, nb, out), s2, offset


def _quantize_impl(w: jax.Array, method: str, block: int, double_quant: bool):
    *lead, rows, out = w.shape
    blocks = w.astype(jnp.float32).reshape(*lead, rows // block, block, out)
    absmax = jnp.abs(blocks).max(axis=-2)                       # [..., nb, out]
    qmax = {"int8": 127.0, "int4": 7.0, "nf4": 1.0}[method]
    s = absmax / qmax
    normed = blocks / jnp.where(s == 0, 1.0, s)[..., :, None, :]
    normed = normed.reshape(*lead, rows, out)
    if method == "int8":
        q = jnp.clip(jnp.round(normed), -127, 127).astype(jnp.int8)
    elif method == "int4":
        q = _pack4(jnp.clip(jnp.round(normed), -7, 7) + 8)
    else:
        q = _pack4(jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed))  # nearest code
    if double_quant:
        s, s2, offset = _double_quantize(s)
        return q, s, s2, offset
    return q, s, None, None


_quantize_jit = jax.jit(_quantize_impl, static_argnums=(1, 2, 3))


def quantize_array(w, method: str, block_size: int | None = None,
                   double_quant: bool = False, name: str = "weight") -> QuantizedWeight:
    """Quantize one kernel `w [..., in, out]` (leading axes quantized independently).

    `block_size` groups along `in` (default: per output channel for int8, 64 for int4/nf4);
    `name` only labels error messages. Raises `ConfigError` for an unknown method or a
    block size that does not divide `in`.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {METHODS}")
    w = jnp.asarray(w)
    if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ConfigError(f"cannot quantize {name} with shape {w.shape} and dtype {w.dtype}: "
                          "expected a float kernel [..., in, out]")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE[method]
    rows = w.shape[-2]
    block = rows if block_size is None else int(block_size)
    if block <= 0 or rows % block:
        divisors = [d for d in (32, 64, 128, 256) if rows % d == 0]
        raise ConfigError(f"cannot quantize {name} with shape {tuple(w.shape)}: block_size "
                          f"{block_size} does not divide the input dim {rows}; choose one "
                          f"that does (e.g. {divisors or [rows]})")
    if method != "int8" and block % 2:
        raise ConfigError(f"{method} packs two 4-bit codes per byte, so block_size must be "
                          f"even, got {block_size} for {name}")
    q, s, s2, offset = _quantize_jit(w, method, block, bool(double_quant))
    return QuantizedWeight(q=q, scales=s, scales2=s2, offset=offset, method=method,
                           block_size=block_size, dtype=jnp.dtype(w.dtype).name)


def quantize(params, method: str, block_size: int | None = None, targets=None,
             double_quant: bool = False):
    """Replace the targeted kernels of `params` by `QuantizedWeight`s.

    `targets`: None (default) quantizes every linear kernel inside the decoder layers, i.e.
    all but `lm_head` (and any value/reward head); embeddings, norms and biases always stay
    in high precision. Otherwise a list of module names or a regex (see `select_targets`).
    Quantize before `lora.apply` (QLoRA); already-transformed leaves raise `ConfigError`.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {METHODS}")
    leaves = leaves_by_path(params)
    candidates = [p for p, v in leaves.items() if is_kernel_path(p) and len(dense_shape(v)) >= 2]
    if targets is None:
        chosen = [p for p in candidates if "layers" in module_of(p).split(".")]
        if not chosen:
            raise ConfigError("quantize found no linear kernels inside `layers`; pass targets=")
    else:
        chosen = select_targets(candidates, targets, "quantization")
    for p in chosen:
        if is_weight_type(leaves[p]):
            raise ConfigError(f"{p} is already a {type(leaves[p]).__name__}; quantize the "
                              "plain params before applying LoRA (QLoRA = quantize, then lora.apply)")
    chosen = set(chosen)

    def one(path, leaf):
        p = path_str(path)
        return quantize_array(leaf, method, block_size, double_quant, p) if p in chosen else leaf

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_weight_type)


def dequantize(params):
    """Replace every `QuantizedWeight` (also inside a LoRA base) by its dense array."""
    return jax.tree.map(lambda w: w.dense() if isinstance(w, QuantizedWeight) else w,
                        params, is_leaf=lambda w: isinstance(w, QuantizedWeight))


def logical_axes_for(leaf: QuantizedWeight, base_axes: tuple):
    """Logical axis names for each child of `leaf`, given the dense kernel's axes
    (e.g. `('layers', 'embed', 'heads')`); returns a `QuantizedWeight` of tuples.

    q keeps the base axes (the packed input dim is halved but sharded the same way);
    scales use None for the block-count dim, which need not divide a mesh axis.
    """
    base_axes = tuple(base_axes)
    if len(base_axes) != len(leaf.dense_shape):
        raise ConfigError(f"base_axes {base_axes} do not fit a weight of shape {leaf.dense_shape}")
    lead, out_axis = base_axes[:-2], base_axes[-1]
    return dataclasses.replace(
        leaf, q=base_axes, scales=(*lead, None, out_axis),
        scales2=None if leaf.scales2 is None else (*lead, None),
        offset=None if leaf.offset is None else lead)
