"""RL rollouts: prompts -> sampled responses -> per-token log-probs, values and scores.

The pieces the RL stages (`jaxalign.algos.rl_loop`: PPO, GRPO, RLOO) are made of:

* `load_prompts`: rows with a `prompt` (string or chat messages) -> token ids, left-truncated
  to `max_prompt_length` (BOS kept) or skipped, with counts; `prompt_batch`: some of them
  left-padded to a fixed length P, each repeated `group_size` times.
* `sample`: samples N tokens with the KV-cache sampler (`jaxalign.sampling.generate`) and
  returns the whole sequences `[B, P + N]`: prompt in columns `< P`, response in columns `>= P`.
* `response_logprobs` / `response_values`: full forward passes over those sequences that
  score response token `i` (column `P + i`) from position `P + i - 1`, at the rollout
  temperature: the same numbers the sampler reported (up to float noise) and the ones the
  PPO ratio compares against; `experience_forward`: policy, reference and value in one jit.
* `RewardModel`: a `*ForSequenceClassification` reward model read at the last real token,
  re-tokenizing the decoded text when its tokenizer differs from the policy's.
* `load_reward_fn`: a Python `"module:function"` reward `(prompts, completions) -> scores`;
  `RewardFunctions`: several of them with weights; `score`: either, with the missing-EOS
  and (DAPO) overlong penalties.

Conventions: pad and EOS are distinct; `response_mask[b, i] = 1` on generated tokens up to
and including the first stop token (what the sampler returns); everything after is pad.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos.logprobs import label_logprobs
from jaxalign.data.formats import DataStats, tokenize_prompts
from jaxalign.errors import ConfigError, DataError
from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import hidden_states
from jaxalign.models.model import positions_from_mask
from jaxalign.parallel.rules import batch_sharding
from jaxalign.sampling import generate, left_pad

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class Prompts:
    """Tokenized prompts: `ids[i]` int32 `[P_i]`, `texts[i]` what a reward function sees."""

    ids: list[np.ndarray]
    texts: list[str]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.ids)


def load_prompts(rows, tokenizer, *, max_prompt_length: int, truncation: str = "left", on_bad_row: str = "drop",
                 columns=None, system_prompt: str | None = None) -> Prompts:
    """Prompts of `rows` (`jaxalign.data.tokenize_prompts`: a `prompt` string or messages, or
    the shared head of `chosen`/`rejected`; `data.columns` / `data.system_prompt` applied).

    Longer than `max_prompt_length` tokens: `truncation="left"` keeps the last tokens (and
    BOS), counted in `stats.truncated`; `"skip"` drops the row (reason `too_long`). Rows
    without a usable prompt are dropped and counted (or raise, `on_bad_row="error"`).
    """
    examples, stats = tokenize_prompts(rows, tokenizer, max_prompt_length=max_prompt_length, truncation=truncation,
                                       on_bad_row=on_bad_row, columns=columns, system_prompt=system_prompt)
    if not examples:
        hint = (" no longer than ppo.max_prompt_length" if stats.drop_reasons.get("too_long") else "")
        raise DataError(f"no usable prompts: {stats.as_dict()}; rows need a 'prompt' field (string or messages){hint}"
                        " (map yours with data.columns)")
    return Prompts([e["prompt_ids"] for e in examples], [e["text"] for e in examples], stats)


def prompt_batch(prompts: Prompts, idx, group: int, s: RolloutSettings) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Prompt rows `idx`, each repeated `group` times (consecutive rows): ids and mask `[b, P]`
    left-padded to `s.prompt_length`, and the texts a reward function sees."""
    ids, mask = left_pad([prompts.ids[i] for i in idx], s.pad_token_id, length=s.prompt_length)
    texts = [prompts.texts[i] for i in idx for _ in range(group)]
    return np.repeat(ids, group, axis=0), np.repeat(mask, group, axis=0), texts


# ---------------------------------------------------------------------------- host <-> global


def to_global(x: np.ndarray, mesh) -> jax.Array:
    """This process's rows -> a global array split over the batch axes (one process: as is)."""
    if mesh is None or jax.process_count() == 1:
        return x
    return jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x))


