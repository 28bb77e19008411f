"""Masked multi-head attention with grouped KV heads, behind one switch of kernels.

`model.attention_impl` names the kernel (`IMPLEMENTATIONS`):

- `xla`: the dense masked softmax of `jax.nn.dot_product_attention`; any mask.
- `cudnn`: cuDNN fused attention (NVIDIA GPUs, bf16/fp16, head_dim a multiple of 8 up to 128).
  It takes the mask as causal + per-row lengths (+ a left window), which fits rows that
  each hold one example from slot 0 followed by padding. Batches with another layout
  (left padding, packed rows) take the xla path, chosen per batch at run time.
- `splash`: Pallas splash attention (TPU): causal or local-window mask and segment ids, so
  padding, packing and sliding windows all run in the kernel. Off TPU it runs in Pallas
  interpret mode (slow; how it is tested on CPU).
- `auto`: cudnn on NVIDIA GPUs when the compute dtype and head_dim allow it, splash on
  TPU, xla otherwise.

Decoding against a KV cache always uses XLA: `dot_product_attention` over stacked caches, or
`layer_cache_attention` over one layer's cache (the per-layer decode on CPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxalign.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_CUDNN_DTYPES = ("bfloat16", "float16")
_SPLASH_BLOCK = 128  # splash tiles the sequence in blocks; rows are padded to a multiple of this


def platform() -> str:
    """'cuda' for NVIDIA GPUs, else JAX's platform name of the default device ('tpu', 'cpu', 'gpu', ...)."""
    device = jax.devices()[0]
    if device.platform == "gpu" and "nvidia" in device.device_kind.lower():
        return "cuda"
    return device.platform


def resolve_impl(impl: str | None, dtype, head_dim: int, on: str | None = None) -> str:
    """The kernel `impl` (None: auto) runs as on platform `on` (default: `platform()`): xla,
    cudnn or splash. ConfigError for an unknown name or a cudnn request it cannot run."""
    impl = impl or "auto"
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"attention_impl={impl!r} is not valid; choose one of: {', '.join(IMPLEMENTATIONS)}")
    on = on or platform()
    cudnn_ok = jnp.dtype(dtype).name in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    if impl == "auto":
        return "cudnn" if on == "cuda" and cudnn_ok else "splash" if on == "tpu" else "xla"
    if impl == "cudnn" and on != "cuda":
        raise ConfigError(f"attention_impl=cudnn needs an NVIDIA GPU (this platform: {on}); use auto or xla")
    if impl == "cudnn" and not cudnn_ok:
        raise ConfigError(f"attention_impl=cudnn needs compute dtype bfloat16 or float16 and head_dim a multiple "
                         f"of 8 up to 128 (got {jnp.dtype(dtype).name}, head_dim {head_dim}); use auto or xla")
    return impl


def attention_mask(segment_ids, positions, sliding_window=None):
    """Boolean mask [B, 1, T, T]: causal, same segment, both tokens real.

    segment_ids [B, T]: 0 marks padding, equal non-zero ids mark tokens of one example
    (a plain padded batch has ids in {0, 1}; packed rows use 1, 2, ...).
    positions [B, T]: position of each token within its example (for sliding windows).
    """
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, None, :]
    mask = causal[None] & same & real
    if sliding_window is not None:
        mask &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
    return mask[:, None]


def dot_product_attention(q, k, v, mask):
    """XLA attention: q [B, T, Hq, hd], k/v [B, S, Hkv, hd], bool mask [B, 1, T, S] -> [B, T, Hq, hd].

    Softmax in f32; fully masked rows (padding queries) give finite outputs.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation="xla")


@functools.partial(jax.tree_util.register_dataclass, data_fields=("segment_ids", "positions", "dense"),
                   meta_fields=("impl", "sliding_window"))
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query of a self-attention sees, in the form kernel `impl` takes.

    segment_ids/positions [B, T] as in `attention_mask`; dense [B, 1, T, T] bool, built once
    for impl xla (None for the fused kernels, which derive their own form per layer).
    """

    segment_ids: jax.Array
    positions: jax.Array
    dense: jax.Array | None
    impl: str
    sliding_window: int | None


