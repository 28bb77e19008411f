"""RLAIF: an AI judge labels pairs of responses, giving preference data for the reward model or DPO.

For each prompt x with candidates a and b, a principle c is drawn from the constitution
(or fixed) and the judge (any causal LM jaxalign loads) is shown the templated prompt
twice, once with a as "Response A" (order AB) and once with b as "Response A" (order BA).
From one forward pass per batch it reads the log-probabilities of the choice labels at
the position after the prompt:

    s_A = log sum_v p(v | judge prompt)   over the variants v of label "A"  (likewise s_B)
    P_AB = softmax(s_A, s_B)[A]           P(a better) in order AB
    P_BA = softmax(s_A, s_B)[B]           P(a better) in order BA (a was shown as B)
    P(a better) = (P_AB + P_BA) / 2       averaging both orders cancels the judge's position bias

The output row is TRL's explicit-prompt preference format: `prompt`, `chosen` (a if
P(a better) >= 0.5 else b), `rejected`, plus `preference` = P(chosen better) in [0.5, 1],
`margin` = log(preference / (1 - preference)) (the logit; the reward trainer's optional
Bradley-Terry margin), `position_consistent` (both orders pick the same response),
`principle` (its name) and `p_ab` / `p_ba` (P(a better) per order, a = response_a).

Choice labels and their tokens: the label sequence is what the tokenizer produces for the
label text right after the rendered judge prompt. A label's variants are the label and,
when the tokenizer has it as a single token, its leading-space form (" A", as BPE and
SentencePiece vocabularies do). If every variant is one token, the label is scored from
the last position of one forward pass over the left-padded prompts (`scoring="token"`).
If a label splits into several tokens, the full label token sequence's log-probability
is scored instead (`scoring="sequence"`: one forward over prompt + label per variant);
`scoring="token"` with such a label is an error naming the label and its tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algos.constitutional import (
    Constitution,
    check_template,
    encode_text,
    generate_texts,
    load_constitution,
    render_messages,
    use_chat,
    write_rows,
)
from jaxalign.errors import ConfigError, DataError
from jaxalign.models.llama import hidden_states, unembed
from jaxalign.models.model import Model, _TreeKey, positions_from_mask
from jaxalign.parallel.rules import batch_size_multiple
from jaxalign.sampling import left_pad, pad_token_id, stop_token_ids

log = logging.getLogger(__name__)

JUDGE_TEMPLATE = (
    "Consider the following prompt and two candidate responses.\n\n"
    "Prompt: {prompt}\n\n"
    "Response A: {response_a}\n\n"
    "Response B: {response_b}\n\n"
    "Principle: {principle}\n\n"
    "Which response is better according to the principle? Answer A or B.\nAnswer:"
)


@dataclasses.dataclass
class JudgeSettings:
    """How the judge is prompted and scored.

    template: fields {prompt}, {response_a}, {response_b}, {principle} (default
    :data:`JUDGE_TEMPLATE`, or the constitution's `templates.judge`). chat: wrap the filled
    template as a user message with the judge's chat template (True / False / "auto": when
    it has one). choices: the two label texts. leading_space: also count " A" / " B" when
    they are single tokens. scoring: "auto" | "token" | "sequence" (module docstring).
    principle: a principle name for every row (default: drawn per row, seeded by `seed`).
    """

    template: str | None = None
    chat: bool | str = "auto"
    choices: tuple[str, str] = ("A", "B")
    leading_space: bool = True
    scoring: str = "auto"
    batch_size: int = 8
    principle: str | None = None
    seed: int = 0


# ---------------------------------------------------------------------------- forward passes


def _last_logprobs(params, ids, mask, candidates, *, config):
    """log_softmax of the logits at the last position, at `candidates` [C]: -> [B, C]."""
    h = hidden_states(params, config, ids, positions_from_mask(mask), mask)
    logits = unembed(params, h[:, -1], config).astype(jnp.float32)
    return jnp.take(jax.nn.log_softmax(logits, axis=-1), candidates, axis=-1)


def _suffix_logprob(params, ids, mask, *, config, k: int):
    """log p(last k tokens | the tokens before them), summed: -> [B] (left-padded rows)."""
    h = hidden_states(params, config, ids, positions_from_mask(mask), mask)
    logits = unembed(params, h[:, -k - 1:-1], config).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, ids[:, -k:, None], axis=-1)[..., 0].sum(-1)


@functools.lru_cache(maxsize=64)
def _compiled(kind: str, config, k: int, mesh, shardings: _TreeKey | None):
    fn = (functools.partial(_last_logprobs, config=config) if kind == "last"
          else functools.partial(_suffix_logprob, config=config, k=k))
    if mesh is None:
        return jax.jit(fn)
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxalign.parallel.rules import batch_sharding

    data, rep = batch_sharding(mesh, 2), NamedSharding(mesh, PartitionSpec())
    if kind == "last":
        return jax.jit(fn, in_shardings=(shardings.tree, data, data, rep), out_shardings=data)
    return jax.jit(fn, in_shardings=(shardings.tree, data, data), out_shardings=batch_sharding(mesh, 1))


# ---------------------------------------------------------------------------- the judge


@dataclasses.dataclass(frozen=True)
class LabelTokens:
    """Token sequences of each choice's variants: `variants[c]` = list of (text, ids)."""

    variants: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]
    scoring: str  # "token" or "sequence"

    def describe(self) -> str:
        return "; ".join(", ".join(f"{t!r} -> {list(ids)}" for t, ids in v) for v in self.variants)


