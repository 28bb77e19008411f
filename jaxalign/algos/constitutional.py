"""Constitutional AI (Bai et al., 2022): a constitution file, and the supervised critique ->
revision loop that turns red-team prompts into SFT data.

Supervised phase (:func:`critique_revise`): for each prompt the model answers; then, for
each round, it critiques its current answer under a principle drawn from the constitution
(the principle's ``critique_request``) and rewrites it (``revision_request``). The final
revisions become SFT rows (``prompt``/``completion``); a records file keeps every step.
RL phase: label pairs of the (SFT'd) model's samples with an AI judge under the same
constitution (:func:`jaxalign.algos.rlaif.label`, ``jaxalign label --policy ...``) and train
a reward model or DPO on the result.

Two prompt styles (``chat``):

* raw text (``chat=False``; the default when the tokenizer has no chat template): the
  ``answer`` / ``critique`` / ``revision`` templates below, filled with ``str.format``
  (fields ``{prompt}``, ``{response}``, ``{critique_request}``, ``{critique}``,
  ``{revision_request}``); few-shot examples are rendered with the same template followed
  by their answer and a blank line, and prepended.
* chat (``chat=True``; default when the tokenizer has a chat template): a conversation
  ``user: prompt / assistant: response / user: critique_request [/ assistant: critique /
  user: revision_request]`` rendered with the tokenizer's chat template; few-shot examples
  are whole earlier conversations (prompt, response, critique request, critique, revision
  request, revision). Templates are not used.

Constitution file (YAML), validated by :func:`load_constitution`::

    principles:                       # non-empty list
      - name: harmlessness            # unique
        critique_request: "..."
        revision_request: "..."
        judge_prompt: "..."           # optional (RLAIF judge); default: critique_request
    few_shot:                         # optional
      - {prompt, response, critique_request, critique, revision_request, revision}
    templates:                        # optional: judge, answer, critique, revision
      critique: "..."

The default constitution ships as ``jaxalign/assets/constitution.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import string
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.errors import ConfigError, DataError, closest
from jaxalign.parallel.rules import batch_size_multiple
from jaxalign.sampling import generate, left_pad, pad_token_id, stop_token_ids

log = logging.getLogger(__name__)

DEFAULT_CONSTITUTION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                    "constitution.yaml")

ANSWER_TEMPLATE = "Human: {prompt}\n\nAssistant:"
CRITIQUE_TEMPLATE = ("Human: {prompt}\n\nAssistant: {response}\n\n"
                     "Critique request: {critique_request}\n\nCritique:")
REVISION_TEMPLATE = ("Human: {prompt}\n\nAssistant: {response}\n\n"
                     "Critique request: {critique_request}\n\nCritique: {critique}\n\n"
                     "Revision request: {revision_request}\n\nRevision:")
# Text after which a raw-text generation is cut (the model starting the next turn itself).
STOP_STRINGS = ("\n\nHuman:", "\n\nAssistant:", "\n\nCritique request:", "\n\nCritique:",
                "\n\nRevision request:", "\n\nRevision:")

# template name -> the fields it may use
TEMPLATE_FIELDS = {
    "judge": ("prompt", "response_a", "response_b", "principle"),
    "answer": ("prompt",),
    "critique": ("prompt", "response", "critique_request"),
    "revision": ("prompt", "response", "critique_request", "critique", "revision_request"),
}
_PRINCIPLE_KEYS = ("name", "critique_request", "revision_request", "judge_prompt")
_PRINCIPLE_REQUIRED = ("name", "critique_request", "revision_request")
_FEW_SHOT_KEYS = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")


# ---------------------------------------------------------------------------- the constitution


@dataclasses.dataclass(frozen=True)
class Principle:
    name: str
    critique_request: str
    revision_request: str
    judge_prompt: str | None = None

    @property
    def judge_text(self) -> str:
        """The principle as an AI judge sees it: `judge_prompt`, else the critique request."""
        return self.judge_prompt or self.critique_request


@dataclasses.dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    few_shot: tuple[dict, ...] = ()
    templates: dict = dataclasses.field(default_factory=dict)
    source: str = "<dict>"

    def principle(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        names = [p.name for p in self.principles]
        close = closest(name, names, cutoff=0.6)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ConfigError(f"principle {name!r} is not in the constitution {self.source} "
                          f"(principles: {', '.join(names)}){hint}")

    def draw(self, n: int, seed: int = 0, name: str | None = None) -> list[Principle]:
        """`n` principles: all `name` if given, else drawn uniformly with a seeded RNG."""
        if name is not None:
            return [self.principle(name)] * n
        rng = random.Random(seed)
        return [rng.choice(self.principles) for _ in range(n)]

    def template(self, kind: str, default: str) -> str:
        return self.templates.get(kind) or default


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = closest(key, valid)
    return f" (did you mean {close!r}?)" if close else f" (valid keys: {', '.join(valid)})"


def check_template(template: str, kind: str, where: str = "") -> str:
    """Raise ConfigError if `template` uses a field that `kind` does not provide, or is malformed."""
    if not isinstance(template, str) or not template:
        raise ConfigError(f"{where or kind} template must be a non-empty string, got {template!r}")
    allowed = TEMPLATE_FIELDS[kind]
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{where or kind} template is malformed ({e}); write literal braces as '{{{{' and '}}}}'") from e
    for f in fields:
        base = f.split(".")[0].split("[")[0]
        if base not in allowed:
            raise ConfigError(f"{where or kind} template uses the field {{{f}}}, which is not available; "
                              f"the {kind} template can use: {', '.join('{' + a + '}' for a in allowed)}")
    return template


def _need_str(entry: Mapping, key: str, where: str, required: bool) -> str | None:
    value = entry.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where} is missing {key!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def constitution_from_dict(d: Any, source: str = "<dict>") -> Constitution:
    """Validate a parsed constitution; errors name the file, the entry (index and name) and the key."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"constitution {source}: the top level must be a mapping with a 'principles' list, "
                          f"got {type(d).__name__}")
    for key in d:
        if key not in ("principles", "few_shot", "templates"):
            raise ConfigError(f"constitution {source}: unknown top-level key {key!r}"
                              f"{_suggest(str(key), ('principles', 'few_shot', 'templates'))}")
    items = d.get("principles")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"constitution {source}: 'principles' must be a non-empty list of "
                          "{name, critique_request, revision_request[, judge_prompt]} entries")
    principles, seen = [], {}
    for i, entry in enumerate(items):
        where = f"constitution {source}: principles[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping with keys {', '.join(_PRINCIPLE_REQUIRED)}, got {entry!r}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        for key in entry:
            if key not in _PRINCIPLE_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), _PRINCIPLE_KEYS)}")
        values = {k: _need_str(entry, k, where, k in _PRINCIPLE_REQUIRED) for k in _PRINCIPLE_KEYS}
        if values["name"] in seen:
            raise ConfigError(f"{where}: the name {values['name']!r} is already used by principles[{seen[values['name']]}]")
        seen[values["name"]] = i
        principles.append(Principle(**values))
    shots = d.get("few_shot") or []
    if not isinstance(shots, list):
        raise ConfigError(f"constitution {source}: 'few_shot' must be a list of examples, got {type(shots).__name__}")
    few_shot = []
    for i, entry in enumerate(shots):
        where = f"constitution {source}: few_shot[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping with keys {', '.join(_FEW_SHOT_KEYS)}, got {entry!r}")
        for key in entry:
            if key not in _FEW_SHOT_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), _FEW_SHOT_KEYS)}")
        few_shot.append({k: _need_str(entry, k, where, True) for k in _FEW_SHOT_KEYS})
    templates = d.get("templates") or {}
    if not isinstance(templates, Mapping):
        raise ConfigError(f"constitution {source}: 'templates' must be a mapping of {', '.join(TEMPLATE_FIELDS)}")
    for kind, template in templates.items():
        if kind not in TEMPLATE_FIELDS:
            raise ConfigError(f"constitution {source}: templates.{kind} is not a template"
                              f"{_suggest(str(kind), tuple(TEMPLATE_FIELDS))}")
        check_template(template, kind, f"constitution {source}: templates.{kind}")
    return Constitution(tuple(principles), tuple(few_shot), dict(templates), source)


