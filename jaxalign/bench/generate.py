"""`jaxalign bench generate`: sampling throughput (prefill + KV-cache decode) of jaxalign's
sampler next to transformers' `generate` and Tunix's `Sampler`, on the same weights and the
same prompt token ids and dtype, each peer in a fresh process.

Every run decodes exactly `new` tokens per row (no early stop), greedy, so all peers do the
same arithmetic. Decode ms/step comes from two lengths (`new` short and long): the time
difference over the extra steps, with prefill and compile cancelled out. The roofline figure
is the bytes one decode step must read (weights + the KV cache) at the measured memory copy
bandwidth of this device.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from jaxalign.bench.common import in_fresh_process, timed


def _prompts(vocab_size: int, batch: int, prompt_len: int) -> np.ndarray:
    """Random prompt ids, away from the low ids where special tokens live."""
    low = min(100, vocab_size // 4)
    return np.random.RandomState(0).randint(low, vocab_size - 1, (batch, prompt_len)).astype(np.int32)


def _timed(fn, iters: int) -> tuple[float, float, np.ndarray]:
    """(first-call seconds, mean seconds of `iters` more calls, last output) of fn()."""
    last = {}

    def call():
        last["out"] = fn()

    first, seconds = timed(call, warmup=1, iters=iters)
    return first, seconds, last["out"]


def jaxalign_generate(checkpoint: str, ids: np.ndarray, new: int, iters: int, dtype: str) -> dict:
    """jaxalign's sampler: one jitted prefill + on-device decode loop."""
    import jaxalign as ja

    model = ja.load_model(checkpoint, dtype=dtype, compute_dtype=dtype)
    mask = np.ones_like(ids)
    run = lambda: np.asarray(ja.generate(model, ids, mask, 0, max_new_tokens=new, greedy=True,  # noqa: E731
                                         eos_token_ids=()).tokens)
    first, seconds, tokens = _timed(run, iters)
    return {"first_s": first, "seconds": seconds, "tokens": tokens}


def transformers_generate(checkpoint: str, ids: np.ndarray, new: int, iters: int, dtype: str) -> dict:
    """transformers' `generate` (PyTorch, its default dynamic KV cache; on the GPU when there is one)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()
    tids = torch.tensor(ids, dtype=torch.long, device=device)

    def run():
        with torch.inference_mode():
            out = model.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].cpu().numpy()

    first, seconds, tokens = _timed(run, iters)
    return {"first_s": first, "seconds": seconds, "tokens": tokens, "torch_threads": torch.get_num_threads()}


class _IdTokenizer:
    """Tunix's Sampler takes strings: this tokenizer reads them as space-separated ids, so
    Tunix sees exactly the prompt ids the other peers get (no BOS added)."""

    def __init__(self, never: int):
        self.never = never

    def encode(self, text, **kw):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return self.never

    def pad_id(self):
        return 0


def tunix_generate(checkpoint: str, ids: np.ndarray, new: int, iters: int, dtype: str) -> dict:
    """Tunix's `Sampler` over its Llama 3 module, weights read from the same safetensors."""
    import jax.numpy as jnp
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.llama3 import model as tunix_llama, params as tunix_params

    with open(f"{checkpoint}/config.json") as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    cfg = tunix_llama.ModelConfig(
        num_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"], num_heads=c["num_attention_heads"], head_dim=head_dim,
        num_kv_heads=c["num_key_value_heads"], rope_theta=c["rope_theta"], norm_eps=c["rms_norm_eps"],
        weight_tying=c.get("tie_word_embeddings", False))
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = tunix_params.create_model_from_safe_tensors(checkpoint, cfg, mesh=mesh, dtype=jnp.dtype(dtype))
    never = c["vocab_size"] - 1  # prompts never hold it; a stop token Tunix needs
    cache = tunix_sampler.CacheConfig(cache_size=ids.shape[1] + new, num_layers=cfg.num_layers,
                                      num_kv_heads=cfg.num_kv_heads, head_dim=head_dim)
    sampler = tunix_sampler.Sampler(model, _IdTokenizer(never), cache)
    prompts = [" ".join(map(str, row)) for row in ids]

    def run():
        out = sampler(prompts, max_generation_steps=new, max_prompt_length=ids.shape[1], eos_tokens=[never],
                      temperature=0.0, pad_output=True)
        return np.stack([np.asarray(t)[:new] for t in out.tokens])

    first, seconds, tokens = _timed(run, iters)
    return {"first_s": first, "seconds": seconds, "tokens": tokens}