class Judge:
    """A causal LM used as a preference labeler. `model` (a `Model`, possibly sharded over its
    mesh) and its `tokenizer`; see :class:`JudgeSettings` and the module docstring."""

    def __init__(self, model: Model, tokenizer, settings: JudgeSettings | None = None,
                 constitution: Constitution | str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = s = settings or JudgeSettings()
        self.constitution = load_constitution(constitution)
        self.template = check_template(s.template or self.constitution.template("judge", JUDGE_TEMPLATE), "judge")
        if s.scoring not in ("auto", "token", "sequence"):
            raise ConfigError(f"scoring={s.scoring!r} is not valid; choose auto, token or sequence")
        if len(s.choices) != 2 or len(set(s.choices)) != 2 or not all(isinstance(c, str) and c for c in s.choices):
            raise ConfigError(f"choices must be two different non-empty strings, got {s.choices!r}")
        self.chat = use_chat(tokenizer, s.chat)
        self.pad = pad_token_id(model.config, tokenizer, stop_token_ids(model.config, tokenizer))
        probe = self.render("x", "y", "z", "w")
        self.labels = self._label_tokens(probe)
        log.info("judge labels (%s scoring): %s", self.labels.scoring, self.labels.describe())

    # -- prompts

    def render(self, prompt: str, first: str, second: str, principle: str) -> str:
        """The judge's input text with `first` shown as response A and `second` as B."""
        text = self.template.format(prompt=prompt, response_a=first, response_b=second, principle=principle)
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text, self.chat)

    def _label_tokens(self, probe: str) -> LabelTokens:
        """Each label's token ids as they follow the judge prompt (prefix-tokenize), + variants."""
        base = self.encode(probe)

        def after_prompt(label: str) -> tuple[int, ...]:
            full = self.encode(probe + label)
            if full[:len(base)] == base and len(full) > len(base):
                return tuple(full[len(base):])
            # A merge across the boundary: fall back to the label on its own.
            return tuple(self.tokenizer.encode(label, add_special_tokens=False))

        variants = []
        for label in self.settings.choices:
            ids = after_prompt(label)
            if not ids:
                raise ConfigError(f"the choice label {label!r} encodes to no tokens with the judge's tokenizer")
            vs = [(label, ids)]
            if self.settings.leading_space and not label.startswith(" "):
                sp = after_prompt(" " + label)
                if len(sp) == 1 and sp != ids:
                    vs.append((" " + label, sp))
            variants.append(tuple(vs))
        multi = [(t, ids) for v in variants for t, ids in v if len(ids) > 1]
        scoring = self.settings.scoring
        if scoring == "auto":
            scoring = "sequence" if multi else "token"
        if scoring == "token" and multi:
            t, ids = multi[0]
            raise ConfigError(
                f"the judge's tokenizer splits the choice label {t!r} into {len(ids)} tokens {list(ids)} "
                f"({[self.tokenizer.decode([i]) for i in ids]}); single-token scoring cannot read it from one "
                "position. Use scoring='sequence' (or 'auto') to score the whole label sequence, or choose "
                "single-token labels")
        (a_vars, b_vars) = variants
        for ta, ia in a_vars:
            for tb, ib in b_vars:
                n = min(len(ia), len(ib))
                if ia[:n] == ib[:n]:
                    raise ConfigError(f"the choice labels {ta!r} {list(ia)} and {tb!r} {list(ib)} are not "
                                      "distinguishable: one's tokens are a prefix of the other's")
        return LabelTokens(tuple(variants), scoring)

    # -- scoring

    def _batches(self, rows: list[list[int]]):
        m = batch_size_multiple(self.model.mesh)
        batch = -(-max(1, min(self.settings.batch_size, len(rows))) // m) * m
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            ids, mask = left_pad(chunk, self.pad, batch=batch, multiple=32)
            yield len(chunk), ids, mask

    def _fn(self, kind: str, k: int = 0):
        mesh = self.model.mesh
        shardings = None if mesh is None else _TreeKey(jax.tree.map(lambda x: x.sharding, self.model.params))
        return _compiled(kind, self.model.config, k, mesh, shardings)

    def choice_logprobs(self, texts: Sequence[str]) -> np.ndarray:
        """[N, 2]: log P(choice label | text) for each rendered judge prompt (label variants summed)."""
        rows = [self.encode(t) for t in texts]
        longest = max(len(v[1]) for vs in self.labels.variants for v in vs)
        limit = self.model.config.max_position_embeddings
        for i, r in enumerate(rows):
            if len(r) + (longest if self.labels.scoring == "sequence" else 0) > limit:
                raise DataError(f"judge prompt {i} has {len(r)} tokens, more than the judge's context of {limit}; "
                                "shorten the prompt/responses or use a judge with a longer context")
        out = np.zeros((len(rows), 2), np.float64)
        if self.labels.scoring == "token":
            ids_per_choice = [[v[1][0] for v in vs] for vs in self.labels.variants]
            flat = np.asarray([i for ids in ids_per_choice for i in ids], np.int32)
            fn = self._fn("last")
            got, pos = [], 0
            for n, ids, mask in self._batches(rows):
                got.append(np.asarray(fn(self.model.params, ids, mask, flat))[:n])
            lp = np.concatenate(got).astype(np.float64)  # [N, C]
            for c, ids in enumerate(ids_per_choice):
                out[:, c] = _logsumexp(lp[:, pos:pos + len(ids)])
                pos += len(ids)
            return out
        for c, vs in enumerate(self.labels.variants):
            per_variant = []
            for _, label_ids in vs:
                fn = self._fn("suffix", len(label_ids))
                got = []
                for n, ids, mask in self._batches([r + list(label_ids) for r in rows]):
                    got.append(np.asarray(fn(self.model.params, ids, mask))[:n])
                per_variant.append(np.concatenate(got).astype(np.float64))
            out[:, c] = _logsumexp(np.stack(per_variant, axis=1))
        return out

    def prob_first(self, prompts, first, second, principles: Sequence[str]) -> np.ndarray:
        """[N]: P(label A) normalized over the two labels, with `first` shown as response A."""
        texts = [self.render(p, a, b, c) for p, a, b, c in zip(prompts, first, second, principles)]
        lp = self.choice_logprobs(texts)
        return _softmax_first(lp)

    def compare(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
                principles: Sequence[str]) -> dict[str, np.ndarray]:
        """Both orders: `p_ab` = P(a better | a shown as A), `p_ba` = P(a better | a shown as B),
        `p` = their mean (position bias cancelled), `consistent` = both orders agree."""
        p_ab = self.prob_first(prompts, responses_a, responses_b, principles)
        p_ba = 1.0 - self.prob_first(prompts, responses_b, responses_a, principles)
        return {"p_ab": p_ab, "p_ba": p_ba, "p": (p_ab + p_ba) / 2, "consistent": (p_ab > 0.5) == (p_ba > 0.5)}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=1, keepdims=True)))[:, 0]


