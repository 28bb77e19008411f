"""Model configuration: one frozen dataclass for the Llama family, read from / written to
Hugging Face `config.json` (old and current transformers layouts)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.errors import CheckpointError, UnsupportedModelError
from jaxalign.nn.rope import RopeConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only LM (hashable: usable as a jit static arg).

    `dtype` is the activation/compute dtype; `param_dtype` the dtype params are kept in.
    `remat` is the per-layer rematerialization policy: "none", "full", "dots".
    `attention_impl` is the attention kernel (`jaxalign.nn.attention.IMPLEMENTATIONS`).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (HF configs may list several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def num_params(self) -> int:
        """Parameter count (embeddings and head included)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    # Nested per-layer-type rope parameters (e.g. {"full_attention": {...}}).
    if params and all(isinstance(v, dict) for v in params.values()):
        kinds = {k: v for k, v in params.items()}
        if len(kinds) != 1:
            raise UnsupportedModelError(
                f"per-layer-type rope parameters {sorted(kinds)} are not supported"
            )
        params = next(iter(kinds.values()))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in _SUPPORTED_ROPE:
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported (supported: "
            f"{', '.join(_SUPPORTED_ROPE)}); the checkpoint needs a model with {kind} rope"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    return RopeConfig(
        theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
        ),
    )


def _sliding_window_from_hf(d: dict[str, Any], model_type: str) -> int | None:
    layer_types = d.get("layer_types") or []
    if model_type in ("qwen2", "qwen3"):
        if d.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise UnsupportedModelError(
                f"sliding-window attention on some layers ({model_type} with use_sliding_window=true) "
                "is not supported; use a checkpoint with use_sliding_window=false"
            )
        return None
    if "sliding_attention" in layer_types and "full_attention" in layer_types:
        raise UnsupportedModelError("mixed sliding-window / full attention layers are not supported")
    window = d.get("sliding_window")
    return int(window) if window else None


_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_ints(d: dict[str, Any], source: str) -> None:
    """CheckpointError unless every required size is present and every size given is a positive integer."""
    for key in _REQUIRED_INTS + ("num_key_value_heads", "head_dim"):
        value = d.get(key)
        if value is None and key in _REQUIRED_INTS:
            raise CheckpointError(f"{source} has no {key!r}; a {d.get('model_type')} config needs "
                                  f"{', '.join(_REQUIRED_INTS)}: fix the file or re-download the model")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}; "
                                  "fix the file or re-download the model")


def from_hf_dict(d: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """Build a ModelConfig from a parsed HF config.json (read from `source`, named in errors);
    unsupported features raise UnsupportedModelError, missing or non-integer sizes CheckpointError."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; jaxalign implements "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3)"
        )
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu)")
    _check_ints(d, source)
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    head_dim = d.get("head_dim") or hidden // heads
    attention_bias = bool(d.get("attention_bias", False))
    eos = d.get("eos_token_id")
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(d),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window_from_hf(d, model_type),
        initializer_range=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
    )
    return dataclasses.replace(cfg, **overrides)


def to_hf_dict(cfg: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
    """The config.json transformers needs to load this model back."""
    rope: dict[str, Any] = {"rope_type": cfg.rope.kind, "rope_theta": cfg.rope.theta}
    if cfg.rope.kind != "default":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.kind == "llama3":
        rope.update(
            low_freq_factor=cfg.rope.low_freq_factor,
            high_freq_factor=cfg.rope.high_freq_factor,
            original_max_position_embeddings=cfg.rope.original_max_position_embeddings,
        )
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    d: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        # Both spellings so old and new transformers read the rope settings.
        "rope_parameters": rope,
        "rope_theta": cfg.rope.theta,
        "rope_scaling": None if cfg.rope.kind == "default" else rope,
        "dtype": torch_dtype or cfg.param_dtype,
        "torch_dtype": torch_dtype or cfg.param_dtype,
    }
    if cfg.model_type == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "qwen3":
        d.update(attention_bias=cfg.qkv_bias, use_sliding_window=False)
    elif cfg.model_type == "qwen2":
        d.update(use_sliding_window=False)
    elif cfg.model_type == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    return d
