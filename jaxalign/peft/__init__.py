"""Parameter-efficient fine-tuning as parameter-tree transforms: LoRA adapters
(`lora`) and weight quantization (`quant`); QLoRA is both."""

from jaxalign.peft import lora, quant
from jaxalign.peft.lora import LoraWeight
from jaxalign.peft.quant import QuantizedWeight

__all__ = ["LoraWeight", "QuantizedWeight", "lora", "quant"]
