"""Building blocks: the weight seams, attention, rotary embeddings, norms."""

from jaxalign.nn.attention import attention, attention_mask, dot_product_attention, make_mask
from jaxalign.nn.norms import rms_norm
from jaxalign.nn.rope import RopeConfig, apply_rope, cos_sin
from jaxalign.nn.seams import dense, embed, is_weight_type, linear

__all__ = [
    "RopeConfig", "apply_rope", "attention", "attention_mask", "cos_sin", "dense",
    "dot_product_attention", "embed", "is_weight_type", "linear", "make_mask", "rms_norm",
]
