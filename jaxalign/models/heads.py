"""Scalar heads on the decoder: reward models (a score per sequence) and value models
(a score per token), in the layout of Hugging Face `*ForSequenceClassification`.

A reward model is our decoder params plus `params["score"] = {"kernel": [D, 1]}` (HF
`score.weight` `[1, D]`, no bias) and no `lm_head`:

    rm = heads.load_reward_model("path/to/causal-lm")          # fresh head, N(0, 1/sqrt(D+1))
    rm = heads.load_reward_model("path/to/seq-cls-checkpoint") # its trained head
    scores = heads.sequence_scores(rm.params, rm.config, ids, mask)    # [B] f32
    values = heads.token_values(rm.params, rm.config, ids, mask)        # [B, T] f32
    heads.save_reward_model(rm, "out")   # transformers.AutoModelForSequenceClassification loads it

The score of a sequence is the head applied to the final hidden state of its last real
token (the last position where `attention_mask` is 1), so left and right padding give the
same score. transformers pools at the rightmost token that is not `pad_token_id` instead:
the two agree unless the pad id also occurs as a real last token (e.g. pad == EOS and
the sequence ends in EOS; then transformers scores the token before it).

LoRA reward models are PEFT `SEQ_CLS` adapters (`save_reward_adapter` /
`load_reward_adapter`): LoRA matrices plus the full score head (`modules_to_save`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import CheckpointError
from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import hidden_states
from jaxalign.nn.seams import dense

log = logging.getLogger(__name__)

SCORE_WEIGHT = "score.weight"


# ----------------------------------------------------------------------------- the head


def default_head_std(config: ModelConfig) -> float:
    """1 / sqrt(D + 1): the reward-head init of InstructGPT / TRL's reward modeling."""
    return 1.0 / math.sqrt(config.hidden_size + 1)


def init_score_head(config: ModelConfig, rng, std: float | None = None) -> dict:
    """A fresh head `{"kernel": [D, 1]}` ~ normal(0, std) (default `default_head_std`), param dtype."""
    std = default_head_std(config) if std is None else float(std)
    kernel = jax.random.normal(rng, (config.hidden_size, 1), jnp.float32) * std
    return {"kernel": kernel.astype(jnp.dtype(config.param_dtype))}


def add_score_head(params, config: ModelConfig, rng, std: float | None = None, mesh=None) -> dict:
    """`params` without `lm_head` and with a fresh `score` head (sharded over `mesh` when given).

    Keeps an existing `score` head as it is. The decoder arrays are shared, not copied.
    """
    out = {k: v for k, v in params.items() if k != "lm_head"}
    if "score" not in out:
        head = init_score_head(config, rng, std)
        if mesh is not None:
            from jaxalign.parallel.rules import named_shardings

            head = jax.device_put(head, named_shardings({"score": head}, mesh)["score"])
        out["score"] = head
    return out


def has_score_head(params) -> bool:
    return isinstance(params, dict) and "score" in params


def _check_head(params) -> jax.Array:
    if not has_score_head(params):
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise CheckpointError(f"params have no 'score' head (top-level keys: {keys}); load a reward model with "
                              "heads.load_reward_model or add one with heads.add_score_head")
    return dense(params["score"]["kernel"])


def apply_head(params, hidden) -> jax.Array:
    """The score head on hidden states `[..., D]` -> `[...]` (f32 math)."""
    kernel = _check_head(params)
    return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), kernel[:, 0].astype(jnp.float32))


def last_token_index(attention_mask) -> jax.Array:
    """`[B]` int32: the last position where `attention_mask` `[B, T]` is 1 (left or right
    padding); T - 1 for an all-padding row."""
    mask = jnp.asarray(attention_mask) > 0
    t = mask.shape[-1]
    return (t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)


def _hidden(params, config, input_ids, attention_mask, positions=None, segment_ids=None):
    from jaxalign.models.model import positions_from_mask

    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    if positions is None:
        positions = positions_from_mask(mask)
    if segment_ids is None:
        segment_ids = mask
    return hidden_states(params, config, jnp.asarray(input_ids, jnp.int32), positions, segment_ids)


