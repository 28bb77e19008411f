"""Dataset formats: detection, chat templates, tokenization with loss masks, truncation.

Formats (TRL's names; "conversational" when the fields are lists of ``{role, content}``):

* ``language_modeling``: ``text`` (str; targets: all tokens + EOS) or ``messages``
  (targets: the assistant turns).
* ``prompt_completion``: ``prompt`` + ``completion``, both strings (targets: completion +
  EOS) or message lists (targets: the rendered completion turns).
* ``alpaca``: ``instruction`` [+ ``input``] + ``output``; becomes a user/assistant
  conversation when the tokenizer has a chat template, else the classic Alpaca prompt
  text (:data:`ALPACA_PROMPT`); targets: the output (+ end of turn / EOS).
* ``preference``: ``prompt`` + ``chosen`` + ``rejected`` [+ ``margin``].
* ``implicit_preference``: ``chosen`` + ``rejected`` [+ ``margin``], whole texts or
  conversations; the prompt is their shared prefix (see :func:`split_implicit_prompt`).

Loss-mask convention: an example is ``input_ids`` int32 ``[T]`` and ``loss_mask`` int32
``[T]``; ``loss_mask[t] = 1`` means token ``t`` is a target, predicted from tokens ``< t``
(so ``loss_mask[0]`` is always 0). With ``completion_only=False`` every token but the
first is a target.

How masks are computed: the example is a list of text pieces, each a target or not
(e.g. rendered prompt, then completion). The whole text is tokenized once; each piece's
end is located by tokenizing the text up to that end and taking the common prefix with
the full token ids. For conversations the pieces come from rendering the chat template
prefix by prefix: ``render(messages[:k], add_generation_prompt=True)`` ends where
assistant turn ``k`` starts and ``render(messages[:k+1])`` ends where it stops (so the
template's end-of-turn tokens are targets). No response-template string matching. A token
that straddles a piece boundary (a BPE merge) belongs to the later piece.

Special tokens: plain strings are encoded with ``add_special_tokens=True`` (BOS for Llama
tokenizers); chat-rendered text with ``add_special_tokens=False`` (templates write their own
BOS). EOS is appended after plain-string completions / texts; chat templates end the
assistant turn themselves.

Truncation (``max_length``): ``"truncate"`` keeps the first ``max_length`` tokens (the
prompt is never cut first, so a long prompt can leave no completion: such examples are
dropped, reason ``no_targets_after_truncation``); ``"drop"`` drops too-long examples.
Preference pairs: the prompt is first cut from the left to ``max_prompt_length`` (BOS
kept), then prompt + response is cut on the right to ``max_length``; a pair whose responses
become identical is dropped (reason ``chosen_equals_rejected_after_truncation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.data.sources import column_names
from jaxalign.errors import DataError

SFT_FORMATS = ("language_modeling", "prompt_completion", "alpaca")
PREFERENCE_FORMATS = ("preference", "implicit_preference")
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS

_REQUIRED = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
}
_EXPECTED = {
    "language_modeling": "'text' or 'messages'",
    "prompt_completion": "'prompt' + 'completion'",
    "alpaca": "'instruction' + 'output' (+ optional 'input')",
    "preference": "'prompt' + 'chosen' + 'rejected' (+ optional 'margin')",
    "implicit_preference": "'chosen' + 'rejected' (+ optional 'margin'), prompt = shared prefix",
}
_HH_ASSISTANT = "\n\nAssistant:"
# Drops decided by the truncation option, never errors (even with on_bad_row="error").
_TRUNCATION_REASONS = ("too_long", "no_targets_after_truncation", "chosen_equals_rejected_after_truncation")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class BadRow(DataError):
    """One row cannot be used; ``reason`` is a short key counted in ``DataStats.drop_reasons``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass
class DataStats:
    """Counts from tokenizing a dataset.

    ``rows``: rows read; ``examples``: examples (or pairs) produced; ``truncated``: produced
    examples that were cut to ``max_length``; ``dropped``: rows not produced, by reason in
    ``drop_reasons``, with the first such row's problem in ``first_drops``; ``format``: the format used.
    """

    format: str = ""
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    drop_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    first_drops: dict[str, str] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, detail: str = "") -> None:
        self.dropped += 1
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + 1
        if detail:
            self.first_drops.setdefault(reason, detail)

    def drops(self) -> str:
        """One line: ``reason: count (first: row i: problem)`` per drop reason."""
        return "; ".join(f"{r}: {n}" + (f" (first: {self.first_drops[r]})" if r in self.first_drops else "")
                         for r, n in self.drop_reasons.items())

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- detection


