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
  A ``prompt`` string next to ``chosen``/``rejected`` conversations that already hold the
  user turn (UltraFeedback-binarized) is checked against their head and stripped off them.
  Paired formats may carry ``score_chosen`` + ``score_rejected`` (filtered by ``min_score_gap``).
* ``unpaired_preference``: ``prompt`` + ``completion`` + ``label`` (bool: desirable or not; KTO).
* ``prompt_only``: ``prompt`` alone (online methods sample the completions).

Columns with other names are mapped with ``columns`` (our name -> the dataset's,
:func:`map_columns`). A system prompt (``system_prompt``, or a row's ``system`` column, which
wins) is put before conversations as a system message; a string prompt then becomes a user
turn (and string responses assistant turns). Conversations that start with a system message
keep theirs.

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
from jaxalign.errors import DataError, closest

SFT_FORMATS = ("language_modeling", "prompt_completion", "alpaca")
PREFERENCE_FORMATS = ("preference", "implicit_preference")
UNPAIRED_FORMAT = "unpaired_preference"
PROMPT_FORMAT = "prompt_only"
FORMATS = SFT_FORMATS + PREFERENCE_FORMATS + (UNPAIRED_FORMAT, PROMPT_FORMAT)
COLUMNS = ("prompt", "completion", "chosen", "rejected", "label", "margin", "score_chosen", "score_rejected",
           "system", "messages", "text", "instruction", "input", "output")
"""Our column names: the keys ``columns`` (``data.columns``) maps to a dataset's names."""

