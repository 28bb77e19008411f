"""jaxalign: alignment (SFT, reward models, DPO, PPO, RLAIF) for causal LMs in JAX."""

from jaxalign.models import Model, ModelConfig, init_model, load_model
from jaxalign.parallel import MeshConfig, make_mesh

__version__ = "0.1.0"
__all__ = ["MeshConfig", "Model", "ModelConfig", "init_model", "load_model", "make_mesh"]