def _expected_all() -> str:
    return "; ".join(f"{name}: {cols}" for name, cols in _EXPECTED.items())


def detect_format(columns: Sequence[str] | Any, kind: str | None = None) -> str:
    """The format of a dataset from its column names (or the rows themselves).

    ``kind``: ``"sft"``, ``"preference"`` or ``None`` (either; preference wins when
    ``chosen``/``rejected`` exist). Raises ``DataError`` naming the columns found and the
    formats expected.
    """
    cols = set(columns if _is_str_seq(columns) else column_names(columns))
    if kind not in (None, "sft", "preference"):
        raise ValueError(f"kind must be 'sft', 'preference' or None, got {kind!r}")
    if kind in (None, "preference") and {"chosen", "rejected"} <= cols:
        return "preference" if "prompt" in cols else "implicit_preference"
    if kind in (None, "sft"):
        if "messages" in cols or "text" in cols:
            return "language_modeling"
        if {"prompt", "completion"} <= cols:
            return "prompt_completion"
        if {"instruction", "output"} <= cols:
            return "alpaca"
    names = {None: FORMATS, "sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS}[kind]
    expected = "; ".join(f"{n}: {_EXPECTED[n]}" for n in names)
    raise DataError(
        f"cannot detect the dataset format: found columns {sorted(cols)}, expected one of "
        f"[{expected}]; rename the columns (e.g. Dataset.rename_column) to match a format"
    )


def _is_str_seq(x) -> bool:
    return isinstance(x, (list, tuple, set)) and all(isinstance(c, str) for c in x)


def _check_columns(rows, fmt: str) -> None:
    cols = column_names(rows)
    if fmt == "language_modeling":
        if "text" not in cols and "messages" not in cols:
            raise DataError(
                f"format language_modeling needs a 'text' or 'messages' column; found columns {sorted(cols)}. "
                f"Expected formats: {_expected_all()}"
            )
        return
    missing = [c for c in _REQUIRED[fmt] if c not in cols]
    if missing:
        raise DataError(
            f"format {fmt} needs column(s) {missing}, which the dataset lacks; found columns {sorted(cols)}. "
            f"Expected formats: {_expected_all()}"
        )


# ----------------------------------------------------------------------------- chat helpers


def is_conversational(value) -> bool:
    """True when ``value`` is a list of ``{role, content}`` dicts."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value
    )


def _messages(value, field: str) -> list[dict]:
    if not is_conversational(value):
        raise BadRow("bad_messages", f"{field!r} must be a non-empty list of {{'role', 'content'}} dicts")
    out = []
    for m in value:
        if not isinstance(m["content"], str):
            raise BadRow("bad_messages", f"{field!r}: message content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_chat(tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with the tokenizer's chat template (a string, not tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the dataset is conversational (lists of {role, content}) but the tokenizer has no chat_template; "
            "use an instruct/chat tokenizer, set tokenizer.chat_template, or convert the rows to plain strings"
        )
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - template errors (raise_exception, bad roles)
        raise BadRow("chat_template_error", f"chat template failed: {e}") from e


def _prefix_of(prefix: str, full: str, what: str) -> None:
    if not full.startswith(prefix):
        raise DataError(
            f"the chat template is not prefix-stable: rendering {what} is not a prefix of rendering the "
            "whole conversation, so turn boundaries cannot be found. Use a template that renders earlier "
            "turns identically (e.g. no per-turn rewriting), or pre-render the text and use prompt/completion strings"
        )


def chat_pieces(tokenizer, messages: Sequence[Mapping], completion_only: bool = True) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_target)`` pieces: assistant turns are targets.

    Uses prefix renders: ``render(messages[:k], add_generation_prompt=True)`` is where
    assistant turn ``k`` starts and ``render(messages[:k+1])`` where it ends.
    """
    full = render_chat(tokenizer, messages)
    if not completion_only:
        return [(full, True)]
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k:
            start = render_chat(tokenizer, messages[:k], add_generation_prompt=True)
        else:
            try:  # assistant speaks first: the turn starts after the template's preamble
                start = tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001
                raise BadRow(
                    "assistant_first",
                    "the conversation starts with an assistant turn, which this chat template cannot delimit",
                ) from e
        end = render_chat(tokenizer, messages[: k + 1])
        _prefix_of(start, full, f"messages[:{k}] with add_generation_prompt=True")
        _prefix_of(end, full, f"messages[:{k + 1}]")
        pieces.append((full[pos : len(start)], False))
        pieces.append((full[len(start) : len(end)], True))
        pos = len(end)
    pieces.append((full[pos:], False))
    return [p for p in pieces if p[0]]


def _common_prefix_str(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


# ----------------------------------------------------------------------------- tokenization


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pieces(
    tokenizer,
    pieces: Sequence[tuple[str, bool]],
    add_special_tokens: bool,
    add_eos: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``pieces`` (``(text, is_target)``) into ``(input_ids, loss_mask)``, int32 ``[T]``.

    The concatenated text is tokenized once; piece ends are found by tokenizing each prefix
    and taking the common prefix with the full ids. ``add_eos`` appends EOS as a target
    (unless the tokenizer already ended the ids with it). ``loss_mask[0]`` is always 0.
    """
    full = "".join(t for t, _ in pieces)
    ids = _encode(tokenizer, full, add_special_tokens)
    mask = np.zeros(len(ids) + 1, np.int32)
    start, cum = 0, ""
    for i, (text, target) in enumerate(pieces):
        cum += text
        end = len(ids) if i == len(pieces) - 1 else _common_prefix_len(_encode(tokenizer, cum, add_special_tokens), ids)
        end = max(end, start)
        if target:
            mask[start:end] = 1
        start = end
    if add_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token (needed to end completions)")
        if not ids or ids[-1] != eos:
            ids.append(eos)
        mask[len(ids) - 1] = 1
    mask = mask[: len(ids)]
    if len(mask):
        mask[0] = 0
    return np.asarray(ids, np.int32), mask


def _get(row: Mapping, key: str, required: bool = True):
    value = row.get(key)
    if value is None and required:
        raise BadRow("missing_field", f"field {key!r} is missing or null")
    return value


def _str(row: Mapping, key: str, allow_empty: bool = True) -> str:
    value = _get(row, key)
    if not isinstance(value, str):
        raise BadRow("bad_type", f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow("empty_response", f"field {key!r} is empty")
    return value


def _text_or_messages(row: Mapping, key: str):
    value = _get(row, key)
    if not isinstance(value, (str, list, tuple)):
        raise BadRow("bad_type", f"field {key!r} must be a string or a list of {{role, content}} messages, "
                                 f"got {type(value).__name__} {value!r:.40}")
    return value


def _alpaca_prompt(row: Mapping) -> tuple[str, str]:
    instruction = _str(row, "instruction")
    inp = row.get("input") or ""
    if not isinstance(inp, str):
        raise BadRow("bad_type", f"field 'input' must be a string, got {type(inp).__name__}")
    return instruction, inp


def sft_pieces(row: Mapping, fmt: str, tokenizer, completion_only: bool = True):
    """``(pieces, add_special_tokens, add_eos)`` for one SFT row (see the module docstring)."""
    if fmt == "language_modeling":
        if row.get("messages") is not None:
            return chat_pieces(tokenizer, _messages(row["messages"], "messages"), completion_only), False, False
        return [(_str(row, "text", allow_empty=False), True)], True, True
    if fmt == "alpaca":
        instruction, inp = _alpaca_prompt(row)
        output = _str(row, "output", allow_empty=False)
        if getattr(tokenizer, "chat_template", None):
            user = instruction + ("\n\n" + inp if inp else "")
            row = {"prompt": [{"role": "user", "content": user}],
                   "completion": [{"role": "assistant", "content": output}]}
        else:
            template = ALPACA_PROMPT_WITH_INPUT if inp else ALPACA_PROMPT
            row = {"prompt": template.format(instruction=instruction, input=inp), "completion": output}
        fmt = "prompt_completion"
    if fmt == "prompt_completion":
        prompt, completion = _text_or_messages(row, "prompt"), _text_or_messages(row, "completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise BadRow("empty_response", "field 'completion' is empty")
            return [(prompt, not completion_only), (completion, True)], True, True
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            if not completion.strip():
                raise BadRow("empty_response", "field 'completion' is empty")
            completion = [{"role": "assistant", "content": completion}]
        prompt, completion = _messages(prompt, "prompt"), _messages(completion, "completion")
        start = render_chat(tokenizer, prompt, add_generation_prompt=True)
        full = render_chat(tokenizer, prompt + completion)
        _prefix_of(start, full, "the prompt with add_generation_prompt=True")
        return [(start, not completion_only), (full[len(start):], True)], False, False
    raise DataError(f"unknown SFT format {fmt!r}; expected one of {SFT_FORMATS}")


def _check_options(truncation: str, on_bad_row: str, max_length) -> None:
    if truncation not in ("truncate", "drop"):
        raise DataError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    if on_bad_row not in ("drop", "error"):
        raise DataError(f"on_bad_row must be 'drop' or 'error', got {on_bad_row!r}")
    if max_length is not None and max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")


def tokenize_sft(
    rows: Iterable[Mapping],
    tokenizer,
    *,
    max_length: int | None = None,
    truncation: str = "truncate",
    completion_only: bool = True,
    format: str | None = None,
    on_bad_row: str = "drop",
) -> tuple[list[dict[str, np.ndarray]], DataStats]:
    """Tokenize SFT rows into examples ``{"input_ids": int32 [T], "loss_mask": int32 [T]}``.

    ``format``: one of :data:`SFT_FORMATS`, or ``None`` to detect it from the columns.
    ``completion_only``: targets are the completion / assistant turns (default) or, if
    False, the whole sequence. ``max_length`` / ``truncation``: see the module docstring.
    ``on_bad_row``: ``"drop"`` (counted in the stats) or ``"error"`` (raises, naming the row).
    Rows that end up with no target token are dropped (reason ``no_targets``).
    """
    _check_options(truncation, on_bad_row, max_length)
    fmt = format or detect_format(rows, kind="sft")
    if fmt not in SFT_FORMATS:
        raise DataError(f"format {fmt!r} is not an SFT format; expected one of {SFT_FORMATS}")
    _check_columns(rows, fmt)
    stats = DataStats(format=fmt)
    examples = []
    for i, row in enumerate(rows):
        stats.rows += 1
        try:
            pieces, special, eos = sft_pieces(row, fmt, tokenizer, completion_only)
            ids, mask = tokenize_pieces(tokenizer, pieces, special, eos)
            if not mask.any():
                raise BadRow("no_targets", "the row has no target tokens (e.g. no assistant turn)")
            if max_length is not None and len(ids) > max_length:
                if truncation == "drop":
                    raise BadRow("too_long", f"{len(ids)} tokens > max_length={max_length}")
                ids, mask = ids[:max_length], mask[:max_length]
                if not mask.any():
                    raise BadRow(
                        "no_targets_after_truncation",
                        f"no target token within max_length={max_length} (the prompt is too long)",
                    )
                stats.truncated += 1
        except BadRow as e:
            if on_bad_row == "error" and e.reason not in _TRUNCATION_REASONS:
                raise DataError(f"row {i}: {e} (format {fmt}); fix the row or pass on_bad_row='drop'") from e
            stats.drop(e.reason, f"row {i}: {e}")
            continue
        examples.append({"input_ids": ids, "loss_mask": mask})
        stats.examples += 1
    return examples, stats


# ----------------------------------------------------------------------------- preference


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` from two full texts sharing a prompt.

    The prompt is the longest common prefix, cut after its last ``"\\n\\nAssistant:"`` when
    there is one (hh-rlhf); otherwise cut before the last whitespace run, so responses
    start at a word boundary.
    """
    common = _common_prefix_str(chosen, rejected)
    cut = common.rfind(_HH_ASSISTANT)
    if cut >= 0:
        n = cut + len(_HH_ASSISTANT)
    else:
        n = len(common)
        while n > 0 and not common[n - 1].isspace():
            n -= 1
        while n > 0 and common[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def split_implicit_messages(chosen: list[dict], rejected: list[dict]):
    """Message-list version of :func:`split_implicit_prompt`: the shared leading messages."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _pair_parts(row: Mapping, fmt: str):
    """``(prompt, chosen, rejected, conversational)`` with responses split off the prompt."""
    chosen, rejected = _text_or_messages(row, "chosen"), _text_or_messages(row, "rejected")
    if fmt == "preference":
        prompt = _text_or_messages(row, "prompt")
        conv = any(isinstance(x, (list, tuple)) for x in (prompt, chosen, rejected))
        if conv:
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
            chosen = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else _messages(chosen, "chosen")
            rejected = (
                [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else _messages(rejected, "rejected")
            )
        else:
            prompt, chosen, rejected = _str(row, "prompt"), _str(row, "chosen"), _str(row, "rejected")
        return prompt, chosen, rejected, conv
    if isinstance(chosen, str) and isinstance(rejected, str):
        return (*split_implicit_prompt(chosen, rejected), False)
    prompt, c, r = split_implicit_messages(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
    return prompt, c, r, True


def _check_pair(chosen, rejected, conv: bool) -> None:
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        empty = (not resp) if conv else (not resp.strip())
        if empty or (conv and not any(m["content"].strip() for m in resp)):
            raise BadRow("empty_response", f"the {name} response is empty")
    if chosen == rejected:
        raise BadRow("chosen_equals_rejected", "chosen and rejected responses are identical")


def _truncate_prompt(prompt_ids: np.ndarray, max_prompt_length: int, bos: int | None) -> np.ndarray:
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    if bos is not None and len(prompt_ids) and prompt_ids[0] == bos and max_prompt_length > 1:
        return np.concatenate([prompt_ids[:1], prompt_ids[len(prompt_ids) - max_prompt_length + 1 :]])
    return prompt_ids[len(prompt_ids) - max_prompt_length :]


def tokenize_preference(
    rows: Iterable[Mapping],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "truncate",
    format: str | None = None,
    on_bad_row: str = "drop",
) -> tuple[list[dict[str, Any]], DataStats]:
    """Tokenize preference rows into pairs.

    Each pair: ``prompt_ids`` int32 ``[P]``, ``chosen_ids`` int32 ``[C]``, ``rejected_ids``
    int32 ``[R]`` (responses only; EOS appended for plain strings, the template's end of turn
    for conversations), ``margin`` float (0.0 when the row has none). Bad rows (missing or
    null column, empty response, chosen == rejected, untokenizable) are dropped and counted
    (``on_bad_row="drop"``) or raise a ``DataError`` naming the row index (``"error"``).
    """
    _check_options(truncation, on_bad_row, max_length)
    fmt = format or detect_format(rows, kind="preference")
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(f"format {fmt!r} is not a preference format; expected one of {PREFERENCE_FORMATS}")
    _check_columns(rows, fmt)
    stats = DataStats(format=fmt)
    pairs = []
    eos = tokenizer.eos_token_id
    for i, row in enumerate(rows):
        stats.rows += 1
        try:
            if row.get("chosen") is not None and row.get("chosen") == row.get("rejected"):
                raise BadRow("chosen_equals_rejected", "chosen and rejected are identical")
            prompt, chosen, rejected, conv = _pair_parts(row, fmt)
            _check_pair(chosen, rejected, conv)
            margin = row.get("margin")
            try:
                margin = 0.0 if margin is None else float(margin)
            except (TypeError, ValueError):
                raise BadRow("bad_type", f"margin must be a number, got {margin!r}") from None
            if conv:
                p_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
                responses = []
                for resp in (chosen, rejected):
                    full = render_chat(tokenizer, prompt + resp)
                    _prefix_of(p_text, full, "the prompt with add_generation_prompt=True")
                    responses.append(_encode(tokenizer, full[len(p_text):], False))
                prompt_ids = _encode(tokenizer, p_text, False)
            else:
                if eos is None:
                    raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
                prompt_ids = _encode(tokenizer, prompt, True)
                responses = [_encode(tokenizer, r, False) + [eos] for r in (chosen, rejected)]
            prompt_ids = np.asarray(prompt_ids, np.int32)
            c_ids, r_ids = (np.asarray(r, np.int32) for r in responses)
            too_long = (max_prompt_length is not None and len(prompt_ids) > max_prompt_length) or (
                max_length is not None and len(prompt_ids) + max(len(c_ids), len(r_ids)) > max_length
            )
            if too_long:
                if truncation == "drop":
                    raise BadRow("too_long", "prompt + response is longer than max_length/max_prompt_length")
                if max_prompt_length is not None:
                    prompt_ids = _truncate_prompt(prompt_ids, max_prompt_length, tokenizer.bos_token_id)
                if max_length is not None:
                    room = max_length - len(prompt_ids)
                    c_ids, r_ids = c_ids[: max(room, 0)], r_ids[: max(room, 0)]
                if len(c_ids) == 0 or len(r_ids) == 0:
                    raise BadRow(
                        "no_targets_after_truncation",
                        f"the prompt leaves no room for the responses within max_length={max_length}; "
                        "set max_prompt_length below max_length",
                    )
                if np.array_equal(c_ids, r_ids):
                    raise BadRow("chosen_equals_rejected_after_truncation",
                                 f"chosen and rejected are identical within max_length={max_length}")
                stats.truncated += 1
        except BadRow as e:
            if on_bad_row == "error" and e.reason not in _TRUNCATION_REASONS:
                raise DataError(f"row {i}: {e} (format {fmt}); fix the row or pass on_bad_row='drop'") from e
            stats.drop(e.reason, f"row {i}: {e}")
            continue
        pairs.append({"prompt_ids": prompt_ids, "chosen_ids": c_ids, "rejected_ids": r_ids, "margin": margin})
        stats.examples += 1
    return pairs, stats
