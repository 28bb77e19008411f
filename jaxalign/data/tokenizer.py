"""The embedded character-level tokenizer, and loading/preparing any tokenizer.

The embedded tokenizer (``jaxalign/assets/tiny``) is built with the ``tokenizers``
library: one token per printable ASCII character (plus ``\\n`` and ``\\t``), and the
special tokens below. It is saved as ``tokenizer.json`` + ``tokenizer_config.json``
(with a ``chat_template``) so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads
it offline. Encoding adds ``<s>`` in front (``add_special_tokens=True``), like Llama.

Chat template (Zephyr-like, no newlines so masks are easy to read)::

    <s><|system|>...</s><|user|>...</s><|assistant|>...</s>

``add_generation_prompt=True`` appends ``<|assistant|>``. Every turn ends with ``</s>``
(the EOS token), so a model trained on assistant turns learns to stop.
"""

from __future__ import annotations

import json
import os
import string
from typing import Any

from jaxalign.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK) + ROLE_TOKENS
# Printable ASCII without the vertical tab, form feed and carriage return.
CHARACTERS = tuple(c for c in string.printable if c not in "\x0b\x0c\r")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MODEL_MAX_LENGTH = 512


def build_tokenizer():
    """Build the embedded character-level tokenizer as a ``tokenizers.Tokenizer``.

    Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, 4-6 the role markers, then one id
    per character of :data:`CHARACTERS` (vocab size 104). Deterministic: no training.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character is its own "word"; special tokens are matched before this runs.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def tokenizer_config() -> dict[str, Any]:
    """The ``tokenizer_config.json`` written next to ``tokenizer.json``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": list(ROLE_TOKENS),
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(out_dir: str) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"), pretty=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2, sort_keys=True)
        f.write("\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
               "additional_special_tokens": list(ROLE_TOKENS)}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2, sort_keys=True)
        f.write("\n")


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token if it lacks one (uses EOS, as most Llama recipes do).

    Padding positions are always masked out (``attention_mask``/``loss_mask`` = 0), so the
    pad id's value does not matter for the loss. Returns the same tokenizer.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError(
                "tokenizer has neither a pad token nor an EOS token; set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) (and resize the embeddings)"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str | None = None, **kwargs):
    """Load a tokenizer with ``AutoTokenizer`` (``None``: the embedded tiny tokenizer).

    ``path`` is a local directory, a ``.gguf`` file (its converted directory, see
    ``jaxalign.models.gguf.resolve``) or a Hub name (offline runs need a local copy).
    The result always has a pad token (see :func:`ensure_pad_token`).
    """
    from transformers import AutoTokenizer

    if path is None:
        from jaxalign.data.tasks import quickstart_dir

        path = quickstart_dir()
    from jaxalign.models.gguf import resolve

    path = resolve(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        hint = (
            "the directory needs tokenizer.json (or the slow-tokenizer files) and tokenizer_config.json"
            if os.path.isdir(path)
            else "pass a local directory, or download the tokenizer first (no network here?)"
        )
        raise DataError(f"cannot load tokenizer from {path!r}: {e}; {hint}") from e
    return ensure_pad_token(tok)