def sequence_scores(params, config: ModelConfig, input_ids, attention_mask, positions=None, segment_ids=None):
    """Reward scores `[B]` f32: the head at each row's last real token.

    input_ids, attention_mask `[B, T]` (1 = real token; left or right padding). positions /
    segment_ids `[B, T]` default to what the mask implies (real tokens counted from 0, one
    segment per row), as `Model.logits` does. Jittable with `config` static.
    """
    _check_head(params)
    h = _hidden(params, config, input_ids, attention_mask, positions, segment_ids)
    last = last_token_index(attention_mask)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return apply_head(params, h_last)


def token_values(params, config: ModelConfig, input_ids, attention_mask, positions=None, segment_ids=None):
    """The head at every position: `[B, T]` f32 (entry t = value after reading tokens <= t;
    padding entries are meaningless). Shapes and padding as `sequence_scores`."""
    _check_head(params)
    return apply_head(params, _hidden(params, config, input_ids, attention_mask, positions, segment_ids))


# ----------------------------------------------------------------------------- HF layout


def is_sequence_classification(hf_config: dict) -> bool:
    """Whether an HF config.json describes a `*ForSequenceClassification` model."""
    return any(str(a).endswith("ForSequenceClassification") for a in hf_config.get("architectures") or [])


def num_labels_of(hf_config: dict) -> int:
    if "num_labels" in hf_config:
        return int(hf_config["num_labels"])
    return len(hf_config.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"})  # transformers' default: 2


def seq_cls_hf_dict(d: dict, model_type: str, pad_token_id: int | None) -> dict:
    """Turn our causal-LM config.json dict into the one AutoModelForSequenceClassification
    loads as a reward model (num_labels=1, pad_token_id set)."""
    from jaxalign.models.config import _ARCHITECTURES

    arch = _ARCHITECTURES[model_type].replace("ForCausalLM", "ForSequenceClassification")
    return {**d, "architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0}, "pad_token_id": pad_token_id, "problem_type": "regression"}


def export_pad_token_id(config: ModelConfig, pad_token_id: int | None = None) -> int | None:
    """The pad id written to an exported reward model: given, else the model's, else its
    (first) EOS id (transformers needs one to pool batches)."""
    if pad_token_id is not None:
        return int(pad_token_id)
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    if config.eos_token_ids:
        log.warning("the reward model has no pad_token_id; exporting with pad_token_id = EOS (%d): transformers "
                    "then scores the token before a final EOS", config.eos_token_ids[0])
        return int(config.eos_token_ids[0])
    return None


def load_reward_model(path: str, dtype=None, mesh=None, *, compute_dtype=None, rules=None, head_init_std=None,
                      seed: int = 0, quantize: str | None = None, quant_block_size: int | None = None,
                      double_quant: bool = False, **config_overrides):
    """A reward `Model` (params `{"model", "score"}`, no `lm_head`) from an HF directory.

    A `*ForSequenceClassification` checkpoint (num_labels must be 1) keeps its `score.weight`;
    a causal-LM checkpoint gets a fresh head ~ normal(0, head_init_std or 1/sqrt(D+1))
    drawn from `seed` (its lm_head is not loaded). Other arguments as `ja.load_model`.
    """
    from jaxalign.models import gguf, hf
    from jaxalign.models.model import Model, load_model

    path = gguf.resolve(path)
    d = hf.read_config(path)
    kw = dict(dtype=dtype, mesh=mesh, compute_dtype=compute_dtype, rules=rules, quantize=quantize,
              quant_block_size=quant_block_size, double_quant=double_quant, **config_overrides)
    if is_sequence_classification(d):
        n = num_labels_of(d)
        if n != 1:
            raise CheckpointError(f"{path} is a sequence classifier with {n} labels; a reward model has "
                                  "num_labels=1 (one scalar score)")
        return load_model(path, head="score", **kw)
    model = load_model(path, head="none", **kw)
    params = add_score_head(model.params, model.config, jax.random.key(seed), head_init_std, mesh)
    return Model(model.config, params, mesh)


def save_reward_model(model, out_dir: str, dtype=None, pad_token_id: int | None = None,
                      max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a reward `Model` as config.json + safetensors in the layout
    `transformers.AutoModelForSequenceClassification` loads (e.g. LlamaForSequenceClassification,
    num_labels=1, `score.weight` [1, D]); LoRA merged, quantized weights dequantized.
    pad_token_id: see `export_pad_token_id`."""
    _check_head(model.params)
    model.save_pretrained(out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, pad_token_id=pad_token_id)


# ----------------------------------------------------------------------------- LoRA reward models


def save_reward_adapter(params, out_dir: str, base: str | None = None) -> None:
    """A LoRA reward model as a PEFT `SEQ_CLS` adapter: the LoRA matrices (as
    `lora.save_adapter`) plus `base_model.model.score.weight` [1, D] (modules_to_save), which
    `peft.PeftModel.from_pretrained(AutoModelForSequenceClassification(base), out_dir)` loads."""
    from safetensors.numpy import load_file, save_file

    from jaxalign.peft import lora

    kernel = np.asarray(jax.device_get(_check_head(params)), np.float32)
    lora.save_adapter({k: v for k, v in params.items() if k != "score"}, out_dir, base=base)
    weights = os.path.join(out_dir, lora.ADAPTER_WEIGHTS)
    tensors = load_file(weights)
    tensors["base_model.model.score.weight"] = np.ascontiguousarray(kernel.T)
    save_file(tensors, weights, metadata={"format": "pt"})
    cfg_path = os.path.join(out_dir, lora.ADAPTER_CONFIG)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(task_type="SEQ_CLS", modules_to_save=["classifier", "score"])
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def load_reward_adapter(base_params, config: ModelConfig, adapter_dir: str):
    """`(params, config)` of a reward model that is a PEFT `SEQ_CLS` LoRA adapter (LoRA
    matrices + `score.weight` in modules_to_save) on `base_params` (our decoder tree; an
    `lm_head` is dropped). The returned params share the base arrays."""
    from safetensors.numpy import load_file, save_file

    from jaxalign.peft import lora

    cfg_path = os.path.join(adapter_dir, lora.ADAPTER_CONFIG)
    weights = os.path.join(adapter_dir, lora.ADAPTER_WEIGHTS)
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
        raise CheckpointError(f"{adapter_dir} is not a PEFT adapter: it needs {lora.ADAPTER_CONFIG} and "
                              f"{lora.ADAPTER_WEIGHTS}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    tensors = load_file(weights)
    score_keys = [k for k in tensors if k.endswith(SCORE_WEIGHT) and "lora_" not in k]
    if len(score_keys) != 1:
        raise CheckpointError(f"{weights} has {len(score_keys)} score head tensors ({score_keys}); a reward adapter "
                              "saves exactly one `...score.weight` [1, D] (PEFT task_type SEQ_CLS)")
    score = tensors.pop(score_keys[0])
    if score.shape != (1, config.hidden_size):
        raise CheckpointError(f"{score_keys[0]} has shape {list(score.shape)}; expected [1, {config.hidden_size}] "
                              "(num_labels=1 over this model's hidden size)")
    cfg["modules_to_save"] = None
    cfg["task_type"] = "CAUSAL_LM"
    tmp = tempfile.mkdtemp(prefix="jaxalign-rm-adapter-")
    try:
        save_file(tensors, os.path.join(tmp, lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, lora.ADAPTER_CONFIG), "w") as f:
            json.dump(cfg, f)
        decoder = {k: v for k, v in base_params.items() if k not in ("lm_head", "score")}
        params = lora.load_adapter(decoder, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kernel = jnp.asarray(np.ascontiguousarray(score.T), dtype=jnp.dtype(config.param_dtype))
    ref = jax.tree.leaves(base_params["model"])[0]
    if hasattr(ref, "sharding") and hasattr(ref.sharding, "mesh"):
        from jaxalign.parallel.rules import named_shardings

        kernel = jax.device_put(kernel, named_shardings({"score": {"kernel": kernel}}, ref.sharding.mesh)["score"]["kernel"])
    return {**params, "score": {"kernel": kernel}}, config


__all__ = ["add_score_head", "apply_head", "default_head_std", "init_score_head", "is_sequence_classification",
           "last_token_index", "load_reward_adapter", "load_reward_model", "save_reward_adapter",
           "save_reward_model", "sequence_scores", "token_values"]
