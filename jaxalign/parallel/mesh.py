"""Device meshes with the axes (data, fsdp, tensor)."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxalign.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (takes the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, tensor) sizes for `num_devices` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1:
            raise ShardingError(f"mesh {self}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ShardingError(f"mesh {self}: axis sizes must be positive (or -1 for 'the rest')")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(
                    f"mesh {self}: {num_devices} devices are not divisible by the fixed axes' product {known}; "
                    "pick axis sizes whose product divides the device count"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ShardingError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                f"but {num_devices} are available; make the product equal {num_devices} "
                "(or set one axis to -1 to absorb the rest)"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig | tuple[int, int, int] | None = None, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes ("data", "fsdp", "tensor")."""
    devices = list(jax.devices() if devices is None else devices)
    if config is None:
        config = MeshConfig()
    elif not isinstance(config, MeshConfig):
        config = MeshConfig(*config)
    shape = config.resolve(len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
