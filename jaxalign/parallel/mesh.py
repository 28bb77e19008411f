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
    """Sizes of the mesh axes (the run config's `mesh:` section); one of data/fsdp/tensor
    may be -1 (takes the remaining devices).

    data/fsdp/tensor are the total sizes. For slices (TPU multislice) or hosts joined by a
    slower network (DCN), dcn_* split an axis into dcn_* (outer, across slices) x
    size/dcn_* (inner, within a slice over ICI/NVLink). Any dcn_* > 1 builds a hybrid mesh;
    their product must equal the number of slices (or of processes, where devices have no
    slice index).
    """

    data: int = -1  # data-parallel axis: batch rows split over it
    fsdp: int = 1  # batch rows and params (ZeRO-3 style) split over it
    tensor: int = 1  # tensor-parallel axis: attention heads and MLP columns split over it
    # Hybrid (multi-slice / multi-host) meshes: how many slices each axis spans (see make_mesh).
    dcn_data: int = 1  # slices the data axis spans
    dcn_fsdp: int = 1  # slices the fsdp axis spans
    dcn_tensor: int = 1  # slices the tensor axis spans

    @property
    def dcn(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)

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


def _granules(devices) -> tuple[str, list[list]]:
    """Devices grouped by slice (TPU multislice: devices carry distinct `slice_index`), else by process."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    attr = "slice_index" if None not in slices and len(slices) > 1 else "process_index"
    groups: dict = {}
    for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
    return ("slices" if attr == "slice_index" else "processes"), [groups[k] for k in sorted(groups)]


def hybrid_grid(shape: tuple[int, int, int], dcn: tuple[int, int, int], devices) -> np.ndarray:
    """Device grid of `shape` whose axes are dcn (outer, across slices/processes) x ici (inner).

    Validates that the dcn sizes divide the axes, that their product is the number of
    slices (or processes), and that the rest fills each slice exactly.
    """
    kind, granules = _granules(devices)
    kind = kind if len(granules) != 1 else kind[:-1] if kind == "slices" else "process"
    names = ("data", "fsdp", "tensor")
    if any(d < 1 for d in dcn):
        raise ShardingError(f"mesh dcn sizes {dict(zip(names, dcn))} must be positive")
    if math.prod(dcn) != len(granules):
        raise ShardingError(
            f"mesh dcn_data={dcn[0]} x dcn_fsdp={dcn[1]} x dcn_tensor={dcn[2]} = {math.prod(dcn)}, but the "
            f"{len(devices)} devices form {len(granules)} {kind}; make the dcn product equal {len(granules)} "
            "(dcn_* = 1 everywhere for a plain mesh)"
        )
    for name, size, d in zip(names, shape, dcn):
        if size % d:
            raise ShardingError(f"mesh {name}={size} is not divisible by dcn_{name}={d}; the axis is split into "
                                f"dcn_{name} groups across {kind}")
    ici = tuple(s // d for s, d in zip(shape, dcn))
    sizes = {len(g) for g in granules}
    if len(sizes) != 1 or math.prod(ici) != len(granules[0]):
        raise ShardingError(
            f"mesh inside each of the {len(granules)} {kind}: data={ici[0]} x fsdp={ici[1]} x tensor={ici[2]} = "
            f"{math.prod(ici)} devices, but each has {sorted(sizes)} devices; pick mesh sizes whose quotient "
            "by dcn_* covers one slice/process"
        )
    try:
        from jax.experimental import mesh_utils

        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                                    process_is_granule=not kind.startswith("slice"))
    except (ValueError, NotImplementedError, AssertionError):
        blocks = np.empty(dcn, dtype=object)
        for i, idx in enumerate(np.ndindex(*dcn)):
            blocks[idx] = np.asarray(granules[i], dtype=object).reshape(ici)
        return np.block(blocks.tolist())


def make_mesh(config: MeshConfig | tuple[int, ...] | None = None, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes ("data", "fsdp", "tensor").

    With any `dcn_*` > 1 the mesh is hybrid: each axis is dcn_* groups across slices
    (or processes) times size/dcn_* devices within one (`hybrid_grid`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if config is None:
        config = MeshConfig()
    elif not isinstance(config, MeshConfig):
        config = MeshConfig(*config)
    shape = config.resolve(len(devices))
    if any(d != 1 for d in config.dcn):
        return Mesh(hybrid_grid(shape, config.dcn, devices), MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
