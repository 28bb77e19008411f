"""jaxalign: alignment (SFT, reward models, DPO, PPO, RLAIF) for causal LMs in JAX."""

from jaxalign.sampling import GenerationOutput, generate
from jaxalign.models import Model, ModelConfig, init_model, load_model
from jaxalign.parallel import MeshConfig, make_mesh
from jaxalign.peft import lora, quant
from jaxalign import losses, rl

__version__ = "0.1.0"
__all__ = ["GenerationOutput", "generate", "MeshConfig", "Model", "ModelConfig", "init_model", "load_model", "lora",
           "losses", "make_mesh", "quant", "rl"]