def make_mask(segment_ids, positions, sliding_window, impl: str) -> AttentionMask:
    """The mask of `attention_mask(segment_ids, positions, sliding_window)` for a resolved `impl`."""
    dense = attention_mask(segment_ids, positions, sliding_window) if impl == "xla" else None
    return AttentionMask(segment_ids, positions, dense, impl, sliding_window)


def attention(q, k, v, mask: AttentionMask):
    """Self-attention q [B, T, Hq, hd], k/v [B, T, Hkv, hd] -> [B, T, Hq, hd] with `mask.impl`.

    Outputs at real queries agree across kernels; at padding queries they are finite but
    differ (never read: padding is out of every loss).
    """
    if mask.impl == "splash":
        return splash_attention(q, k, v, mask.segment_ids, mask.sliding_window)
    if mask.impl == "cudnn":
        return cudnn_attention(q, k, v, mask.segment_ids, mask.positions, mask.sliding_window)
    return dot_product_attention(q, k, v, mask.dense)


def cudnn_form(segment_ids, positions, sliding_window=None):
    """cuDNN's form of `attention_mask`: (lengths [B] int32, fits: bool scalar).

    cuDNN masks causally, to keys and queries before `lengths` and, with a window, to
    `sliding_window` slots back. That equals `attention_mask` at every real query when
    `fits`: each row is segment 1 from slot 0 then padding (and, with a window, positions
    count slots from 0).
    """
    t = segment_ids.shape[1]
    lengths = jnp.sum(segment_ids > 0, axis=1, dtype=jnp.int32)
    prefix = jnp.arange(t)[None, :] < lengths[:, None]
    fits = jnp.all(segment_ids == prefix.astype(segment_ids.dtype))
    if sliding_window is not None:
        fits &= jnp.all(~prefix | (positions == jnp.arange(t)[None, :]))
    return lengths, fits


def cudnn_attention(q, k, v, segment_ids, positions, sliding_window=None, implementation="cudnn"):
    """`attention` with cuDNN fused attention where `cudnn_form` fits the batch, else the
    dense XLA path (`lax.cond` at run time; both are compiled). Padding queries give 0.

    implementation: what runs the fused call's arguments ("xla" checks them on any platform).
    """
    lengths, fits = cudnn_form(segment_ids, positions, sliding_window)
    real = (jnp.arange(q.shape[1])[None, :] < lengths[:, None])[:, :, None, None]
    window = None if sliding_window is None else (sliding_window - 1, 0)

    def fused(q, k, v):
        out = jax.nn.dot_product_attention(
            q, k, v, scale=q.shape[-1] ** -0.5, is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, local_window_size=window, implementation=implementation)
        return jnp.where(real, out, 0)

    def general(q, k, v):
        return dot_product_attention(q, k, v, attention_mask(segment_ids, positions, sliding_window))

    return jax.lax.cond(fits, fused, general, q, k, v)


