"""The two seams every weight passes through: `linear` (matmuls) and `embed` (lookups).

A parameter leaf is either a plain array or a *weight type*: a registered pytree such as
`jaxalign.lora.LoraWeight` or `jaxalign.quant.QuantizedWeight`. A weight type implements

    linear(self, x) -> y      # x [..., in] -> y [..., out], computed in x.dtype
    embed(self, ids) -> y     # ids [...] int -> y [..., dim], in the table's compute dtype
    dense(self) -> array      # the equivalent plain [in, out] (or [vocab, dim]) array

so model code never knows which kind of leaf it holds. Stacked (scanned) layers see one
layer's slice of every leaf, so weight types work unchanged under `nn.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_weight_type(w) -> bool:
    """True for a non-array leaf that implements the seam protocol."""
    return hasattr(w, "linear") and hasattr(w, "dense")


def linear(x, w, bias=None):
    """`x [..., in] @ w [in, out] (+ bias [out])`, computed in `x.dtype`.

    Plain arrays are cast to the compute dtype (f32 master weights, bf16 compute);
    weight types dispatch to their own `linear`.
    """
    if is_weight_type(w):
        y = w.linear(x)
    else:
        y = matmul(x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def embed(ids, table, dtype):
    """Rows `table[ids]` in `dtype`; `table` is [vocab, dim] or a weight type."""
    if is_weight_type(table):
        return table.embed(ids).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def dense(w):
    """The plain array a leaf stands for (identity on arrays)."""
    return w.dense() if is_weight_type(w) else w


@jax.custom_vjp
def matmul(x, w):
    """`x [..., in] @ w [in, out]` whose backward pass is written out (see `_matmul_bwd`)."""
    return jnp.dot(x, w)


def _matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, dy):
    """dx = dy w^T, dw = x^T dy summed over leading axes. On the CPU backend the cotangent
    is materialized first (an optimization barrier) so the compiler feeds both products a
    plain row-major array rather than fusing dy's elementwise producers into them."""
    x, w = res
    if jax.default_backend() == "cpu":  # decided at trace time
        # Measured on XLA:CPU (2-core VM, one Llama MLP block's backward: 229 -> 165 ms; see
        # docs/benchmarks.md): the fused form falls off the fast GEMM path. Not measured on
        # GPU/TPU, where the barrier would only constrain fusion, so it is CPU-only.
        dy = jax.lax.optimization_barrier(dy)
    dx = jnp.dot(dy, w.T)
    dw = jnp.einsum("...i,...o->io", x, dy)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)
