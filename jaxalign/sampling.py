"""KV-cache sampler: jit-compiled prefill + an on-device decode loop, for rollouts and the CLI.

    out = generate(model, input_ids, attention_mask, jax.random.key(0), max_new_tokens=64,
                   temperature=0.7, top_p=0.9)
    out.tokens    [B, N] int32   sampled tokens, `pad_token_id` after a row stopped
    out.logprobs  [B, N] float32 log_softmax(logits / temperature)[token]  (0 after stop)
    out.mask      [B, N] int32   1 on generated tokens up to and including the stop token
    out.lengths   [B]    int32   number of generated tokens (= out.mask.sum(-1))

Prompts are `[B, P]` ids with a mask (1 = real token); left padding is the usual layout
(right or inner padding also works: pad slots are never attended). Positions count real
tokens only, as in `Model.logits`, so a rollout's log-probs can be recomputed with a full
forward on `concat(prompt, tokens)`.

Log-probs are those of the temperature-scaled distribution *before* top-k / top-p
filtering, i.e. exactly what `log_softmax(logits / temperature)` gives when recomputed
(what PPO's ratio needs); `greedy` changes the choice (argmax), not the log-prob. With
temperature 0 (= greedy) they are `log_softmax(logits)`.

Phases: `prefill` runs the prompt through the decoder writing the cache and samples the
first token; `decode` is a `lax.while_loop` of one token per step that stops when every
row has emitted a stop token or `max_new_tokens` are out. The decode state (cache included)
is donated from call to call. Step `t` samples with `fold_in(rng, t)`, so streaming in
chunks (the CLI) and one-shot generation give identical tokens. On CPU the decode reads
per-layer weights and caches, unrolled over the layers (`jaxalign.models.llama.decode_per_layer`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.errors import CheckpointError, ConfigError, ShardingError
from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import (KVCache, decode_per_layer, hidden_states_cached, init_cache, split_layers,
                                   split_layers_shared, unembed)
from jaxalign.models.model import Model, _TreeKey, positions_from_mask
from jaxalign.parallel.rules import batch_sharding, batch_size_multiple


@struct.dataclass
class GenerationOutput:
    """tokens/logprobs/mask [B, N] and lengths [B]; see the module docstring."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Everything static about one generate call (hashable: part of the compile key)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ConfigError naming the bad setting and its allowed range."""
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 disables nucleus filtering), got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables top-k filtering), got {self.top_k}")
        if vocab_size is not None:
            bad = [i for i in (*self.eos_token_ids, self.pad_token_id) if not 0 <= i < vocab_size]
            if bad:
                raise ConfigError(f"token ids {bad} (eos/pad) are outside the vocabulary [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@struct.dataclass
class DecodeState:
    """The decode loop's carry. tokens/logprobs [B, N]; done/lengths/next_pos [B];
    step: int32 scalar, tokens sampled so far (token `step - 1` is fed next)."""

    cache: KVCache
    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array
    lengths: jax.Array
    next_pos: jax.Array
    step: jax.Array
    rng: jax.Array


# ---------------------------------------------------------------------------- sampling


def sample(logits, rng, s: SamplingSettings):
    """Sample from logits [B, V] (f32): -> (token [B] int32, logprob [B] f32).

    Order as in transformers: temperature, then top-k, then top-p (on the top-k-renormalized
    distribution). The log-prob is of the temperature-scaled, unfiltered distribution.
    """
    scaled = logits / (s.temperature if s.temperature > 0 else 1.0)
    if s.is_greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        filtered = scaled
        if s.top_k and s.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(scaled, s.top_k)[0][:, -1:]
            filtered = jnp.where(scaled < kth, -jnp.inf, filtered)
        if s.top_p < 1.0:
            desc = -jnp.sort(-filtered, axis=-1)  # [B, V], descending
            probs = jax.nn.softmax(desc, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p  # smallest prefix with mass >= top_p
            cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
            filtered = jnp.where(filtered < cutoff, -jnp.inf, filtered)
        token = jax.random.categorical(rng, filtered, axis=-1)
    token = token.astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logprob


def _is_stop(token, s: SamplingSettings):
    if not s.eos_token_ids:
        return jnp.zeros(token.shape, bool)
    return jnp.isin(token, jnp.asarray(s.eos_token_ids, jnp.int32))


# ---------------------------------------------------------------------------- the two phases


def prefill(params, config: ModelConfig, input_ids, attention_mask, rng, s: SamplingSettings) -> DecodeState:
    """Run the prompt [B, P] into a fresh cache of P + N slots and sample token 0."""
    b, p = input_ids.shape
    n = s.max_new_tokens
    valid = attention_mask.astype(bool)
    positions = positions_from_mask(attention_mask.astype(jnp.int32))
    cache = init_cache(config, b, p + n)
    h, cache = hidden_states_cached(params, config, input_ids, valid, positions, cache, prefill=True)
    last = p - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # last real token of each row
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = unembed(params, h_last, config).astype(jnp.float32)  # [B, V]
    token, logprob = sample(logits, jax.random.fold_in(rng, 0), s)
    tokens = jnp.full((b, n), s.pad_token_id, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logprob)
    return DecodeState(cache=cache, tokens=tokens, logprobs=logprobs, done=_is_stop(token, s),
                       lengths=jnp.ones((b,), jnp.int32), next_pos=valid.sum(-1).astype(jnp.int32),
                       step=jnp.ones((), jnp.int32), rng=rng)


def decode_logits(params, config: ModelConfig, token, position, cache: KVCache):
    """One decode step: feed token/position [B] at slot `cache.length` -> (logits [B, V] f32, cache)."""
    valid = jnp.ones((token.shape[0], 1), bool)
    h, cache = hidden_states_cached(params, config, token[:, None], valid, position[:, None], cache)
    return unembed(params, h[:, 0], config).astype(jnp.float32), cache


def decode(params, config: ModelConfig, state: DecodeState, stop_at, s: SamplingSettings) -> DecodeState:
    """Sample until every row stopped, `max_new_tokens` are out, or `step == stop_at` (int32
    scalar, traced: the host can run the loop in chunks without recompiling).

    params: as stored, or (a per-layer cache) `split_layers(params)`, which `generate` passes so
    that the layer weights are split once per call rather than once per `decode` call."""
    n = s.max_new_tokens
    limit = jnp.minimum(stop_at, n)

    def cond(st: DecodeState):
        return (st.step < limit) & ~jnp.all(st.done)

    def body(st: DecodeState):
        fed = jax.lax.dynamic_index_in_dim(st.tokens, st.step - 1, axis=1, keepdims=False)
        logits, cache = decode_logits(params, config, fed, st.next_pos, st.cache)
        token, logprob = sample(logits, jax.random.fold_in(st.rng, st.step), s)
        token = jnp.where(st.done, s.pad_token_id, token)
        logprob = jnp.where(st.done, 0.0, logprob)
        col = (jnp.zeros((), jnp.int32), st.step)
        return st.replace(
            cache=cache,
            tokens=jax.lax.dynamic_update_slice(st.tokens, token[:, None], col),
            logprobs=jax.lax.dynamic_update_slice(st.logprobs, logprob[:, None], col),
            done=st.done | _is_stop(token, s),
            lengths=st.lengths + (~st.done).astype(jnp.int32),
            next_pos=st.next_pos + 1,
            step=st.step + 1,
        )

    return jax.lax.while_loop(cond, body, state)


def _output(state: DecodeState) -> GenerationOutput:
    n = state.tokens.shape[1]
    mask = (jnp.arange(n)[None, :] < state.lengths[:, None]).astype(jnp.int32)
    return GenerationOutput(tokens=state.tokens, logprobs=state.logprobs, mask=mask, lengths=state.lengths)


# ---------------------------------------------------------------------------- compilation


def _state_shardings(config: ModelConfig, mesh: Mesh):
    batch = batch_sharding(mesh, 2).spec[0]
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and config.num_key_value_heads % t == 0 else None

    def ns(*spec):
        return NamedSharding(mesh, PartitionSpec(*spec))

    if decode_per_layer():
        k = v = (ns(batch, heads, None, None),) * config.num_hidden_layers
    else:
        k = v = ns(None, batch, None, heads, None)
    cache = KVCache(k=k, v=v, valid=ns(batch, None), positions=ns(batch, None), length=ns())
    return DecodeState(cache=cache, tokens=ns(batch, None), logprobs=ns(batch, None), done=ns(batch),
                       lengths=ns(batch), next_pos=ns(batch), step=ns(), rng=ns())


def _split_shardings(param_shardings, mesh: Mesh, n_layers: int):
    """Shardings of `split_layers(params)` from those of `params`: a layer's slice keeps the
    spec of the stacked leaf without its leading (layers) axis."""
    one = jax.tree.map(lambda sh: NamedSharding(mesh, PartitionSpec(*tuple(sh.spec)[1:])),
                       param_shardings["model"]["layers"])
    return {**param_shardings, "model": {**param_shardings["model"], "layers": (one,) * n_layers}}


def _unchanged(params):
    return params


@functools.lru_cache(maxsize=32)
def _compiled(config: ModelConfig, s: SamplingSettings, mesh: Mesh | None, param_shardings: _TreeKey | None):
    """(split_fn, prefill_fn, decode_fn, output_fn) jitted for these settings; shapes are traced
    per call. split_fn gives the params decode_fn takes: `split_layers` for a per-layer decode
    (sharing memory on one device, copied into their shards on a mesh), else themselves."""
    pre = functools.partial(prefill, config=config, s=s)
    dec = functools.partial(decode, config=config, s=s)
    per_layer = decode_per_layer()
    if mesh is None:
        return (split_layers_shared if per_layer else _unchanged,
                jax.jit(lambda p, i, m, r: pre(p, input_ids=i, attention_mask=m, rng=r)),
                jax.jit(lambda p, st, stop: dec(p, state=st, stop_at=stop), donate_argnums=1),
                jax.jit(_output))
    state = _state_shardings(config, mesh)
    data, rep = batch_sharding(mesh, 2), NamedSharding(mesh, PartitionSpec())
    out = GenerationOutput(tokens=data, logprobs=data, mask=data, lengths=batch_sharding(mesh, 1))
    params = param_shardings.tree
    dec_params = _split_shardings(params, mesh, config.num_hidden_layers) if per_layer else params
    return (jax.jit(split_layers, in_shardings=(params,), out_shardings=dec_params) if per_layer else _unchanged,
            jax.jit(lambda p, i, m, r: pre(p, input_ids=i, attention_mask=m, rng=r),
                    in_shardings=(params, data, data, rep), out_shardings=state),
            jax.jit(lambda p, st, stop: dec(p, state=st, stop_at=stop), donate_argnums=1,
                    in_shardings=(dec_params, state, rep), out_shardings=state),
            jax.jit(_output, in_shardings=(state,), out_shardings=out))


# ---------------------------------------------------------------------------- the entry point


def generate(model: Model | tuple[Any, ModelConfig], input_ids, attention_mask, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_token_ids: Sequence[int] | int | None = None, pad_token_id: int | None = None,
             mesh: Mesh | None = None, on_tokens: Callable[[np.ndarray], Any] | None = None,
             stream_chunk: int = 4) -> GenerationOutput:
    """Sample up to `max_new_tokens` tokens after each prompt row (see the module docstring).

    model: a `Model` or `(params, config)`. input_ids/attention_mask: [B, P] (mask 1 = real).
    rng: a PRNG key (or an int seed). eos_token_ids: stop tokens (default: the config's eos ids; `()` never
    stops early). pad_token_id: fills tokens after a stop (default: config pad, else first
    eos, else 0). mesh: shard the batch over (data, fsdp), params as they are (default: the
    Model's mesh). on_tokens: streaming callback, called with the tokens so far [B, t]
    (numpy) every `stream_chunk` steps; without it the whole loop runs on device in one call.
    """
    if isinstance(model, Model):
        params, config, mesh = model.params, model.config, mesh if mesh is not None else model.mesh
    else:
        params, config = model
    if eos_token_ids is None:
        eos_token_ids = config.eos_token_ids
    elif isinstance(eos_token_ids, (int, np.integer)):
        eos_token_ids = (eos_token_ids,)
    eos_token_ids = tuple(int(i) for i in eos_token_ids)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (
            eos_token_ids[0] if eos_token_ids else 0)
    s = SamplingSettings(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                         top_p=float(top_p), greedy=bool(greedy), eos_token_ids=eos_token_ids,
                         pad_token_id=int(pad_token_id))
    s.validate(config.vocab_size)
    if attention_mask is None:
        attention_mask = np.ones(np.shape(input_ids), np.int32)
    if np.ndim(input_ids) != 2 or np.shape(attention_mask) != np.shape(input_ids):
        raise ConfigError(f"input_ids must be [batch, prompt_len] with a mask of the same shape; got "
                          f"{np.shape(input_ids)} and {np.shape(attention_mask)}")
    if isinstance(input_ids, jax.Array) and not input_ids.is_fully_addressable:
        ids, mask = input_ids, attention_mask  # multi-host global batch: no host-side checks
        longest = ids.shape[1]
    else:
        mask = np.asarray(attention_mask, np.int32)
        ids = np.where(mask > 0, np.asarray(input_ids), 0).astype(np.int32)  # pad ids never reach the model
        real = mask.sum(-1)
        if (real == 0).any():
            raise ConfigError(f"prompt rows {np.flatnonzero(real == 0).tolist()} have no real tokens "
                              "(attention_mask all 0); every row needs at least one")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ConfigError(f"prompt token ids must be in [0, {config.vocab_size}); got "
                              f"{int(ids.min())}..{int(ids.max())}")
        longest = int(real.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        over = longest + max_new_tokens - config.max_position_embeddings
        raise ConfigError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} "
            f"exceeds the model's max_position_embeddings ({config.max_position_embeddings}) by {over}; "
            "lower max_new_tokens or truncate the prompt")
    shardings = None
    if mesh is not None:
        n = batch_size_multiple(mesh)
        if ids.shape[0] % n:
            raise ShardingError(f"batch size {ids.shape[0]} is not divisible by the mesh's data x fsdp size {n}; "
                                "pad the batch to a multiple of it")
        shardings = _TreeKey(jax.tree.map(lambda x: x.sharding, params))
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(rng)
    split, pre, dec, out = _compiled(config, s, mesh, shardings)
    state = pre(params, ids, mask, rng)
    params = split(params)
    if on_tokens is None:
        state = dec(params, state, np.int32(max_new_tokens))
    else:
        if stream_chunk < 1:
            raise ConfigError(f"stream_chunk must be >= 1, got {stream_chunk}")
        step = 1
        on_tokens(np.asarray(state.tokens[:, :1]))
        while True:
            target = min(step + stream_chunk, max_new_tokens)
            state = dec(params, state, np.int32(target))
            step = int(state.step)
            on_tokens(np.asarray(state.tokens[:, :step]))
            if step >= max_new_tokens or bool(np.asarray(state.done).all()):
                break
    return out(state)


# ---------------------------------------------------------------------------- CLI: jaxalign generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `jaxalign generate`."""
    parser.description = "Sample completions from a Hugging Face checkpoint (optionally with a LoRA adapter)."
    parser.add_argument("model", help="HF model directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", default=None,
                        help='prompts, one per line, or .jsonl with a "prompt" field per line')
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message with the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--dtype", default=None, help="params dtype (default: the checkpoint's)")
    parser.add_argument("--compute-dtype", default=None, help="activation dtype (default: --dtype)")
    parser.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,1,8 (default: one device)")


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise ConfigError(f"--prompts-file {args.prompts_file!r} does not exist")
        with open(args.prompts_file) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if args.prompts_file.endswith(".jsonl"):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{args.prompts_file}:{i} is not valid JSON ({e})") from e
                    if not isinstance(row, dict) or "prompt" not in row:
                        raise ConfigError(f'{args.prompts_file}:{i} has no "prompt" field')
                    prompts.append(str(row["prompt"]))
                else:
                    prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def stop_token_ids(config: ModelConfig, tokenizer, model_dir: str | None = None) -> tuple[int, ...]:
    """Stop tokens: the config's eos ids, those of `model_dir`'s generation_config.json (when
    given) and the tokenizer's, in that order, without duplicates or ids outside the vocabulary."""
    ids = list(config.eos_token_ids)
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= i < config.vocab_size))


