"""Meshes and sharding rules."""

from jaxalign.parallel.mesh import MESH_AXES, MeshConfig, make_mesh
from jaxalign.parallel.rules import (
    RULES, batch_sharding, logical_axes, named_shardings, partition_specs, path_str, spec_for,
)

__all__ = [
    "MESH_AXES", "MeshConfig", "RULES", "batch_sharding", "logical_axes", "make_mesh",
    "named_shardings", "partition_specs", "path_str", "spec_for",
]