def load_constitution(path: str | Mapping | Constitution | None = None) -> Constitution:
    """A Constitution from a YAML file (None: the default one shipped with jaxalign), a dict, or as is."""
    if isinstance(path, Constitution):
        return path
    if isinstance(path, Mapping):
        return constitution_from_dict(path)
    import yaml

    from jaxalign.config import builtin_path

    path = builtin_path(path) if path is not None else DEFAULT_CONSTITUTION
    if not os.path.isfile(path):
        raise ConfigError(f"constitution file {path!r} does not exist")
    with open(path) as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"constitution {path} is not valid YAML: {e}") from e
    return constitution_from_dict(d, path)


# ---------------------------------------------------------------------------- files


def write_rows(path: str, rows: Sequence[Mapping]) -> str:
    """Write rows atomically (a temp file in the same directory, then `os.replace`): `.jsonl`,
    `.json` (a list) or `.parquet`. On any error the temp file is removed and `path` is untouched."""
    path = os.path.abspath(os.path.expanduser(path))
    ext = ".parquet" if path.endswith(".parquet") else ".json" if path.endswith(".json") else ".jsonl"
    if not path.endswith((".jsonl", ".json", ".parquet")):
        raise ConfigError(f"output {path!r}: use a .jsonl, .json or .parquet file name")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        if ext == ".parquet":
            os.close(fd)
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), tmp)
        else:
            with os.fdopen(fd, "w") as f:
                if ext == ".json":
                    json.dump([dict(r) for r in rows], f, ensure_ascii=False)
                else:
                    for r in rows:
                        f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_prompts(source, split: str = "train", max_rows: int | None = None, messages: bool = False) -> list:
    """Prompts from a dataset with a `prompt` column (or `.txt`: one per line); errors name the bad
    row. Strings, and with `messages=True` also chat messages (lists of `{role, content}`)."""
    if isinstance(source, str) and source.endswith(".txt"):
        if not os.path.isfile(source):
            raise DataError(f"prompts file {source!r} does not exist")
        with open(source) as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        from jaxalign.config import builtin_path
        from jaxalign.data import column_names, load_rows
        from jaxalign.data.formats import is_conversational

        rows = load_rows(builtin_path(source) if isinstance(source, str) else source, split=split)
        if "prompt" not in column_names(rows):
            raise DataError(f"{source}: needs a 'prompt' column; found columns {sorted(column_names(rows))}")
        prompts = []
        for i, row in enumerate(rows):
            if max_rows is not None and i >= max_rows:
                break
            p = row.get("prompt")
            if messages and is_conversational(p):
                p = [{"role": m["role"], "content": m["content"]} for m in p]
            elif not isinstance(p, str) or not p.strip():
                kinds = "a non-empty string or a list of {role, content} messages" if messages else "a non-empty string"
                raise DataError(f"{source}: row {i} has no prompt (prompt={p!r}); every row needs {kinds}")
            prompts.append(p)
    if max_rows is not None:
        prompts = prompts[:max_rows]
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts


# ---------------------------------------------------------------------------- generation


@dataclasses.dataclass
class Generations:
    """Per prompt: generated token ids (up to and including the stop token) and the text."""

    tokens: list[np.ndarray]
    texts: list[str]
    ended: list[bool]


def generate_texts(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                   batch_size: int = 8, stop_strings: Sequence[str] = (), what: str = "prompt") -> Generations:
    """Sample (or, with temperature 0, greedily decode) a completion per prompt, in fixed-size
    batches (few recompiles). Texts are decoded without special tokens and cut at the first
    of `stop_strings`. A prompt that leaves no room for `max_new_tokens` is an error naming it."""
    import jax

    stop = stop_token_ids(model.config, tokenizer)
    pad = pad_token_id(model.config, tokenizer, stop)
    limit = model.config.max_position_embeddings
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise DataError(f"{what} {i} is empty after tokenization")
        if len(ids) + max_new_tokens > limit:
            raise DataError(f"{what} {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                            f"model's context of {limit} tokens: shorten it or lower max_new_tokens")
    m = batch_size_multiple(model.mesh)
    batch = -(-max(1, min(batch_size, len(prompt_ids))) // m) * m
    rng = jax.random.key(seed)
    tokens, texts, ended = [], [], []
    for start in range(0, len(prompt_ids), batch):
        chunk = [list(r) for r in prompt_ids[start:start + batch]]
        ids, mask = left_pad(chunk, pad, batch=batch, multiple=16)
        rng, key = jax.random.split(rng)
        out = generate(model, ids, mask, key, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, eos_token_ids=stop, pad_token_id=pad)
        toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for i in range(len(chunk)):
            t = toks[i, :lengths[i]]
            text = tokenizer.decode(t, skip_special_tokens=True)
            cut = [text.find(s) for s in stop_strings if s and s in text]
            if cut:
                text = text[:min(cut)]
            tokens.append(t)
            texts.append(text.strip())
            ended.append(bool(len(t)) and int(t[-1]) in stop)
    return Generations(tokens, texts, ended)


def use_chat(tokenizer, chat: bool | str | None) -> bool:
    """`chat` = True/False, or "auto"/None: the tokenizer's chat template when it has one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat in (None, "auto"):
        return has
    if chat and not has:
        raise ConfigError("chat prompts were requested but the tokenizer has no chat template; use raw text templates")
    return bool(chat)


def encode_text(tokenizer, text: str, chat: bool) -> list[int]:
    """Chat-rendered text carries its own special tokens; raw text gets the tokenizer's (BOS)."""
    return list(tokenizer.encode(text, add_special_tokens=not chat))


def render_messages(tokenizer, messages: Sequence[Mapping]) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------- supervised phase


@dataclasses.dataclass
class CAISettings:
    """Sampling and prompting settings of the critique -> revision loop.

    temperature 0 = greedy. revisions: critique/revise rounds per prompt (each round draws
    a principle; round r critiques round r-1's revision). principle: use this one for every
    round (default: draw uniformly, seeded). chat: True / False / "auto" (see the module
    docstring). templates: override the constitution's / default answer, critique, revision
    templates (raw text mode). use_few_shot: prepend the constitution's examples.
    """

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8
    seed: int = 0
    revisions: int = 1
    principle: str | None = None
    chat: bool | str = "auto"
    templates: dict = dataclasses.field(default_factory=dict)
    use_few_shot: bool = True
    stop_strings: tuple[str, ...] = STOP_STRINGS


@dataclasses.dataclass
class CAIResult:
    sft_rows: list[dict]
    records: list[dict]


def _templates(constitution: Constitution, settings: CAISettings) -> dict:
    out = {"answer": ANSWER_TEMPLATE, "critique": CRITIQUE_TEMPLATE, "revision": REVISION_TEMPLATE}
    out.update({k: v for k, v in constitution.templates.items() if k in out})
    for kind, t in settings.templates.items():
        if kind not in out:
            raise ConfigError(f"unknown CAI template {kind!r}; choose from: answer, critique, revision")
        out[kind] = check_template(t, kind)
    return out


def _raw_few_shot(examples, template: str, answer_key: str) -> str:
    return "".join(template.format(**{k: ex[k] for k in ex if k != answer_key}) + " " + ex[answer_key] + "\n\n"
                   for ex in examples)


def _chat_few_shot(examples) -> list[dict]:
    msgs = []
    for ex in examples:
        msgs += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]},
                 {"role": "user", "content": ex["critique_request"]}, {"role": "assistant", "content": ex["critique"]},
                 {"role": "user", "content": ex["revision_request"]}, {"role": "assistant", "content": ex["revision"]}]
    return msgs