PEERS = {"jaxalign": jaxalign_generate, "transformers": transformers_generate, "tunix": tunix_generate}


def _peer_available(name: str) -> str | None:
    """None when peer `name` can run here, else why not."""
    import importlib.util

    module = {"transformers": "torch", "tunix": "tunix"}.get(name)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed" + (" (pip install google-tunix)" if name == "tunix" else "")
    return None


def memory_bandwidth_gbs(mb: int | None = None) -> float:
    """Measured copy bandwidth of this device in GB/s (bytes read + written per second), over
    an array of `mb` MiB (default: 256 on CPU, 2048 on accelerators)."""
    import jax.numpy as jnp

    mb = mb or (256 if jax.default_backend() == "cpu" else 2048)

    x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0)
    copy(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        copy(x).block_until_ready()
    return 2 * x.nbytes * 5 / (time.perf_counter() - t0) / 1e9


def decode_bytes_per_step(config, batch: int, cache_len: int, bytes_per_value: int = 4) -> int:
    """Bytes one decode step must read: every weight once, plus the batch's K and V caches."""
    kv = 2 * config.num_hidden_layers * batch * cache_len * config.num_key_value_heads * config.head_dim
    return (config.num_params() + kv) * bytes_per_value


def bench_generate(checkpoint: str, batches: list[int], prompt_len: int, new_tokens: list[int], iters: int,
                   peers: list[str], dtype: str = "float32") -> list[dict]:
    """One result per batch size: tokens/s of every peer at each length, ratios to jaxalign,
    decode ms/step (from the first and last length), the roofline and greedy agreement."""
    from jaxalign.models.config import from_hf_dict

    with open(f"{checkpoint}/config.json") as f:
        config = from_hf_dict(json.load(f), f"{checkpoint}/config.json")
    bandwidth = memory_bandwidth_gbs()
    results = []
    for batch in batches:
        ids = _prompts(config.vocab_size, batch, prompt_len)
        row = {"benchmark": "generate", "device": jax.devices()[0].device_kind, "params": config.num_params(),
               "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "memory_bandwidth_gb_s": round(bandwidth, 1)}
        tokens = {}
        for name in ["jaxalign"] + [p for p in peers if p != "jaxalign"]:
            missing = _peer_available(name)
            if missing:
                row[f"{name}_skipped"] = missing
                continue
            times = {}
            for new in new_tokens:
                out = in_fresh_process(PEERS[name], checkpoint, ids, new, iters, dtype)
                times[new] = out["seconds"]
                row[f"{name}_tokens_per_s@{new}"] = round(batch * new / out["seconds"], 1)
                row[f"{name}_first_call_s@{new}"] = round(out["first_s"], 2)
                tokens[name] = out["tokens"]
            if len(new_tokens) > 1:
                lo, hi = new_tokens[0], new_tokens[-1]
                row[f"{name}_decode_ms_per_step"] = round(1e3 * (times[hi] - times[lo]) / (hi - lo), 2)
        ours = row.get("jaxalign_decode_ms_per_step")
        if ours:
            bytes_per_step = decode_bytes_per_step(config, batch, prompt_len + new_tokens[-1], np.dtype(
                "float32" if dtype == "float32" else "float16").itemsize)
            bound_ms = 1e3 * bytes_per_step / (bandwidth * 1e9)
            row["decode_bound_ms_per_step"] = round(bound_ms, 2)
            row["decode_fraction_of_bound"] = round(bound_ms / ours, 3)
        for name in tokens:
            if name == "jaxalign":
                continue
            for new in new_tokens:
                if f"{name}_tokens_per_s@{new}" in row:
                    row[f"speedup_vs_{name}@{new}"] = round(
                        row[f"jaxalign_tokens_per_s@{new}"] / row[f"{name}_tokens_per_s@{new}"], 2)
            k = min(16, tokens[name].shape[1])
            row[f"same_first_{k}_greedy_tokens_as_{name}"] = float(
                np.mean((tokens[name][:, :k] == tokens["jaxalign"][:, :k]).all(-1)))
        results.append(row)
    return results
