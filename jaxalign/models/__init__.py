"""Decoder-only LMs (Llama family), their configs, and HF checkpoint import/export."""

from jaxalign.models.config import ModelConfig, from_hf_dict, to_hf_dict
from jaxalign.models.model import Model, init_model, load_model, positions_from_mask

__all__ = ["Model", "ModelConfig", "from_hf_dict", "init_model", "load_model", "positions_from_mask", "to_hf_dict"]