def _softmax_first(lp: np.ndarray) -> np.ndarray:
    """softmax over the 2 columns, first column: 1 / (1 + exp(lp_B - lp_A)), overflow-safe."""
    d = lp[:, 1] - lp[:, 0]
    return np.where(d > 0, np.exp(-np.clip(d, 0, None)) / (1 + np.exp(-np.clip(d, 0, None))),
                    1 / (1 + np.exp(np.clip(d, None, 0))))


# ---------------------------------------------------------------------------- candidates


def read_candidates(source, split: str = "train", max_rows: int | None = None, need_responses: bool = True):
    """`(prompts, responses_a, responses_b)` from a dataset; the responses are None when the rows
    have only prompts and `need_responses` is False (they are then sampled from a policy).
    A prompt is a string or a conversation (a list of ``{"role", "content"}`` messages, as
    chat datasets ship it); it is kept as it is (see :func:`prompt_text`)."""
    from jaxalign.config import builtin_path
    from jaxalign.data.sources import column_names, load_rows

    rows = load_rows(builtin_path(source) if isinstance(source, str) else source, split=split)
    name = source if isinstance(source, str) else "rows"
    cols = column_names(rows)
    if "prompt" not in cols:
        raise DataError(f"{name}: needs a 'prompt' column (plus 'response_a' and 'response_b', or a policy model to "
                        f"sample them); found columns {sorted(cols)}")
    have = [c for c in ("response_a", "response_b") if c in cols]
    rows = [row for i, row in enumerate(rows) if max_rows is None or i < max_rows]
    prompts = [_prompt(row, i, name) for i, row in enumerate(rows)]
    if not prompts:
        raise DataError(f"{name}: no rows")
    if not have and not need_responses:
        return prompts, None, None
    if len(have) < 2:
        missing = [c for c in ("response_a", "response_b") if c not in cols]
        raise DataError(f"{name}: column(s) {missing} missing; every prompt needs two candidate responses "
                        f"(response_a, response_b), or pass a policy model to sample them; found columns {sorted(cols)}")
    a = [_text(row, "response_a", i, name) for i, row in enumerate(rows)]
    b = [_text(row, "response_b", i, name) for i, row in enumerate(rows)]
    return prompts, a, b