def to_local(x: jax.Array) -> np.ndarray:
    """The rows of a global batch array that belong to this process, as numpy."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, x.sharding.mesh, x.sharding.spec))


def process_sum(x) -> np.ndarray:
    """Elementwise sum of a host array over all processes (one process: as is)."""
    x = np.asarray(x, np.float32)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(0)


# ---------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """Static shape and sampling settings of rollouts (`P` prompt columns, `N` response)."""

    prompt_length: int
    response_length: int
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def sample(params, config: ModelConfig, prompt_ids: np.ndarray, prompt_mask: np.ndarray, rng,
           s: RolloutSettings, mesh=None, greedy: bool = False) -> dict[str, np.ndarray]:
    """Sample responses for local prompt rows `[b, P]` (left-padded).

    Returns host arrays of this process's rows: `input_ids`, `attention_mask` `[b, P + N]`
    (prompt then response), `response_mask` `[b, N]`, `sampler_logprobs` `[b, N]`,
    `eos` `[b]` (1 if the response ended with a stop token).
    """
    out = generate((params, config), to_global(prompt_ids, mesh), to_global(prompt_mask, mesh), rng,
                   max_new_tokens=s.response_length, temperature=0.0 if greedy else s.temperature,
                   top_k=s.top_k, top_p=s.top_p, eos_token_ids=s.eos_token_ids, pad_token_id=s.pad_token_id,
                   mesh=mesh)
    tokens, mask, logprobs = to_local(out.tokens), to_local(out.mask), to_local(out.logprobs)
    stop = np.isin(tokens, np.asarray(s.eos_token_ids, np.int32)) & (mask > 0)
    return {
        "input_ids": np.concatenate([prompt_ids, tokens], axis=1).astype(np.int32),
        "attention_mask": np.concatenate([prompt_mask, mask], axis=1).astype(np.int32),
        "response_mask": mask.astype(np.int32),
        "sampler_logprobs": logprobs.astype(np.float32),
        "eos": stop.any(axis=1).astype(np.int32),
    }


# ---------------------------------------------------------------------------- forward passes


def response_logprobs(params, config: ModelConfig, input_ids, attention_mask, prompt_length: int, *,
                      temperature: float, chunk_size: int | None = None):
    """(logp, entropy) `[B, N]` of each response token under softmax(logits / temperature):
    entry `i` scores token `input_ids[:, P + i]` from position `P + i - 1` (`P = prompt_length`)."""
    mask = attention_mask.astype(jnp.int32)
    h = hidden_states(params, config, input_ids, positions_from_mask(mask), mask)
    n = input_ids.shape[1] - prompt_length
    h = jax.lax.dynamic_slice_in_dim(h, prompt_length - 1, n, axis=1)
    logp, entropy, _ = label_logprobs(params, config, h, input_ids[:, prompt_length:], chunk_size=chunk_size,
                                      temperature=temperature)
    return logp, entropy


def response_values(value_params, config: ModelConfig, input_ids, attention_mask, prompt_length: int):
    """Values `[B, N]`: entry `i` is V(state before response token `i`) = the value head at
    position `P + i - 1`, as in TRL's PPO."""
    from jaxalign.models.heads import token_values

    v = token_values(value_params, config, input_ids, attention_mask)
    return v[:, prompt_length - 1: input_ids.shape[1] - 1].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "value_config", "prompt_length", "temperature", "chunk_size"))
def experience_forward(policy, reference, value, input_ids, attention_mask, *, config: ModelConfig,
                       value_config: ModelConfig | None, prompt_length: int, temperature: float,
                       chunk_size: int | None = None, sampler_logprobs=None):
    """(logp, entropy, ref_logp, values) `[B, N]` of a sampled batch, one jit: the policy's
    log-probs (the PPO "old" ones) and entropy, the reference's log-probs (= logp without a
    reference) and the value model's values (0 without one). With `policy=None` there is no
    policy forward: logp is `sampler_logprobs` and entropy None."""
    if policy is None:
        logp, entropy = sampler_logprobs, None
    else:
        logp, entropy = response_logprobs(policy, config, input_ids, attention_mask, prompt_length,
                                          temperature=temperature, chunk_size=chunk_size)
    ref_logp = logp if reference is None else response_logprobs(
        reference, config, input_ids, attention_mask, prompt_length, temperature=temperature,
        chunk_size=chunk_size)[0]
    values = (jnp.zeros_like(logp) if value is None
              else response_values(value, value_config, input_ids, attention_mask, prompt_length))
    return logp, entropy, ref_logp, values


# ---------------------------------------------------------------------------- rewards