_REQUIRED = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    UNPAIRED_FORMAT: ("prompt", "completion", "label"),
    PROMPT_FORMAT: ("prompt",),
}
_EXPECTED = {
    "language_modeling": "'text' or 'messages'",
    "prompt_completion": "'prompt' + 'completion'",
    "alpaca": "'instruction' + 'output' (+ optional 'input')",
    "preference": "'prompt' + 'chosen' + 'rejected' (+ optional 'margin')",
    "implicit_preference": "'chosen' + 'rejected' (+ optional 'margin'), prompt = shared prefix",
    UNPAIRED_FORMAT: "'prompt' + 'completion' + 'label' (true: desirable)",
    PROMPT_FORMAT: "'prompt' alone",
}
_HH_ASSISTANT = "\n\nAssistant:"
# Drops decided by the truncation and filter options, never errors (even with on_bad_row="error").
_TRUNCATION_REASONS = ("too_long", "no_targets_after_truncation", "chosen_equals_rejected_after_truncation",
                       "score_gap_below_min")

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
    ``drop_reasons`` (``score_gap_below_min``: filtered by ``min_score_gap``), with the first
    such row's problem in ``first_drops``; ``format``: the format used; ``mean_score_gap``:
    mean ``score_chosen - score_rejected`` of the pairs produced (None without scores).
    """

    format: str = ""
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    drop_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    first_drops: dict[str, str] = dataclasses.field(default_factory=dict)
    mean_score_gap: float | None = None

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


_KINDS = {None: FORMATS, "sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS,
          "unpaired": (UNPAIRED_FORMAT,) + PREFERENCE_FORMATS, "prompt": (PROMPT_FORMAT,)}


def _expected_all() -> str:
    return "; ".join(f"{name}: {cols}" for name, cols in _EXPECTED.items())


def detect_format(columns: Sequence[str] | Any, kind: str | None = None) -> str:
    """The format of a dataset from its column names (or the rows themselves).

    ``kind``: ``"sft"``, ``"preference"`` (paired), ``"unpaired"`` (KTO: unpaired, or paired
    rows to split), ``"prompt"`` (online methods: any rows with a ``prompt``) or ``None``
    (any; paired preference wins when ``chosen``/``rejected`` exist, then unpaired when
    ``label`` is next to ``prompt`` + ``completion``). Raises ``DataError`` naming the
    columns found and the formats expected.
    """
    cols = set(columns if _is_str_seq(columns) else column_names(columns))
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {list(_KINDS)}, got {kind!r}")
    paired = {"chosen", "rejected"} <= cols
    if kind in (None, "preference", "unpaired") and paired:
        return "preference" if "prompt" in cols else "implicit_preference"
    if kind in (None, "unpaired") and {"prompt", "completion", "label"} <= cols:
        return UNPAIRED_FORMAT
    if kind in (None, "sft"):
        if "messages" in cols or "text" in cols:
            return "language_modeling"
        if {"prompt", "completion"} <= cols:
            return "prompt_completion"
        if {"instruction", "output"} <= cols:
            return "alpaca"
    if kind in (None, "prompt") and "prompt" in cols:
        return PROMPT_FORMAT
    names = _KINDS[kind]
    expected = "; ".join(f"{n}: {_EXPECTED[n]}" for n in names)
    raise DataError(
        f"cannot detect the dataset format: found columns {sorted(cols)}, expected one of "
        f"[{expected}]; rename the columns (data.columns maps our names to the dataset's) to match a format"
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


def map_columns(rows, columns: Mapping[str, str] | None):
    """``rows`` with the dataset's columns renamed to ours: ``columns`` maps our name (one of
    :data:`COLUMNS`) to the dataset's (e.g. ``{"prompt": "question", "chosen": "response_j"}``).

    A column already named like a mapped one is replaced. Returns ``rows`` unchanged when
    ``columns`` is empty; a ``datasets.Dataset`` stays one. Raises ``DataError`` for an
    unknown name of ours or a dataset column that does not exist (both with a did-you-mean).
    """
    if not columns:
        return rows
    found = column_names(rows)
    for ours, theirs in columns.items():
        if ours not in COLUMNS:
            close = closest(ours, COLUMNS)
            raise DataError(f"data.columns: {ours!r} is not one of our column names; "
                            + (f"did you mean {close!r}?" if close else f"ours are: {', '.join(COLUMNS)}"))
        if not isinstance(theirs, str) or theirs not in found:
            close = closest(theirs, found)
            raise DataError(f"data.columns.{ours}={theirs!r}: the dataset has no column {theirs!r}"
                            + (f"; did you mean {close!r}?" if close else "") + f" (found columns {sorted(found)})")
    shared = [c for c in set(columns.values()) if list(columns.values()).count(c) > 1]
    if shared:
        raise DataError(f"data.columns maps several of our columns to {shared[0]!r}; map each column once")
    rename = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    replaced = [c for c in rename.values() if c in found and c not in rename]
    if hasattr(rows, "rename_columns"):
        return rows.remove_columns(replaced).rename_columns(rename)
    return [{rename.get(k, k): v for k, v in r.items() if k not in replaced} for r in rows]


def _columns_note(columns: Mapping[str, str] | None) -> str:
    """``; data.columns: prompt='question', ...`` for row errors (so they name the dataset's columns)."""
    mapped = {k: v for k, v in (columns or {}).items() if k != v}
    return "; data.columns: " + ", ".join(f"{k}={v!r}" for k, v in mapped.items()) if mapped else ""


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
            "the dataset is conversational (lists of {role, content}, or a system prompt is set) but the tokenizer "
            "has no chat_template; use an instruct/chat tokenizer, set tokenizer.chat_template, or convert the rows "
            "to plain strings"
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


def _system(row: Mapping, system_prompt: str | None) -> str | None:
    """The row's ``system`` column when set (it wins), else ``system_prompt``."""
    value = row.get("system")
    if value is None:
        return system_prompt
    if not isinstance(value, str):
        raise BadRow("bad_type", f"field 'system' must be a string, got {type(value).__name__}")
    return value or system_prompt


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    """``messages`` after a system message holding ``system`` (unless they start with their own)."""
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}] + messages


def _no_system_for_text(system: str | None, what: str) -> None:
    if system:
        raise BadRow("system_prompt_on_text", f"a system prompt needs conversational rows, but {what} is plain "
                                              "text (no user turn to put it before); use conversations or drop "
                                              "the system prompt")


def _as_messages(value, field: str, role: str) -> list[dict]:
    """A string as one ``role`` message, or the checked message list."""
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, field)


def _check_starts_with_assistant(response: list[dict], field: str) -> None:
    """A response (after its prompt) must start with an assistant turn: a data-layout problem otherwise."""
    if response and response[0]["role"] != "assistant":
        raise BadRow("response_not_assistant", f"column {field!r} continues with a {response[0]['role']!r} turn after "
                                               "the prompt; a response must start with an assistant turn")