def _prompt(row: Mapping, i: int, name: str):
    value = row.get("prompt")
    if isinstance(value, str) and value.strip():
        return value
    if (isinstance(value, list) and value and all(isinstance(m, Mapping) and isinstance(m.get("content"), str)
                                                  and m.get("role") for m in value) and value[-1]["role"] == "user"):
        return [dict(m) for m in value]
    shown = "an empty string" if isinstance(value, str) else repr(value)[:80]
    raise DataError(f"{name}: row {i}: 'prompt' is {shown}; expected a string or a conversation (a list of "
                    "{'role', 'content'} messages ending with a user turn)")


def _text(row: Mapping, key: str, i: int, name: str) -> str:
    value = row.get(key)
    if isinstance(value, str):
        return value
    raise DataError(f"{name}: row {i} has no {key!r} (the candidate response is {value!r}); every row needs a "
                    "prompt and two candidate responses (strings: response_a, response_b)")


def prompt_text(prompt) -> str:
    """What a judge or checker is shown of a prompt: the string itself, or a conversation's last
    user message."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def sample_candidates(policy: Model, tokenizer, prompts: Sequence, *, num_samples: int = 2,
                      max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      seed: int = 0, batch_size: int = 8, chat: bool | str = False) -> list[list[str]]:
    """`num_samples` completions per prompt from `policy` (temperature > 0, so they can differ).
    A conversation prompt is rendered with the policy's chat template; a string prompt too when
    `chat` is set."""
    if not temperature > 0:
        raise ConfigError(f"sampling candidates needs temperature > 0, got {temperature}")
    if num_samples < 2:
        raise ConfigError(f"num_samples={num_samples}: a preference pair needs at least 2 candidates per prompt")
    chat = use_chat(tokenizer, True if any(not isinstance(p, str) for p in prompts) else chat)
    if chat:
        texts = [render_messages(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
                 for p in prompts]
    else:
        texts = list(prompts)
    ids = [encode_text(tokenizer, t, chat) for t in texts]
    repeated = [r for r in ids for _ in range(num_samples)]
    out = generate_texts(policy, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size, what="prompt (policy)")
    return [out.texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


# ---------------------------------------------------------------------------- labeling


def _pair_row(prompt, chosen: str, rejected: str, **extra) -> dict:
    """A preference row in TRL's layout: strings for a string prompt; for a conversation, the
    prompt messages and chosen/rejected as assistant turns (TRL's conversational format)."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def label_pairs(judge: Judge, prompts: Sequence, responses_a: Sequence[str], responses_b: Sequence[str]
                ) -> list[dict]:
    """Preference rows (see the module docstring) for each (prompt, a, b)."""
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise DataError(f"{len(prompts)} prompts but {len(responses_a)} / {len(responses_b)} candidate responses")
    s = judge.settings
    principles = judge.constitution.draw(len(prompts), seed=s.seed, name=s.principle)
    r = judge.compare([prompt_text(p) for p in prompts], responses_a, responses_b,
                      [p.judge_text for p in principles])
    rows = []
    for i, prompt in enumerate(prompts):
        p = float(r["p"][i])
        a_wins = p >= 0.5
        pref = min(max(p if a_wins else 1.0 - p, 0.5), 1.0 - 1e-6)
        rows.append(_pair_row(
            prompt, responses_a[i] if a_wins else responses_b[i], responses_b[i] if a_wins else responses_a[i],
            preference=pref, margin=math.log(pref) - math.log1p(-pref),
            position_consistent=bool(r["consistent"][i]), principle=principles[i].name,
            p_ab=float(r["p_ab"][i]), p_ba=float(r["p_ba"][i])))
    return rows