def load_reward_fn(spec: str, what: str = "ppo.reward_fn") -> Callable[[list[str], list[str]], Sequence[float]]:
    """`"package.module:function"` -> the function (called with prompts, completions).
    `what` names the setting in errors (e.g. `--checker`)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{what}={spec!r} must look like 'package.module:function'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what}={spec!r}: cannot import {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{what}={spec!r}: {module_name} has no function {attr!r}")
    return fn


def call_reward_fn(fn, prompts: list[str], completions: list[str]) -> np.ndarray:
    """Scores `[B]` float32 from a Python reward function, checked for length and finiteness."""
    scores = np.asarray(fn(list(prompts), list(completions)), np.float32).reshape(-1)
    if scores.shape[0] != len(prompts):
        raise DataError(f"the reward function returned {scores.shape[0]} scores for {len(prompts)} completions")
    if not np.all(np.isfinite(scores)):
        raise DataError(f"the reward function returned non-finite scores: {scores[~np.isfinite(scores)][:4]}")
    return scores


class RewardFunctions:
    """Python reward functions (`"module:function"`, named by the function) and their
    weights: `__call__(prompts, completions) -> (weighted sum [B], {name: scores [B]})`."""

    def __init__(self, specs: str | Sequence[str], weights: Sequence[float] | None = None,
                 what: str = "ppo.reward_fn"):
        specs = [specs] if isinstance(specs, str) else list(specs)
        weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(specs):
            raise ConfigError(f"ppo.reward_weights has {len(weights)} weights for {len(specs)} reward functions "
                              f"in {what}; give one weight per function")
        self.fns = {}
        for spec in specs:
            fn = load_reward_fn(spec, what)
            name = spec.split(":")[1]
            if name in self.fns:
                raise ConfigError(f"{what} names two functions {name!r}; each is logged as rollout/rewards/<name>")
            self.fns[name] = fn
        self.weights = np.asarray(weights, np.float32)

    def __call__(self, prompts: list[str], completions: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parts = {name: call_reward_fn(fn, prompts, completions) for name, fn in self.fns.items()}
        return np.stack(list(parts.values()), axis=1) @ self.weights, parts


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token (and bos/eos/pad) to the same id."""
    return a.get_vocab() == b.get_vocab() and all(
        getattr(a, k) == getattr(b, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id"))


class RewardModel:
    """A reward model (`params` with a `score` head, `config`) scoring policy sequences.

    Same vocabulary as the policy: the sequences are scored as they are, at the last real
    token (the EOS when the response has one). Different tokenizer: prompt and response
    are decoded with the policy tokenizer (special tokens dropped), re-encoded with the
    reward model's (BOS per its settings, EOS appended when the response ended), right-
    padded to a multiple of 32 tokens (few recompiles), and scored the same way.
    """

    def __init__(self, params, config: ModelConfig, mesh=None, tokenizer=None, policy_tokenizer=None):
        self.params, self.config, self.mesh = params, config, mesh
        self.tokenizer, self.policy_tokenizer = tokenizer, policy_tokenizer
        self.retokenize = tokenizer is not None and policy_tokenizer is not None and not same_vocabulary(
            tokenizer, policy_tokenizer)
        if self.retokenize and tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ConfigError("the reward model's tokenizer has neither a pad nor an EOS token to pad with")
        from jaxalign.models.heads import sequence_scores

        self._scores = jax.jit(sequence_scores, static_argnums=1)

    @classmethod
    def load(cls, path: str, policy, policy_tokenizer, **load_kwargs) -> "RewardModel":
        """The reward model in HF directory `path` (`heads.load_reward_model(path, **load_kwargs)`,
        on the policy's mesh) scoring `policy`'s sequences. Without tokenizer files next to it,
        the policy's tokenizer is assumed (an error when its vocabulary is smaller)."""
        from transformers import AutoTokenizer

        from jaxalign.models import heads
        from jaxalign.models.gguf import resolve

        path = resolve(path)  # a .gguf file: its converted directory (with the tokenizer)
        rm = heads.load_reward_model(path, mesh=policy.mesh, **load_kwargs)
        rm_tokenizer = None
        try:
            rm_tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            if rm.config.vocab_size < policy.config.vocab_size:
                raise ConfigError(f"the reward model {path} has no tokenizer and a smaller vocabulary "
                                  f"({rm.config.vocab_size}) than the policy ({policy.config.vocab_size}); save its "
                                  "tokenizer next to it") from None
            log.warning("reward model %s has no tokenizer files: assuming the policy's tokenizer", path)
        scorer = cls(rm.params, rm.config, policy.mesh, rm_tokenizer, policy_tokenizer)
        if scorer.retokenize:
            log.warning("the reward model's tokenizer differs from the policy's: responses are decoded and "
                        "re-tokenized for scoring")
        return scorer

    def __call__(self, batch: dict[str, np.ndarray], prompt_length: int) -> np.ndarray:
        """Scores `[b]` (float32, host) of the local rows of a `sample` batch."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.retokenize:
            ids, mask = self._retokenize(batch, prompt_length)
        return to_local(self._scores(self.params, self.config, to_global(ids, self.mesh),
                                     to_global(mask, self.mesh))).astype(np.float32)

    def _retokenize(self, batch, prompt_length: int):
        pt, rt = self.policy_tokenizer, self.tokenizer
        rows = []
        for ids, mask, eos in zip(batch["input_ids"], batch["attention_mask"], batch["eos"]):
            real = ids[mask > 0]
            n_prompt = int(mask[:prompt_length].sum())
            text = pt.decode(real[:n_prompt], skip_special_tokens=True) + pt.decode(real[n_prompt:],
                                                                                  skip_special_tokens=True)
            tok = list(rt.encode(text, add_special_tokens=True))
            if eos and rt.eos_token_id is not None and (not tok or tok[-1] != rt.eos_token_id):
                tok.append(rt.eos_token_id)
            rows.append(tok[-self.config.max_position_embeddings:])
        length = -(-max(len(r) for r in rows) // 32) * 32
        pad = rt.pad_token_id if rt.pad_token_id is not None else rt.eos_token_id
        out = np.full((len(rows), length), pad, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            out[i, :len(r)], mask[i, :len(r)] = r, 1
        return out, mask


def decode_responses(tokenizer, batch: dict[str, np.ndarray], prompt_length: int) -> list[str]:
    """Response texts (special tokens such as EOS dropped) of the local rows of a `sample` batch."""
    resp = batch["input_ids"][:, prompt_length:]
    return [tokenizer.decode(r[m > 0], skip_special_tokens=True) for r, m in zip(resp, batch["response_mask"])]


def overlong_penalty(lengths, max_length: int, cache: int) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13; TRL's
    `get_soft_overlong_punishment`) of response lengths `[b]`: 0 up to `max_length - cache`
    tokens, `(max_length - cache - length) / cache` up to `max_length`, -1 beyond (float32 `[b]`)."""
    return np.clip((max_length - cache - np.asarray(lengths, np.float32)) / max(cache, 1), -1.0, 0.0)


def score(batch: dict[str, np.ndarray], texts: list[str], reward: RewardModel | RewardFunctions, tokenizer,
          prompt_length: int, missing_eos_penalty: float = 0.0, overlong_cache: int = 0,
          overlong_factor: float = 1.0):
    """(raw `[b]`, scores `[b]`, {reward function name: its scores `[b]`}) of the local rows of
    a `sample` batch: the reward model at the last real token, or the reward functions on
    (`texts`, the decoded completions); `scores` = raw minus `missing_eos_penalty` where a
    response ended without a stop token, plus (`overlong_cache > 0`) `overlong_factor` x
    `overlong_penalty` of the response lengths (`response_mask` sums, the stop token
    included) against `N`, reported as part `overlong_penalty`."""
    if isinstance(reward, RewardModel):
        raw, parts = reward(batch, prompt_length), {}
    else:
        raw, parts = reward(texts, decode_responses(tokenizer, batch, prompt_length))
    scores = raw - (missing_eos_penalty or 0.0) * (1 - batch["eos"])
    if overlong_cache:
        mask = batch["response_mask"]
        parts["overlong_penalty"] = overlong_factor * overlong_penalty(mask.sum(1), mask.shape[1], overlong_cache)
        scores = scores + parts["overlong_penalty"]
    return raw, scores, parts


def tree_bytes(tree) -> int:
    """Bytes of the distinct device buffers in `tree` (arrays shared by several leaves count once)."""
    seen, total = set(), 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                key = shard.data.unsafe_buffer_pointer()
                if key not in seen:
                    seen.add(key)
                    total += shard.data.nbytes
    return total