def _prompt_and_response(row: Mapping, field: str, system: str | None):
    """``(prompt, response, conversational)`` of a ``prompt`` + ``field`` row: strings stay strings
    (unless a system prompt makes them a conversation), else both become message lists."""
    prompt, response = _text_or_messages(row, "prompt"), _text_or_messages(row, field)
    if isinstance(prompt, str) and isinstance(response, str) and not system:
        return prompt, response, False
    prompt = _with_system(_as_messages(prompt, "prompt", "user"), system)
    response = _as_messages(response, field, "assistant")
    _check_starts_with_assistant(response, field)
    return prompt, response, True


def sft_pieces(row: Mapping, fmt: str, tokenizer, completion_only: bool = True, system_prompt: str | None = None):
    """``(pieces, add_special_tokens, add_eos)`` for one SFT row (see the module docstring)."""
    system = _system(row, system_prompt)
    if fmt == "language_modeling":
        if row.get("messages") is not None:
            messages = _with_system(_messages(row["messages"], "messages"), system)
            return chat_pieces(tokenizer, messages, completion_only), False, False
        _no_system_for_text(system, "column 'text'")
        return [(_str(row, "text", allow_empty=False), True)], True, True
    if fmt == "alpaca":
        instruction, inp = _alpaca_prompt(row)
        output = _str(row, "output", allow_empty=False)
        if getattr(tokenizer, "chat_template", None) or system:
            user = instruction + ("\n\n" + inp if inp else "")
            row = {"prompt": [{"role": "user", "content": user}],
                   "completion": [{"role": "assistant", "content": output}]}
        else:
            template = ALPACA_PROMPT_WITH_INPUT if inp else ALPACA_PROMPT
            row = {"prompt": template.format(instruction=instruction, input=inp), "completion": output}
        fmt = "prompt_completion"
    if fmt == "prompt_completion":
        prompt, completion, conv = _prompt_and_response(row, "completion", system)
        if not conv:
            if not completion.strip():
                raise BadRow("empty_response", "field 'completion' is empty")
            return [(prompt, not completion_only), (completion, True)], True, True
        if not any(m["content"].strip() for m in completion):
            raise BadRow("empty_response", "field 'completion' is empty")
        start = render_chat(tokenizer, prompt, add_generation_prompt=True)
        full = render_chat(tokenizer, prompt + completion)
        _prefix_of(start, full, "the prompt with add_generation_prompt=True")
        return [(start, not completion_only), (full[len(start):], True)], False, False
    raise DataError(f"unknown SFT format {fmt!r}; expected one of {SFT_FORMATS}")


def _check_options(truncation: str, on_bad_row: str, max_length, truncations=("truncate", "drop"),
                   what: str = "truncation") -> None:
    """DataError for a `truncation` outside `truncations` (named `what`), a bad `on_bad_row`
    or a `max_length` under 2."""
    if truncation not in truncations:
        raise DataError(f"{what} must be {' or '.join(map(repr, truncations))}, got {truncation!r}")
    if on_bad_row not in ("drop", "error"):
        raise DataError(f"on_bad_row must be 'drop' or 'error', got {on_bad_row!r}")
    if max_length is not None and max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")


def _tokenize_rows(rows, fmt: str, on_bad_row: str, columns, one) -> tuple[list, DataStats]:
    """Apply ``one(row, stats) -> example`` to each row; a ``BadRow`` is dropped and counted, or
    (``on_bad_row="error"``, except truncation/filter drops) raised naming the row."""
    stats = DataStats(format=fmt)
    examples = []
    for i, row in enumerate(rows):
        stats.rows += 1
        try:
            example = one(row, stats)
        except BadRow as e:
            if on_bad_row == "error" and e.reason not in _TRUNCATION_REASONS:
                raise DataError(f"row {i}: {e} (format {fmt}{_columns_note(columns)}); "
                                "fix the row or pass on_bad_row='drop'") from e
            stats.drop(e.reason, f"row {i}: {e}")
            continue
        examples.append(example)
        stats.examples += 1
    return examples, stats