def score_candidates(score_fn: Callable, prompts: Sequence, candidates: Sequence[Sequence[str]]) -> np.ndarray:
    """`[len(prompts), k]` scores of each prompt's candidates by a `(prompts, completions) ->
    scores` function (a task checker or any `module:function` reward)."""
    k = len(candidates[0]) if candidates else 0
    if any(len(c) != k for c in candidates):
        raise DataError("every prompt needs the same number of candidates")
    flat_prompts = [prompt_text(p) for p in prompts for _ in range(k)]
    flat = [c for cands in candidates for c in cands]
    scores = np.asarray(score_fn(flat_prompts, flat), dtype=np.float64)
    if scores.shape != (len(flat),) or not np.all(np.isfinite(scores)):
        raise DataError(f"the scoring function returned {scores.shape} scores for {len(flat)} completions "
                        "(or non-finite ones); it must return one finite float per completion")
    return scores.reshape(len(prompts), k)


def label_by_score(prompts: Sequence, candidates: Sequence[Sequence[str]], scores: np.ndarray
                   ) -> tuple[list[dict], int]:
    """Best-vs-worst preference rows: chosen = a highest-scored candidate, rejected = a lowest
    (the first in sampling order among equals). A prompt whose candidates all score the same
    says nothing about which is better and gives no row. Returns (rows, prompts dropped as ties)."""
    rows, ties = [], 0
    for prompt, cands, s in zip(prompts, candidates, scores):
        hi, lo = int(np.argmax(s)), int(np.argmin(s))
        if s[hi] == s[lo]:
            ties += 1
            continue
        rows.append(_pair_row(prompt, cands[hi], cands[lo], score_chosen=float(s[hi]), score_rejected=float(s[lo])))
    return rows, ties


def judge_agreement(rows: Sequence[Mapping], scores_a: np.ndarray, scores_b: np.ndarray,
                    responses_a: Sequence[str]) -> dict:
    """How often an AI judge's choice agrees with a reference scorer (e.g. the task checker),
    over the pairs the scorer does not tie. Marks each row with ``reference_agrees`` (None on a
    tie) and returns ``{"agreement", "compared", "reference_ties"}``."""
    agree = []
    for row, sa, sb, a in zip(rows, scores_a, scores_b, responses_a):
        if sa == sb:
            row["reference_agrees"] = None
            continue
        chosen = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][0]["content"]
        row["reference_agrees"] = (chosen == a) == bool(sa > sb)
        agree.append(row["reference_agrees"])
    return {"agreement": float(np.mean(agree)) if agree else float("nan"), "compared": len(agree),
            "reference_ties": len(rows) - len(agree)}