def _completion_after(prompt_text: str, completion: str) -> str:
    """Completion text for an SFT row whose raw prompt ends right before the answer."""
    return completion if not prompt_text or prompt_text[-1].isspace() else " " + completion


def critique_revise(model, tokenizer, prompts: Sequence[str], constitution=None,
                    settings: CAISettings | None = None) -> CAIResult:
    """Run the CAI supervised loop; returns SFT rows and one record per (prompt, round).

    SFT rows: raw mode `{"prompt": <answer prompt>, "completion": <final revision>}` (strings,
    what the model sees at inference); chat mode `{"prompt": [user msg], "completion":
    [assistant msg]}` (conversational prompt/completion). Records: `prompt`, `round`,
    `answer_prompt`, `initial_answer` (the response critiqued in this round), `principle`,
    `critique_prompt`, `critique`, `revision_prompt`, `revision`.
    """
    s = settings or CAISettings()
    c = load_constitution(constitution)
    if s.revisions < 1:
        raise ConfigError(f"revisions must be >= 1, got {s.revisions}")
    chat = use_chat(tokenizer, s.chat)
    templates = _templates(c, s)
    shots = c.few_shot if s.use_few_shot else ()
    gen = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
               batch_size=s.batch_size, stop_strings=() if chat else s.stop_strings)
    prompts = list(prompts)
    n = len(prompts)
    if chat:
        answer_prompts = [render_messages(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        answer_prompts = [templates["answer"].format(prompt=p) for p in prompts]
    encode = lambda texts: [encode_text(tokenizer, t, chat) for t in texts]  # noqa: E731
    log.info("CAI: answering %d prompts", n)
    responses = generate_texts(model, tokenizer, encode(answer_prompts), seed=s.seed, what="answer prompt", **gen).texts
    records = []
    for r in range(s.revisions):
        principles = c.draw(n, seed=s.seed + 1000 * (r + 1), name=s.principle)
        if chat:
            few = _chat_few_shot(shots)
            convs = [few + [{"role": "user", "content": p}, {"role": "assistant", "content": resp},
                            {"role": "user", "content": pr.critique_request}]
                     for p, resp, pr in zip(prompts, responses, principles)]
            critique_prompts = [render_messages(tokenizer, conv) for conv in convs]
        else:
            prefix = _raw_few_shot(shots, templates["critique"], "critique")
            critique_prompts = [prefix + templates["critique"].format(prompt=p, response=resp,
                                                                      critique_request=pr.critique_request)
                                for p, resp, pr in zip(prompts, responses, principles)]
        log.info("CAI round %d: critiques", r + 1)
        critiques = generate_texts(model, tokenizer, encode(critique_prompts), seed=s.seed + 2 * r + 1,
                                   what="critique prompt", **gen).texts
        if chat:
            revision_prompts = [render_messages(tokenizer, conv + [
                {"role": "assistant", "content": crit}, {"role": "user", "content": pr.revision_request}])
                for conv, crit, pr in zip(convs, critiques, principles)]
        else:
            prefix = _raw_few_shot(shots, templates["revision"], "revision")
            revision_prompts = [prefix + templates["revision"].format(
                prompt=p, response=resp, critique_request=pr.critique_request, critique=crit,
                revision_request=pr.revision_request)
                for p, resp, crit, pr in zip(prompts, responses, critiques, principles)]
        log.info("CAI round %d: revisions", r + 1)
        revisions = generate_texts(model, tokenizer, encode(revision_prompts), seed=s.seed + 2 * r + 2,
                                   what="revision prompt", **gen).texts
        for i in range(n):
            records.append({"prompt": prompts[i], "round": r + 1, "answer_prompt": answer_prompts[i],
                            "initial_answer": responses[i], "principle": principles[i].name,
                            "critique_prompt": critique_prompts[i], "critique": critiques[i],
                            "revision_prompt": revision_prompts[i], "revision": revisions[i]})
        responses = revisions
    if chat:
        sft = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": rev}]}
               for p, rev in zip(prompts, responses)]
    else:
        sft = [{"prompt": ap, "completion": _completion_after(ap, rev)} for ap, rev in zip(answer_prompts, responses)]
    empty = sum(not rev.strip() for rev in responses)
    if empty:
        log.warning("CAI: %d of %d final revisions are empty (the SFT loader drops such rows)", empty, n)
    return CAIResult(sft, records)


def run_cai(model_dir: str, prompts, out: str, records_out: str | None = None, constitution=None,
            settings: CAISettings | None = None, *, dtype=None, mesh=None, split: str = "train",
            max_rows: int | None = None) -> dict:
    """Load a model (tokenizer from its dir), run :func:`critique_revise` on `prompts` (a dataset
    with a `prompt` column, a .txt file, or a list of strings), write the SFT rows to `out` and
    the records to `records_out` (default: `out` with `.records.jsonl`), both atomically."""
    from jaxalign.data import load_tokenizer
    from jaxalign.models import load_model

    texts = list(prompts) if isinstance(prompts, (list, tuple)) else read_prompts(prompts, split, max_rows)
    c = load_constitution(constitution)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype, mesh=mesh)
    result = critique_revise(model, tokenizer, texts, c, settings)
    records_out = records_out or _records_path(out)
    write_rows(records_out, result.records)
    path = write_rows(out, result.sft_rows)
    return {"sft": path, "records": os.path.abspath(records_out), "rows": len(result.sft_rows)}


