"""Tiny random Hugging Face checkpoints of each supported family, made locally."""

import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def make_hf_model(path, family="llama", seed=0, dtype=torch.float32, **overrides):
    """Save a random tiny `family` model (norms and biases randomized too) to `path`."""
    cfg = FAMILIES[family](**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model = model.to(dtype)
    model.save_pretrained(path)
    return model, path
