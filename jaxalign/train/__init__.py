"""The one generic training loop: state, jitted step, checkpoints, metrics, eval, export."""

from jaxalign.train.loop import train

__all__ = ["train"]
