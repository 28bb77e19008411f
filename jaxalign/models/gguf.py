"""GGUF files (llama.cpp's format) -> Hugging Face model directories.

A GGUF file holds the config (key/value metadata), the tokenizer (vocabulary, merges, token
types, chat template) and the tensors, most of them block-quantized. `convert` dequantizes
every tensor with the `gguf` package (numpy only), renames it to the HF name, undoes
llama.cpp's q/k row permutation (its rope layout for the `llama` architecture), and writes
config.json, generation_config.json, safetensors shards and a fast tokenizer that
transformers' `AutoTokenizer` loads. `resolve` turns a `.gguf` path into a cached converted
directory, so `ja.load_model("model.gguf")` and configs naming a `.gguf` file just work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import ml_dtypes
import numpy as np

from jaxalign.errors import CheckpointError, UnsupportedModelError

log = logging.getLogger(__name__)

# GGUF architecture -> HF model_type. Only these share our decoder code (see models/llama.py).
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
# llama.cpp stores q/k rows interleaved for its rope kernel only for these architectures.
_PERMUTED_QK = ("llama", "mistral")

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float16": np.dtype(np.float16)}

# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_SPLITS = {
    "llama3": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "dbrx": [_LLAMA3_SPLIT], "falcon3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
    # SmolLM / StarCoder: every digit on its own, then GPT-2's split.
    "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT], "refact": [r"\p{N}", _GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT], "default": [_GPT2_SPLIT],
}
_CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 3, 4, 5, 6


class GGUFFile:
    """A parsed GGUF file: `metadata` (plain Python values) and `tensors` (name -> reader tensor)."""

    def __init__(self, path: str):
        import gguf

        if not os.path.isfile(path):
            raise CheckpointError(f"GGUF file {path!r} does not exist")
        try:
            reader = gguf.GGUFReader(path, "r")
        except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
            raise CheckpointError(f"{path} is not a readable GGUF file ({e}); re-download it") from e
        self.path = path
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = field.contents()
        self.tensors = {t.name: t for t in reader.tensors}
        self.architecture = self.metadata.get("general.architecture")

    def get(self, key: str, default=None):
        """Metadata `{architecture}.{key}` (e.g. "block_count"), else `default`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def array(self, name: str) -> np.ndarray:
        """The tensor dequantized to f32, in HF's layout ([out, in] for weights)."""
        import gguf

        t = self.tensors[name]
        try:
            out = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name} has type {t.tensor_type.name}, which the installed `gguf` package "
                f"cannot dequantize ({e}); upgrade `gguf` or use a file quantized as Q8_0/Q4_K_M/F16"
            ) from e
        shape = tuple(int(d) for d in reversed(t.shape))
        return np.asarray(out, np.float32).reshape(shape)


def _int_or_uniform(value, what: str) -> int:
    if isinstance(value, list):  # per-layer values (some files store one per layer)
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{what} differs between layers ({sorted(set(value))}); not supported")
        value = value[0]
    return int(value)