def _records_path(out: str) -> str:
    for ext in (".jsonl", ".json", ".parquet"):
        if out.endswith(ext):
            return out[: -len(ext)] + ".records.jsonl"
    return out + ".records.jsonl"


# ---------------------------------------------------------------------------- CLI: jaxalign cai


def add_arguments(parser) -> None:
    parser.description = ("Constitutional AI, supervised phase: answer red-team prompts, critique and revise the "
                          "answers under principles of a constitution; write SFT data + a records file.")
    parser.add_argument("model", help="HF model directory (config.json, *.safetensors, tokenizer files)")
    parser.add_argument("--prompts", required=True,
                        help="prompts: jsonl/json/parquet or Hub dataset with a 'prompt' column, or a .txt file")
    parser.add_argument("--out", required=True, help="SFT output (.jsonl, .json or .parquet): prompt/completion rows")
    parser.add_argument("--records", default=None, help="records output (default: OUT with .records.jsonl)")
    parser.add_argument("--constitution", default=None, help="constitution YAML (default: the shipped one)")
    parser.add_argument("--principle", default=None, help="use this principle for every round (default: random)")
    parser.add_argument("--revisions", type=int, default=1, help="critique/revision rounds per prompt")
    parser.add_argument("--chat", choices=("auto", "true", "false"), default="auto",
                        help="chat-template conversations (auto: when the tokenizer has a template)")
    for kind in ("answer", "critique", "revision"):
        parser.add_argument(f"--{kind}-template", default=None,
                            help=f"raw-text {kind} template (a string, or @FILE), fields: "
                                 + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS[kind]))
    parser.add_argument("--no-few-shot", action="store_true", help="do not prepend the constitution's examples")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,1,8 (default: one device)")