def label(judge_dir: str | None, data, out: str, *, judge_fn: str | Callable | None = None,
          policy_dir: str | None = None, num_samples: int = 2, agreement_fn: str | Callable | None = None,
          constitution=None, settings: JudgeSettings | None = None, split: str = "train",
          max_rows: int | None = None, dtype=None, mesh=None, sample: dict | None = None) -> dict:
    """`jaxalign label` as a function: read candidates (or sample `num_samples` per prompt from
    `policy_dir`), label them and write the preference dataset to `out` atomically.

    The judge is either a model (`judge_dir`, its tokenizer from the same dir: the log-prob
    judge of the module docstring, on pairs) or a scoring function (`judge_fn`, e.g. a task
    checker as ``"module:function"``: best vs worst of each prompt's candidates, ties
    dropped). With a model judge, `agreement_fn` scores both candidates too and the summary
    reports how often the judge agrees with it. `sample`: keyword arguments of
    :func:`sample_candidates`. Returns a summary (rows, agreement/tie counts, the output path)."""
    from jaxalign.algos.rollout import load_reward_fn
    from jaxalign.data import load_tokenizer
    from jaxalign.models import load_model

    if (judge_dir is None) == (judge_fn is None):
        raise ConfigError("give exactly one judge: a judge model directory (--judge) or a scoring function "
                          "(--judge-fn module:function)")
    if judge_dir is not None and num_samples != 2:
        raise ConfigError(f"--num-samples {num_samples}: a model judge compares pairs (2 candidates per prompt); "
                          "use a scoring judge (--judge-fn) for best-vs-worst of more samples")
    if judge_fn is not None and agreement_fn is not None:
        raise ConfigError("--agreement-fn compares a model judge with a scorer; with --judge-fn the labels "
                          "already come from that scorer")
    score = load_reward_fn(judge_fn, "--judge-fn") if isinstance(judge_fn, str) else judge_fn
    reference = load_reward_fn(agreement_fn, "--agreement-fn") if isinstance(agreement_fn, str) else agreement_fn
    settings = settings or JudgeSettings()
    c = load_constitution(constitution)
    if settings.principle is not None:
        c.principle(settings.principle)  # fail before loading anything
    prompts, a, b = read_candidates(data, split, max_rows, need_responses=policy_dir is None)
    if a is None:
        policy_tok = load_tokenizer(policy_dir)
        policy = load_model(policy_dir, dtype=dtype, mesh=mesh)
        log.info("sampling %d candidates for each of %d prompts from %s", num_samples, len(prompts), policy_dir)
        candidates = sample_candidates(policy, policy_tok, prompts,
                                       **{"seed": settings.seed, "num_samples": num_samples, **(sample or {})})
        del policy
    else:
        if policy_dir is not None:
            log.warning("%s already has response_a/response_b: the policy %s is not used", data, policy_dir)
        candidates = [list(pair) for pair in zip(a, b)]
    summary: dict = {"prompts": len(prompts), "candidates_per_prompt": len(candidates[0])}
    if score is not None:
        rows, ties = label_by_score(prompts, candidates, score_candidates(score, prompts, candidates))
        summary.update(judge="function", ties_dropped=ties)
    else:
        a, b = [x[0] for x in candidates], [x[1] for x in candidates]
        judge = Judge(load_model(judge_dir, dtype=dtype, mesh=mesh), load_tokenizer(judge_dir), settings, c)
        rows = label_pairs(judge, prompts, a, b)
        summary.update(judge="model", scoring=judge.labels.scoring, labels=judge.labels.describe(),
                       position_consistent=float(np.mean([r["position_consistent"] for r in rows])),
                       mean_preference=float(np.mean([r["preference"] for r in rows])),
                       identical_pairs=int(sum(x == y for x, y in zip(a, b))))
        if reference is not None:
            ref = score_candidates(reference, prompts, candidates)
            summary.update(judge_agreement(rows, ref[:, 0], ref[:, 1], a))
    if not rows:
        raise DataError(f"no preference pairs: all {len(prompts)} prompts' candidates scored the same; sample more "
                        "candidates (--num-samples), at a higher --temperature, or use a finer-grained scorer")
    summary.update(out=write_rows(out, rows), rows=len(rows))
    return summary


# ---------------------------------------------------------------------------- CLI: jaxalign label


