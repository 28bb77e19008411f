"""Logit parity with transformers' PyTorch implementation, and export round trips."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import transformers

import jaxalign as ja

FAMILY_CASES = {
    "llama": dict(),
    "llama-rope3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                        rope_theta=500000.0),
    "llama-linear-rope-bias": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
                                   mlp_bias=True),
    "llama-tied": dict(tie_word_embeddings=True),
    "mistral-swa": dict(sliding_window=4),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=16),
}


def batch(seed=0, b=3, t=12, vocab=128):
    """Random ids with one left-padded and one right-padded row; positions as HF generate makes them."""
    ids = np.random.RandomState(seed).randint(0, vocab, (b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, pos


def torch_logits(model, ids, mask, pos):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def assert_close_on_real(out, ref, mask, rel=1e-4):
    real = mask.astype(bool)
    scale = np.abs(ref[real]).max()
    err = np.abs(out[real] - ref[real]).max()
    assert err <= rel * scale, f"max abs err {err} > {rel} x logit scale {scale}"


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_logits_match_transformers(hf_model, case):
    family = case.split("-")[0]
    torch_model, path = hf_model(family, **FAMILY_CASES[case])
    ids, mask, pos = batch()
    ref = torch_logits(torch_model, ids, mask, pos)
    model = ja.load_model(path, dtype="float32")
    out = np.asarray(model.logits(ids, mask))
    assert out.shape == ref.shape
    assert_close_on_real(out, ref, mask)


def test_sliding_window_is_applied(hf_model):
    """Mistral's window changes the logits; dropping it must break parity (the test can fail)."""
    torch_model, path = hf_model("mistral", sliding_window=3)
    ids, mask, pos = batch()
    ref = torch_logits(torch_model, ids, mask, pos)
    model = ja.load_model(path, dtype="float32")
    no_window = dataclasses.replace(model, config=dataclasses.replace(model.config, sliding_window=None))
    diff = np.abs(np.asarray(no_window.logits(ids, mask)) - ref)[mask.astype(bool)].max()
    assert diff > 1e-3
    assert_close_on_real(np.asarray(model.logits(ids, mask)), ref, mask)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_export_reloads_in_transformers(hf_model, tmp_path, family):
    _, path = hf_model(family)
    model = ja.load_model(path, dtype="float32")
    out_dir = str(tmp_path / "export")
    model.save_pretrained(out_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids, mask, pos = batch(seed=1)
    assert_close_on_real(np.asarray(model.logits(ids, mask)), torch_logits(reloaded, ids, mask, pos), mask)
    again = ja.load_model(out_dir, dtype="float32")
    assert again.config == model.config


def test_sharded_export_with_index(hf_model, tmp_path):
    _, path = hf_model("llama")
    model = ja.load_model(path)
    out_dir = str(tmp_path / "sharded")
    model.save_pretrained(out_dir, max_shard_bytes=20_000)
    index = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    ids, mask, _ = batch()
    np.testing.assert_allclose(ja.load_model(out_dir).logits(ids, mask), model.logits(ids, mask), atol=1e-6)


@pytest.mark.parametrize("ckpt_dtype,rope_key", [(torch.bfloat16, "rope_scaling"), (torch.float16, "rope_parameters")])
def test_half_precision_checkpoints_and_config_layouts(hf_model, tmp_path, ckpt_dtype, rope_key):
    """bf16/fp16 tensors load; old (rope_scaling + rope_theta, torch_dtype) and new config layouts parse."""
    _, path = hf_model("llama", dtype=ckpt_dtype, rope_theta=5000.0)
    cfg = json.load(open(os.path.join(path, "config.json")))
    if rope_key == "rope_scaling":  # rewrite as an old transformers would have written it
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"], cfg["rope_scaling"] = 5000.0, None
        cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    model = ja.load_model(path)
    assert model.config.param_dtype == {torch.bfloat16: "bfloat16", torch.float16: "float16"}[ckpt_dtype]
    assert model.config.rope.theta == 5000.0
    model32 = ja.load_model(path, dtype="float32")
    ids, mask, pos = batch()
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_close_on_real(np.asarray(model32.logits(ids, mask)), torch_logits(reference, ids, mask, pos), mask)


def test_bf16_compute_close_to_fp32(hf_model):
    _, path = hf_model("llama")
    ids, mask, _ = batch()
    ref = np.asarray(ja.load_model(path, dtype="float32").logits(ids, mask))
    bf = ja.load_model(path, dtype="float32", compute_dtype="bfloat16")
    out = np.asarray(bf.logits(ids, mask))
    real = mask.astype(bool)
    assert np.isfinite(out).all()
    rel = np.abs(out - ref)[real].max() / np.abs(ref[real]).max()
    assert rel < 0.05, rel
    agree = (out.argmax(-1) == ref.argmax(-1))[real].mean()
    assert agree > 0.9


def test_remat_and_scan_do_not_change_logits(hf_model):
    _, path = hf_model("qwen3")
    ids, mask, _ = batch()
    plain = ja.load_model(path)
    remat = ja.load_model(path, remat="full")
    np.testing.assert_allclose(plain.logits(ids, mask), remat.logits(ids, mask), atol=1e-6)


def test_model_is_a_frozen_dataclass(hf_model):
    _, path = hf_model("llama")
    model = ja.load_model(path)
    zeroed = dataclasses.replace(model, params={**model.params, "lm_head": {"kernel": model.params["lm_head"]["kernel"] * 0}})
    assert np.abs(np.asarray(zeroed.logits([[1, 2, 3]]))).max() == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.params = {}