def pad_token_id(config: ModelConfig, tokenizer, stop: Sequence[int] = ()) -> int:
    """The pad id: the tokenizer's when it is inside the vocabulary (some tokenizers add one
    beyond it), else the config's, else the first stop token, else 0."""
    pad = tokenizer.pad_token_id
    if pad is None or not 0 <= pad < config.vocab_size:
        pad = config.pad_token_id if config.pad_token_id is not None else (stop[0] if stop else 0)
    return int(pad)


def _encode(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    if not chat:
        return [tokenizer(p)["input_ids"] for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat: this tokenizer has no chat template; drop --chat to use raw prompts")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, *, length: int | None = None, batch: int | None = None,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`[batch, length]` int32 ids and mask (1 = real) with every row right-aligned (left
    padding). `length` defaults to the longest row rounded up to `multiple` (fewer
    recompiles); `batch` to `len(rows)`, missing rows repeat row 0 (fillers for a fixed shape)."""
    if length is None:
        length = -(-max(len(r) for r in rows) // multiple) * multiple
    batch = len(rows) if batch is None else batch
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, r in enumerate(list(rows) + [rows[0]] * (batch - len(rows))):
        if len(r):
            ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return ids, mask


def load_for_inference(model_dir: str, adapter: str | None = None, *, dtype=None, compute_dtype=None,
                       mesh: Mesh | None = None) -> tuple[Model, Any]:
    """(model, tokenizer) from an HF model directory (or a `.gguf` file: its converted directory),
    with the PEFT LoRA adapter in `adapter` applied (unmerged) when given: what `jaxalign
    generate` and `jaxalign eval` run."""
    import transformers

    import jaxalign as ja
    from jaxalign.models.gguf import resolve

    model_dir = resolve(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist; pass a local HF checkpoint directory "
                              "(config.json, *.safetensors, tokenizer files)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not load a tokenizer from {model_dir} ({e}); "
                              "the model directory needs tokenizer files (tokenizer.json or similar)") from e
    model = ja.load_model(model_dir, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
    if adapter:
        from jaxalign.peft import lora

        model = dataclasses.replace(model, params=lora.load_adapter(model.params, adapter))
    return model, tokenizer


def run(args: argparse.Namespace) -> list[str]:
    """`jaxalign generate`: print completions (streamed as they are produced for one prompt)."""
    import jaxalign as ja

    prompts = _read_prompts(args)
    mesh = None
    if args.mesh:
        try:
            sizes = tuple(int(x) for x in args.mesh.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 3:
            raise ConfigError(f"--mesh {args.mesh!r}: expected three integers data,fsdp,tensor (e.g. 1,1,8)")
        mesh = ja.make_mesh(sizes)
    model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype,
                                          compute_dtype=args.compute_dtype, mesh=mesh)
    stop = stop_token_ids(model.config, tokenizer, args.model)
    pad = pad_token_id(model.config, tokenizer, stop)
    rows = _encode(tokenizer, prompts, args.chat)
    batch = args.batch_size if len(prompts) > 1 else 1
    if mesh is not None:
        n = batch_size_multiple(mesh)
        batch = -(-batch // n) * n
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, greedy=args.greedy, eos_token_ids=stop, pad_token_id=pad)
    rng = jax.random.key(args.seed)
    completions = []

    def text_of(tokens, n):
        return tokenizer.decode(tokens[:n], skip_special_tokens=True)

    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        ids, mask = left_pad(chunk, pad, batch=batch, multiple=16)
        rng, key = jax.random.split(rng)
        if len(prompts) == 1:
            shown = [""]

            def stream(tokens):
                text = text_of(tokens[0], _length(tokens[0], stop))
                if text.startswith(shown[0]) and not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(shown[0]):])
                    sys.stdout.flush()
                    shown[0] = text

            out = generate(model, ids, mask, key, on_tokens=stream, **settings)
            text = text_of(np.asarray(out.tokens[0]), int(out.lengths[0]))
            sys.stdout.write(text[len(shown[0]):] + "\n")
            completions.append(text)
        else:
            out = generate(model, ids, mask, key, **settings)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            for i, prompt in enumerate(prompts[start:start + len(chunk)]):
                text = text_of(tokens[i], int(lengths[i]))
                completions.append(text)
                print(f"### prompt {start + i}\n{prompt}\n### completion {start + i}\n{text}\n", flush=True)
    return completions


def _length(tokens: np.ndarray, stop: tuple[int, ...]) -> int:
    """Tokens up to and including the first stop token."""
    hits = np.flatnonzero(np.isin(tokens, stop)) if stop else []
    return int(hits[0]) + 1 if len(hits) else len(tokens)


generate_cli = run

__all__ = ["DecodeState", "GenerationOutput", "SamplingSettings", "add_arguments", "decode", "decode_logits",
           "generate", "generate_cli", "left_pad", "load_for_inference", "pad_token_id", "prefill", "run", "sample",
           "stop_token_ids"]
