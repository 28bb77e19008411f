"""Tiny GGUF files written the way llama.cpp's converter writes them (for tests/test_gguf.py)."""

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

# HF name suffix -> GGUF name stem (per layer).
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
K_BLOCK_BYTES = {Q.Q4_K: 144, Q.Q6_K: 210}


def gguf_name(hf_name: str) -> str:
    stem, _, leaf = hf_name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{leaf}"
    _, _, i, rest = stem.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest]}.{leaf}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Random but valid K-quant blocks (the gguf package can dequantize, not quantize, them)."""
    rng = np.random.RandomState(seed)
    n = cols // 256
    blocks = rng.randint(0, 256, (rows, n, K_BLOCK_BYTES[qtype])).astype(np.uint8)
    scale = np.full((rows, n, 1), 0.01, np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16) lead the block
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    else:  # Q6_K: d (f16) ends the block
        blocks[..., -2:] = scale
    return blocks.reshape(rows, n * K_BLOCK_BYTES[qtype])


def write_gguf(path: str, hf_model, tokenizer_fields: dict, qtype=Q.F32, arch: str = "llama",
               chat_template: str | None = None) -> str:
    """Write `hf_model` (a transformers causal LM) as GGUF: 2-D weights in `qtype`, norms in F32."""
    cfg = hf_model.config
    w = GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    for key, value in tokenizer_fields.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    if chat_template:
        w.add_chat_template(chat_template)
    for i, (name, p) in enumerate(hf_model.state_dict().items()):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = p.detach().to(torch.float32).numpy()
        if arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "q_proj.bias")):
            a = permute(a, cfg.num_attention_heads)
        elif arch in ("llama", "mistral") and name.endswith(("k_proj.weight", "k_proj.bias")):
            a = permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype in K_BLOCK_BYTES:
            w.add_tensor(gguf_name(name), random_k_quant(*a.shape, qtype, seed=i), raw_dtype=qtype)
        elif a.ndim == 2 and qtype != Q.F32:
            q = quants.quantize(a, qtype)
            w.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def byte_level_bpe_fields(hf_tokenizer_json: dict, specials: dict[str, str], pre: str = "gpt2") -> dict:
    """tokenizer.ggml.* fields of a byte-level BPE tokenizer.json (as llama.cpp stores one)."""
    vocab = hf_tokenizer_json["model"]["vocab"]
    added = {t["content"]: t["id"] for t in hf_tokenizer_json["added_tokens"]}
    tokens = [None] * (max([*vocab.values(), *added.values()]) + 1)
    for t, i in {**vocab, **added}.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf_tokenizer_json["model"]["merges"]]
    types = [3 if t in added else 1 for t in tokens]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.add_bos_token": False}
    for key, tok in specials.items():
        fields[f"tokenizer.ggml.{key}_token_id"] = added[tok]
    return fields