def add_arguments(parser) -> None:
    parser.description = ("RLAIF: label candidate responses with a judge and write a prompt/chosen/rejected "
                          "preference dataset. The judge is a model (log-probs of its choice tokens, both orders "
                          "averaged) or a scoring function such as a task checker (best vs worst of each prompt's "
                          "candidates).")
    judges = parser.add_mutually_exclusive_group(required=True)
    judges.add_argument("--judge", default=None, help="judge model directory (HF checkpoint + tokenizer, or .gguf)")
    judges.add_argument("--judge-fn", default=None,
                        help="judge by a scoring function module:function, (prompts, completions) -> scores, "
                             "e.g. jaxalign.data.arithmetic:reward")
    parser.add_argument("--data", required=True,
                        help="jsonl/json/parquet file or Hub dataset: prompt + response_a + response_b "
                             "(or prompt only, with --policy); a prompt is a string or a chat conversation")
    parser.add_argument("--out", required=True, help="output preference dataset (.jsonl, .json or .parquet)")
    parser.add_argument("--policy", default=None, help="sample the candidates for each prompt from this model")
    parser.add_argument("--num-samples", type=int, default=2,
                        help="candidates sampled per prompt (with --policy); more than 2 needs --judge-fn")
    parser.add_argument("--agreement-fn", default=None,
                        help="with --judge: also score both candidates with this module:function (e.g. the task "
                             "checker) and report how often the judge agrees with it")
    parser.add_argument("--constitution", default=None, help="constitution YAML (default: the shipped one)")
    parser.add_argument("--principle", default=None, help="judge every row under this principle (default: random)")
    parser.add_argument("--template", default=None, help="judge template (a string, or @FILE); fields {prompt}, "
                                                         "{response_a}, {response_b}, {principle}")
    parser.add_argument("--chat", choices=("auto", "true", "false"), default="auto",
                        help="wrap the judge prompt with the judge's chat template (auto: when it has one)")
    parser.add_argument("--choices", default="A,B", help="the two choice labels, comma-separated")
    parser.add_argument("--scoring", choices=("auto", "token", "sequence"), default="auto",
                        help="token: label = one token read at the last position; sequence: full label token "
                             "sequence log-prob; auto: token when every label is one token")
    parser.add_argument("--no-leading-space", action="store_true", help="do not count ' A'/' B' variants")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,1,8 (default: one device)")
    g = parser.add_argument_group("sampling candidates (with --policy)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--policy-chat", action="store_true",
                   help="wrap string prompts with the policy's chat template (conversations always are)")


def run(args) -> dict:
    """`jaxalign label`."""
    from jaxalign.algos.constitutional import parse_mesh, read_text_arg

    choices = tuple(args.choices.split(","))
    if len(choices) != 2:
        raise ConfigError(f"--choices {args.choices!r}: expected two labels separated by a comma, e.g. A,B")
    settings = JudgeSettings(template=read_text_arg(args.template),
                             chat={"auto": "auto", "true": True, "false": False}[args.chat], choices=choices,
                             leading_space=not args.no_leading_space, scoring=args.scoring,
                             batch_size=args.batch_size, principle=args.principle, seed=args.seed)
    sample = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  batch_size=args.batch_size, chat=args.policy_chat)
    info = label(args.judge, args.data, args.out, judge_fn=args.judge_fn, policy_dir=args.policy,
                 num_samples=args.num_samples, agreement_fn=args.agreement_fn, constitution=args.constitution,
                 settings=settings, split=args.split, max_rows=args.max_rows, dtype=args.dtype,
                 mesh=parse_mesh(args.mesh), sample=sample)
    if info["judge"] == "function":
        detail = (f"best vs worst of {info['candidates_per_prompt']} candidates; {info['ties_dropped']} of "
                  f"{info['prompts']} prompts dropped, all their candidates scored the same")
    else:
        detail = (f"position-consistent: {info['position_consistent']:.1%}, mean preference "
                  f"{info['mean_preference']:.3f}, {info['scoring']} scoring: {info['labels']}")
        if "agreement" in info:
            detail += (f"; agrees with {args.agreement_fn} on {info['agreement']:.1%} of {info['compared']} pairs "
                       f"it does not tie ({info['reference_ties']} tied)")
    print(f"wrote {info['rows']} preference pairs to {info['out']} ({detail})")
    return info


__all__ = ["JUDGE_TEMPLATE", "Judge", "JudgeSettings", "LabelTokens", "judge_agreement", "label", "label_by_score",
           "label_pairs", "prompt_text", "read_candidates", "sample_candidates", "score_candidates"]