def read_text_arg(value: str | None) -> str | None:
    """`@path` -> the file's text; anything else as is."""
    if value is None or not value.startswith("@"):
        return value
    if not os.path.isfile(value[1:]):
        raise ConfigError(f"template file {value[1:]!r} does not exist")
    with open(value[1:]) as f:
        return f.read()


def parse_mesh(value: str | None):
    if not value:
        return None
    import jaxalign as ja

    try:
        sizes = tuple(int(x) for x in value.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise ConfigError(f"--mesh {value!r}: expected three integers data,fsdp,tensor (e.g. 1,1,8)")
    return ja.make_mesh(sizes)


def run(args) -> dict:
    """`jaxalign cai`."""
    templates = {k: read_text_arg(getattr(args, f"{k}_template")) for k in ("answer", "critique", "revision")}
    settings = CAISettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           batch_size=args.batch_size, seed=args.seed, revisions=args.revisions,
                           principle=args.principle, chat={"auto": "auto", "true": True, "false": False}[args.chat],
                           templates={k: v for k, v in templates.items() if v}, use_few_shot=not args.no_few_shot)
    info = run_cai(args.model, args.prompts, args.out, args.records, args.constitution, settings, dtype=args.dtype,
                   mesh=parse_mesh(args.mesh), split=args.split, max_rows=args.max_rows)
    print(f"wrote {info['rows']} SFT rows to {info['sft']} and the records to {info['records']}")
    return info


__all__ = ["ANSWER_TEMPLATE", "CAIResult", "CAISettings", "CRITIQUE_TEMPLATE", "Constitution", "DEFAULT_CONSTITUTION",
           "Principle", "REVISION_TEMPLATE", "check_template", "constitution_from_dict", "critique_revise",
           "generate_texts", "load_constitution", "read_prompts", "run_cai", "write_rows"]