def tokenize_sft(
    rows: Iterable[Mapping],
    tokenizer,
    *,
    max_length: int | None = None,
    truncation: str = "truncate",
    completion_only: bool = True,
    format: str | None = None,
    on_bad_row: str = "drop",
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> tuple[list[dict[str, np.ndarray]], DataStats]:
    """Tokenize SFT rows into examples ``{"input_ids": int32 [T], "loss_mask": int32 [T]}``.

    ``format``: one of :data:`SFT_FORMATS`, or ``None`` to detect it from the columns.
    ``completion_only``: targets are the completion / assistant turns (default) or, if
    False, the whole sequence. ``max_length`` / ``truncation``: see the module docstring.
    ``on_bad_row``: ``"drop"`` (counted in the stats) or ``"error"`` (raises, naming the row).
    ``columns``: our column name -> the dataset's (:func:`map_columns`); ``system_prompt``:
    a system message for conversations (a row's ``system`` column wins).
    Rows that end up with no target token are dropped (reason ``no_targets``).
    """
    _check_options(truncation, on_bad_row, max_length)
    rows = map_columns(rows, columns)
    fmt = format or detect_format(rows, kind="sft")
    if fmt not in SFT_FORMATS:
        raise DataError(f"format {fmt!r} is not an SFT format; expected one of {SFT_FORMATS}")
    _check_columns(rows, fmt)

    def one(row, stats):
        pieces, special, eos = sft_pieces(row, fmt, tokenizer, completion_only, system_prompt)
        ids, mask = tokenize_pieces(tokenizer, pieces, special, eos)
        if not mask.any():
            raise BadRow("no_targets", "the row has no target tokens (e.g. no assistant turn)")
        if max_length is not None and len(ids) > max_length:
            if truncation == "drop":
                raise BadRow("too_long", f"{len(ids)} tokens > max_length={max_length}")
            ids, mask = ids[:max_length], mask[:max_length]
            if not mask.any():
                raise BadRow("no_targets_after_truncation",
                             f"no target token within max_length={max_length} (the prompt is too long)")
            stats.truncated += 1
        return {"input_ids": ids, "loss_mask": mask}

    return _tokenize_rows(rows, fmt, on_bad_row, columns, one)


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


def _strip_prompt(prompt: list[dict], side: list[dict], field: str) -> tuple[list[dict], list[dict]]:
    """``(prompt, response)``: ``side`` without the copy of ``prompt`` it starts with.

    UltraFeedback-binarized rows repeat the ``prompt`` column as the head of
    ``chosen``/``rejected`` (a system message there joins the prompt). A side that starts
    with other non-assistant turns disagrees with the prompt.
    """
    if side[0]["role"] == "assistant":
        return prompt, side
    if side[0]["role"] == "system" and prompt[0]["role"] != "system":
        prompt = side[:1] + prompt
    if side[: len(prompt)] == prompt:
        return prompt, side[len(prompt):]
    raise BadRow("prompt_mismatch", f"column {field!r} starts with a {side[0]['role']!r} turn that disagrees with "
                                    "column 'prompt' (given in both, they must match)")


def _implicit_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    if not prompt.strip():
        raise BadRow("no_shared_prompt", "chosen and rejected share no prompt (no common prefix)")
    if _HH_ASSISTANT in chosen and _HH_ASSISTANT in rejected and not prompt.endswith(_HH_ASSISTANT):
        raise BadRow("prompt_mismatch",
                     "columns 'chosen' and 'rejected' have different prompts (their human turns differ)")
    return prompt, c, r


def _pair_parts(row: Mapping, fmt: str, system_prompt: str | None = None):
    """``(prompt, chosen, rejected, conversational)`` with responses split off the prompt."""
    chosen, rejected = _text_or_messages(row, "chosen"), _text_or_messages(row, "rejected")
    system = _system(row, system_prompt)
    if fmt == "preference":
        prompt = _text_or_messages(row, "prompt")
        if all(isinstance(x, str) for x in (prompt, chosen, rejected)) and not system:
            return prompt, chosen, rejected, False
        prompt = _as_messages(prompt, "prompt", "user")
        p_c, chosen = _strip_prompt(prompt, _as_messages(chosen, "chosen", "assistant"), "chosen")
        prompt, rejected = _strip_prompt(prompt, _as_messages(rejected, "rejected", "assistant"), "rejected")
        if p_c != prompt:
            raise BadRow("prompt_mismatch", "columns 'chosen' and 'rejected' start with different system messages")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        _no_system_for_text(system, "an implicit-prompt text pair")
        return (*_implicit_text_prompt(chosen, rejected), False)
    else:
        prompt, chosen, rejected = split_implicit_messages(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
        if not prompt:
            raise BadRow("no_shared_prompt", "chosen and rejected conversations share no leading message")
        if any(x and x[0]["role"] != "assistant" for x in (chosen, rejected)):
            raise BadRow("prompt_mismatch", "columns 'chosen' and 'rejected' differ in a non-assistant turn "
                                            "(their prompts differ)")
    for x, f in ((chosen, "chosen"), (rejected, "rejected")):
        _check_starts_with_assistant(x, f)
    return _with_system(prompt, system), chosen, rejected, True


def prompt_of(row: Mapping, system_prompt: str | None = None):
    """The prompt an online method samples from: the row's ``prompt`` (a string, or messages),
    else the shared head of its ``chosen``/``rejected`` (preference rows without a prompt
    column). A system prompt (the row's ``system`` column, else ``system_prompt``) makes a
    string prompt a user turn after it. Raises ``BadRow`` for a row without a usable prompt.
    """
    system = _system(row, system_prompt)
    if row.get("prompt") is None and row.get("chosen") is not None and row.get("rejected") is not None:
        prompt = _pair_parts(row, "implicit_preference", system)[0]
    else:
        prompt = row.get("prompt")
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise BadRow("missing_prompt", "field 'prompt' is missing or empty")
        prompt = _text_or_messages(row, "prompt")
        if isinstance(prompt, str) and not system:
            return prompt
        prompt = _with_system(_as_messages(prompt, "prompt", "user"), system)
    if isinstance(prompt, list) and prompt and prompt[-1]["role"] == "assistant":
        raise BadRow("prompt_ends_with_assistant", "the prompt's last turn is the assistant's; a prompt to "
                                                   "sample from must end with a user (or system) turn")
    return prompt


def _check_pair(chosen, rejected, conv: bool) -> None:
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        _check_response(resp, name, conv)
    if chosen == rejected:
        raise BadRow("chosen_equals_rejected", "chosen and rejected responses are identical")


def _check_response(resp, name: str, conv: bool) -> None:
    empty = (not resp) if conv else (not resp.strip())
    if empty or (conv and not any(m["content"].strip() for m in resp)):
        raise BadRow("empty_response", f"the {name} response is empty")


def _score_gap(row: Mapping) -> float | None:
    """``score_chosen - score_rejected`` of the row (None when it has neither score)."""
    sc, sr = row.get("score_chosen"), row.get("score_rejected")
    if sc is None and sr is None:
        return None
    try:
        return float(_get(row, "score_chosen")) - float(_get(row, "score_rejected"))
    except (TypeError, ValueError):
        raise BadRow("bad_type", f"scores must be numbers, got score_chosen={sc!r}, score_rejected={sr!r}") from None


def _truncate_prompt(prompt_ids: np.ndarray, max_prompt_length: int, bos: int | None) -> np.ndarray:
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    if bos is not None and len(prompt_ids) and prompt_ids[0] == bos and max_prompt_length > 1:
        return np.concatenate([prompt_ids[:1], prompt_ids[len(prompt_ids) - max_prompt_length + 1 :]])
    return prompt_ids[len(prompt_ids) - max_prompt_length :]


def _encode_prompt_responses(tokenizer, prompt, responses, conv: bool):
    """``(prompt_ids, [response_ids])``, int32: conversations rendered with the chat template
    (prompt with the generation prompt, each response = the rest of the whole render), else
    the prompt with special tokens and each response + EOS."""
    if conv:
        p_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
        out = []
        for resp in responses:
            full = render_chat(tokenizer, prompt + resp)
            _prefix_of(p_text, full, "the prompt with add_generation_prompt=True")
            out.append(_encode(tokenizer, full[len(p_text):], False))
        prompt_ids = _encode(tokenizer, p_text, False)
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
        prompt_ids = _encode(tokenizer, prompt, True)
        out = [_encode(tokenizer, r, False) + [eos] for r in responses]
    return np.asarray(prompt_ids, np.int32), [np.asarray(r, np.int32) for r in out]


def _fit(prompt_ids, responses, tokenizer, max_length, max_prompt_length, truncation):
    """``(prompt_ids, responses, truncated)`` within the length limits: the prompt cut from the
    left to ``max_prompt_length`` (BOS kept), then prompt + each response cut on the right to
    ``max_length`` (``truncation="drop"``: a ``too_long`` BadRow instead)."""
    too_long = (max_prompt_length is not None and len(prompt_ids) > max_prompt_length) or (
        max_length is not None and len(prompt_ids) + max(len(r) for r in responses) > max_length)
    if not too_long:
        return prompt_ids, responses, False
    if truncation == "drop":
        raise BadRow("too_long", "prompt + response is longer than max_length/max_prompt_length")
    if max_prompt_length is not None:
        prompt_ids = _truncate_prompt(prompt_ids, max_prompt_length, tokenizer.bos_token_id)
    if max_length is not None:
        room = max(max_length - len(prompt_ids), 0)
        responses = [r[:room] for r in responses]
    if any(len(r) == 0 for r in responses):
        raise BadRow("no_targets_after_truncation",
                     f"the prompt leaves no room for the responses within max_length={max_length}; "
                     "set max_prompt_length below max_length")
    return prompt_ids, responses, True


def tokenize_preference(
    rows: Iterable[Mapping],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "truncate",
    format: str | None = None,
    on_bad_row: str = "drop",
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    min_score_gap: float | None = None,
) -> tuple[list[dict[str, Any]], DataStats]:
    """Tokenize preference rows into pairs.

    Each pair: ``prompt_ids`` int32 ``[P]``, ``chosen_ids`` int32 ``[C]``, ``rejected_ids``
    int32 ``[R]`` (responses only; EOS appended for plain strings, the template's end of turn
    for conversations), ``margin`` float (0.0 when the row has none), and ``score_gap``
    (``score_chosen - score_rejected``) when the row has scores. Bad rows (missing or null
    column, empty response, chosen == rejected, implicit rows without a shared prompt, a
    ``prompt`` that disagrees with the head of chosen/rejected, untokenizable) are dropped
    and counted (``on_bad_row="drop"``) or raise a ``DataError`` naming the row index
    (``"error"``). ``min_score_gap``: pairs whose score gap is smaller are dropped (reason
    ``score_gap_below_min``, never an error); it needs score columns. ``columns`` /
    ``system_prompt``: as for :func:`tokenize_sft`.
    """
    _check_options(truncation, on_bad_row, max_length)
    rows = map_columns(rows, columns)
    fmt = format or detect_format(rows, kind="preference")
    if fmt not in PREFERENCE_FORMATS:
        raise DataError(f"format {fmt!r} is not a preference format; expected one of {PREFERENCE_FORMATS}")
    _check_columns(rows, fmt)
    if min_score_gap is not None and not {"score_chosen", "score_rejected"} <= set(column_names(rows)):
        raise DataError(f"data.min_score_gap={min_score_gap} needs 'score_chosen' and 'score_rejected' columns; found "
                        f"{sorted(column_names(rows))} (map yours with data.columns)")

    def one(row, stats):
        if row.get("chosen") is not None and row.get("chosen") == row.get("rejected"):
            raise BadRow("chosen_equals_rejected", "chosen and rejected are identical")
        prompt, chosen, rejected, conv = _pair_parts(row, fmt, system_prompt)
        _check_pair(chosen, rejected, conv)
        margin = row.get("margin")
        try:
            margin = 0.0 if margin is None else float(margin)
        except (TypeError, ValueError):
            raise BadRow("bad_type", f"margin must be a number, got {margin!r}") from None
        gap = _score_gap(row)
        if min_score_gap is not None:
            if gap is None:
                raise BadRow("missing_field", "fields 'score_chosen' and 'score_rejected' are null")
            if gap < min_score_gap:
                raise BadRow("score_gap_below_min", f"score gap {gap:g} < data.min_score_gap={min_score_gap:g}")
        prompt_ids, responses = _encode_prompt_responses(tokenizer, prompt, (chosen, rejected), conv)
        prompt_ids, (c_ids, r_ids), cut = _fit(prompt_ids, responses, tokenizer, max_length, max_prompt_length,
                                               truncation)
        if cut:
            if np.array_equal(c_ids, r_ids):
                raise BadRow("chosen_equals_rejected_after_truncation",
                             f"chosen and rejected are identical within max_length={max_length}")
            stats.truncated += 1
        pair = {"prompt_ids": prompt_ids, "chosen_ids": c_ids, "rejected_ids": r_ids, "margin": margin}
        if gap is not None:
            pair["score_gap"] = gap
        return pair

    pairs, stats = _tokenize_rows(rows, fmt, on_bad_row, columns, one)
    gaps = [p["score_gap"] for p in pairs if "score_gap" in p]
    stats.mean_score_gap = float(np.mean(gaps)) if gaps else None
    return pairs, stats


def tokenize_unpaired(
    rows: Iterable[Mapping],
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "truncate",
    on_bad_row: str = "drop",
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    min_score_gap: float | None = None,
) -> tuple[list[dict[str, Any]], DataStats]:
    """Tokenize unpaired feedback (KTO) into examples ``prompt_ids`` int32 ``[P]``,
    ``completion_ids`` int32 ``[C]``, ``label`` (bool: desirable).

    Rows: ``prompt`` + ``completion`` + ``label`` (bool), or paired preference rows, each
    split into a desirable (chosen) and an undesirable (rejected) example, as TRL's
    ``unpair_preference_dataset`` does (``min_score_gap`` applies to those). Other
    arguments as for :func:`tokenize_preference`.
    """
    _check_options(truncation, on_bad_row, max_length)
    rows = map_columns(rows, columns)
    fmt = detect_format(rows, kind="unpaired")
    common = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation=truncation,
                  on_bad_row=on_bad_row, system_prompt=system_prompt)
    if fmt in PREFERENCE_FORMATS:
        pairs, stats = tokenize_preference(rows, tokenizer, format=fmt, min_score_gap=min_score_gap, **common)
        examples = [{"prompt_ids": p["prompt_ids"], "completion_ids": p[f"{side}_ids"], "label": side == "chosen"}
                    for p in pairs for side in ("chosen", "rejected")]
        stats.examples = len(examples)
        return examples, stats
    if min_score_gap is not None:
        raise DataError("data.min_score_gap filters paired rows (score_chosen/score_rejected); unpaired rows have none")
    _check_columns(rows, fmt)

    def one(row, stats):
        label = row.get("label")
        if not isinstance(label, (bool, np.bool_)):
            raise BadRow("bad_type", f"field 'label' must be true or false, got {label!r}")
        prompt, completion, conv = _prompt_and_response(row, "completion", _system(row, system_prompt))
        _check_response(completion, "completion", conv)
        prompt_ids, responses = _encode_prompt_responses(tokenizer, prompt, (completion,), conv)
        prompt_ids, (c_ids,), cut = _fit(prompt_ids, responses, tokenizer, max_length, max_prompt_length, truncation)
        stats.truncated += cut
        return {"prompt_ids": prompt_ids, "completion_ids": c_ids, "label": bool(label)}

    return _tokenize_rows(rows, fmt, on_bad_row, columns, one)


def tokenize_prompts(
    rows: Iterable[Mapping],
    tokenizer,
    *,
    max_prompt_length: int,
    truncation: str = "left",
    on_bad_row: str = "drop",
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> tuple[list[dict], DataStats]:
    """Prompts for online methods (RL, online DPO): ``[{"prompt_ids": int32 [P], "text": str}]``.

    The prompt is :func:`prompt_of` the row: a string is encoded with special tokens (like
    SFT's prompt piece), messages are rendered with the generation prompt. Longer than
    ``max_prompt_length`` tokens: ``truncation="left"`` keeps the last tokens (and BOS),
    counted in ``stats.truncated``; ``"skip"`` drops the row (reason ``too_long``).
    ``on_bad_row``, ``columns``, ``system_prompt``: as for :func:`tokenize_sft`.
    """
    _check_options(truncation, on_bad_row, None, ("left", "skip"), "prompt truncation")

    def one(row, stats):
        prompt = prompt_of(row, system_prompt)
        if isinstance(prompt, str):
            text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text = render_chat(tokenizer, prompt, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(ids, np.int32)
        if len(ids) > max_prompt_length:
            if truncation == "skip":
                raise BadRow("too_long", f"the prompt has {len(ids)} tokens, more than {max_prompt_length}")
            ids = _truncate_prompt(ids, max_prompt_length, tokenizer.bos_token_id)
            stats.truncated += 1
        return {"prompt_ids": ids, "text": text}

    return _tokenize_rows(map_columns(rows, columns), PROMPT_FORMAT, on_bad_row, columns, one)