def _splash_kernel(t: int, heads: int, sliding_window, interpret: bool):
    """Splash kernel for t slots (a multiple of 128): causal, or causal within `sliding_window`
    slots back. Built in the trace that uses it (its mask tables are arrays of that trace)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    if sliding_window is None:
        one = splash_mask.CausalMask((t, t))
    else:
        one = splash_mask.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
    block = next(b for b in (512, 256, _SPLASH_BLOCK) if t % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, segment_ids, sliding_window=None):
    """`attention` with Pallas splash attention: the static causal / local mask and the
    segment ids (padding is segment 0, never attended by real tokens); interpret mode off TPU.

    Rows are padded to a multiple of 128 slots (padding segment); window measured in slots,
    which equals positions for rows whose positions count up within each segment.
    """
    _, t, hq, hd = q.shape
    pad = -t % _SPLASH_BLOCK
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    kernel = _splash_kernel(t + pad, hq, sliding_window, jax.default_backend() != "tpu")

    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    def one_row(q, k, v, seg):  # [H, T, hd]
        return kernel(q, k, v, SegmentIds(q=seg, kv=seg))

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    scaled = (q * hd ** -0.5).astype(q.dtype)
    out = jax.vmap(one_row)(heads_first(scaled), heads_first(k), heads_first(v), segment_ids.astype(jnp.int32))
    return heads_first(out)[:, :t]


def cache_attention_mask(q_valid, q_positions, q_slots, kv_valid, kv_positions, sliding_window=None):
    """Boolean mask [B, 1, T, S] of T new tokens against the S slots of a KV cache.

    q_valid/q_positions [B, T]: the new tokens (real?, position); q_slots [T]: the cache slot
    each new token was written to. kv_valid/kv_positions [B, S]: every slot (new tokens
    included). A query sees valid slots at or before its own slot (causal by slot), within
    the sliding window measured in positions.
    """
    s = kv_valid.shape[1]
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [T, S]
    mask = causal[None] & kv_valid[:, None, :].astype(bool) & q_valid[:, :, None].astype(bool)
    if sliding_window is not None:
        mask &= (q_positions[:, :, None] - kv_positions[:, None, :]) < sliding_window
    return mask[:, None]


def write_kv_cache(cache_k, cache_v, k, v, layer, start):
    """Write one layer's new k/v [B, T, Hkv, hd] into caches [L, B, S, Hkv, hd] at
    (layer, slots start..start+T); returns (cache_k, cache_v, k_layer, v_layer), the
    updated caches and the layer's full [B, S, Hkv, hd] keys/values. In place under jit."""
    zero = jnp.zeros((), jnp.int32)
    idx = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(start, jnp.int32), zero, zero)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), idx)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), idx)
    k_layer = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
    v_layer = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
    return cache_k, cache_v, k_layer, v_layer


def write_layer_cache(cache, new, start, keys: bool):
    """Write new keys or values [B, T, Hkv, hd] into one layer's cache at slots start..start+T:
    keys into [B, Hkv, hd, S] (slots last), values into [B, Hkv, S, hd] (the layouts
    `layer_cache_attention` reads). In place under jit when the cache is donated or loop-carried."""
    zero, start = jnp.zeros((), jnp.int32), jnp.asarray(start, jnp.int32)
    if keys:
        return jax.lax.dynamic_update_slice(cache, jnp.transpose(new, (0, 2, 3, 1)).astype(cache.dtype),
                                            (zero, zero, zero, start))
    return jax.lax.dynamic_update_slice(cache, jnp.swapaxes(new, 1, 2).astype(cache.dtype), (zero, zero, start, zero))


def layer_cache_attention(q, k, v, mask):
    """Attention of queries q [B, T, Hq, hd] over one layer's cache, keys k [B, Hkv, hd, S] and
    values v [B, Hkv, S, hd], with bool mask [B, 1, T, S] -> [B, T, Hq, hd].

    The arithmetic of `dot_product_attention` (f32 logits scaled by hd^-0.5, masked slots set to
    the same large negative number, f32 softmax, probabilities cast to v's dtype), with q head h
    reading kv head h // (Hq / Hkv). Laid out so that both products are plain row-major matmuls
    per (row, kv head) that XLA:CPU runs on the cache where it lies: with [B, S, Hkv, hd] caches
    and `dot_product_attention`'s einsums it copied each layer's keys and values into a
    transposed layout on every decode step.
    """
    b, t, hq, hd = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    rows = jnp.swapaxes(q.reshape(b, t, hkv, g, hd), 1, 2).reshape(b, hkv, t * g, hd)  # row = (token, group)
    logits = jnp.einsum("bkrd,bkds->bkrs", rows, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.asarray(hd ** -0.5, jnp.float32)
    mask = jnp.broadcast_to(mask[:, :, :, None], (b, 1, t, g, mask.shape[-1])).reshape(b, 1, t * g, -1)
    logits = jnp.where(mask, logits, jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrs,bksd->bkrd", probs, v)  # [B, Hkv, T * G, hd]
    return jnp.swapaxes(out.reshape(b, hkv, t, g, hd), 1, 2).reshape(b, t, hq, hd)