def _llama3_rope(freq_factors: np.ndarray, theta: float, head_dim: int, original: int) -> dict:
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency `rope_freqs` tensor."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            lo_w, hi_w = original / low, original / high
            smooth = (original / wavelen - low) / (high - low)
            want = np.where(wavelen < hi_w, 1.0, np.where(wavelen > lo_w, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if np.allclose(want, freq_factors, rtol=1e-3):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": original}
    raise UnsupportedModelError("the file's rope_freqs tensor matches no llama3 rope scaling this converter knows")


def hf_config(g: GGUFFile, dtype: str = "float32") -> dict:
    """The HF config.json dict of a GGUF file (clear errors for what jaxalign cannot run)."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{g.path}: GGUF architecture {arch!r} is not supported; jaxalign converts "
            f"{', '.join(sorted(ARCHITECTURES))} (Llama, Mistral, Qwen2, Qwen3 families)"
        )
    model_type = ARCHITECTURES[arch]
    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if g.get(k) is None]
    if missing:
        raise CheckpointError(f"{g.path} lacks metadata {missing}; the file is incomplete or not a language model")
    hidden = int(g.get("embedding_length"))
    heads = _int_or_uniform(g.get("attention.head_count"), "attention.head_count")
    kv_heads = _int_or_uniform(g.get("attention.head_count_kv", heads), "attention.head_count_kv")
    head_dim = int(g.get("attention.key_length") or g.get("rope.dimension_count") or hidden // heads)
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    vocab = int(g.tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in g.tensors else len(tokens or ())
    theta = float(g.get("rope.freq_base", 10000.0))
    d: dict[str, Any] = {
        "architectures": [_HF_CLASSES[model_type]], "model_type": model_type,
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": _int_or_uniform(g.get("feed_forward_length"), "feed_forward_length"),
        "num_hidden_layers": int(g.get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": int(g.get("context_length", 4096)),
        "rms_norm_eps": float(g.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta, "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "torch_dtype": dtype,
    }
    for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        value = g.metadata.get(f"tokenizer.ggml.{theirs}_token_id")
        if value is not None:
            d[f"{ours}_token_id"] = int(value)
    if model_type == "llama":
        d["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        d["mlp_bias"] = False
    if model_type in ("mistral", "qwen2", "qwen3"):
        window = g.get("attention.sliding_window")
        d["sliding_window"] = int(window) if window else None
        if model_type != "mistral":
            d["use_sliding_window"] = False
    scaling = g.get("rope.scaling.type")
    if scaling and scaling != "none":
        if scaling != "linear":
            raise UnsupportedModelError(f"{g.path}: rope scaling {scaling!r} is not supported (linear, llama3 are)")
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(g.get("rope.scaling.factor"))}
    if "rope_freqs.weight" in g.tensors:
        original = int(g.get("rope.scaling.original_context_length") or 8192)
        d["rope_scaling"] = _llama3_rope(g.array("rope_freqs.weight").astype(np.float64), theta, head_dim, original)
    return d


def hf_tensor_name(name: str) -> str | None:
    """HF name of GGUF tensor `name` (None for `rope_freqs`, which lives in the config)."""
    if name == "rope_freqs.weight":
        return None
    stem, _, leaf = name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{leaf}"
    raise UnsupportedModelError(f"GGUF tensor {name!r} has no counterpart in jaxalign's decoder")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of q/k rows (inverse of its convert script's `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_array(g: GGUFFile, name: str, config: dict) -> np.ndarray:
    """GGUF tensor `name` as HF stores it: dequantized to f32, q/k rows un-permuted."""
    w = g.array(name)
    if g.architecture in _PERMUTED_QK and ".attn_q." in name:
        w = unpermute_qk(w, config["num_attention_heads"])
    elif g.architecture in _PERMUTED_QK and ".attn_k." in name:
        w = unpermute_qk(w, config["num_key_value_heads"])
    return w


def shard_plan(g: GGUFFile, itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """GGUF tensor names grouped into safetensors shards of at most `max_shard_bytes` (one
    tensor may exceed it alone), from the shapes only: nothing is dequantized yet."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in g.tensors.items():
        if hf_tensor_name(name) is None:
            continue
        nbytes = int(np.prod([int(d) for d in t.shape])) * itemsize
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    vocabulary pieces, ordered by the merged token's score (higher first)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for tok, score in zip(tokens, scores):
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def build_tokenizer(g: GGUFFile):
    """A `PreTrainedTokenizerFast` from the file's tokenizer metadata (byte-level BPE or SentencePiece BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    meta = g.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{g.path} has no tokenizer (tokenizer.ggml.tokens); it cannot be converted alone")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        splits = _PRE_SPLITS.get(pre)
        if splits is None:
            log.warning("GGUF pre-tokenizer %r is unknown; using GPT-2's split (check tokenization)", pre)
            splits = _PRE_SPLITS["default"]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
        tok = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores), unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [normalizers.Replace(" ", "▁")]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            steps.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        raise UnsupportedModelError(
            f"{g.path}: tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and SentencePiece 'llama' are)")
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    if (add_bos and bos) or (add_eos and eos):
        single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
        specials = [(t, vocab[t]) for t in (bos if add_bos else None, eos if add_eos else None) if t]
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=specials)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown"),
                                   pad_token=token("padding"), clean_up_tokenization_spaces=False)
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def convert(path: str, out_dir: str, dtype: str = "float32", max_shard_bytes: int = 2 * 2**30) -> str:
    """Convert GGUF file `path` into an HF model directory `out_dir` (written atomically).

    dtype: float32 (default: exact for every GGUF type), bfloat16 or float16. Returns out_dir.
    """
    from jaxalign.models.tensorfiles import save_file

    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use {', '.join(_OUT_DTYPES)}")
    g = GGUFFile(path)
    config = hf_config(g, dtype)
    fast = build_tokenizer(g)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        out_dtype = _OUT_DTYPES[dtype]
        plan = shard_plan(g, out_dtype.itemsize, max_shard_bytes)
        weight_map, total = {}, 0
        for i, names in enumerate(plan):  # one shard in memory at a time
            fname = "model.safetensors" if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            shard = {hf_tensor_name(n): hf_array(g, n, config).astype(out_dtype) for n in names}
            save_file(shard, os.path.join(tmp, fname))
            weight_map.update({k: fname for k in shard})
            total += sum(w.nbytes for w in shard.values())
            del shard
        if len(plan) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        fast.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s (%s, %d tensors)", path, out_dir, dtype, len(weight_map))
    return out_dir


def cache_root() -> str:
    """jaxalign's cache directory: $JAXALIGN_CACHE, else $XDG_CACHE_HOME/jaxalign, else ~/.cache/jaxalign."""
    if os.environ.get("JAXALIGN_CACHE"):
        return os.environ["JAXALIGN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxalign")


def resolve(path: str) -> str:
    """`path` itself, or for a `.gguf` file its converted HF directory in the cache
    (converted on first use; keyed by the file's absolute path, size and modification time)."""
    if not (isinstance(path, str) and path.lower().endswith(".gguf")):
        return path
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path!r} does not exist")
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache_root(), "gguf", f"{stem}-{key}")
    if not os.path.exists(os.path.join(out, "config.json")):
        log.info("converting %s to an HF directory in %s (once)", path, out)
        convert(path, out)
    return out


__all__ = ["ARCHITECTURES", "GGUFFile", "build_tokenizer", "cache_root", "convert", "hf_array", "hf_config",
           "hf_tensor_name", "resolve", "shard_plan", "unpermute_qk"]
