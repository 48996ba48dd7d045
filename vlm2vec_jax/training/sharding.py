"""The device mesh and where every array lives on it.

Mesh axes ('data', 'fsdp', 'tensor'). The batch is split over ('data', 'fsdp') together. ZeRO-2:
parameters replicated, gradients and optimizer state sharded over the batch axes (each leaf along
its largest dimension that divides evenly; leaves too small to split stay replicated). FSDP
(`fsdp` > 1) also shards the parameters over 'fsdp'; `tensor` > 1 splits kernels Megatron-style
(column-parallel in, row-parallel out), leaving the collectives to XLA's SPMD partitioner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vlm2vec_jax.training.chunks import row_axis

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Kernels split along their output (column-parallel) or input (row-parallel) axis over 'tensor'.
COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj", "qkv", "fc1")
ROW_PARALLEL = ("o_proj", "down_proj", "proj", "fc2")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices; one axis size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)}: use positive sizes and at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into fsdp x tensor = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {int(np.prod(sizes))} devices; there are {len(devices)}")
    # Auto axes: jax 0.10 defaults to Explicit, under which sharding constraints raise
    # (docs/reference.md, "JAX and grain pitfalls").
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_size_of(mesh: Mesh) -> int:
    """Devices the batch is split over."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, key: str, ndim: int) -> NamedSharding:
    """Rows of a batch array split over the batch axes."""
    spec = [None] * ndim
    spec[row_axis(key)] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def shard_dim(shape: Sequence[int], parts: int, skip: int = 0) -> int | None:
    """The largest dimension (from `skip` on) that `parts` divides, or None."""
    best = None
    for d in range(skip, len(shape)):
        if shape[d] % parts == 0 and shape[d] >= parts and (best is None or shape[d] > shape[best]):
            best = d
    return best


def zero2_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """Gradient / optimizer-state layout: split over the batch axes along the largest even dimension."""
    dim = shard_dim(shape, batch_size_of(mesh))
    if dim is None or batch_size_of(mesh) == 1:
        return P()
    spec: list[Any] = [None] * len(shape)
    spec[dim] = BATCH_AXES
    return P(*spec)


def param_spec(path: tuple[str, ...], shape: Sequence[int], mesh: Mesh, stacked: bool) -> P:
    """Parameter layout: replicated, plus 'tensor' on Megatron's axis and 'fsdp' on the largest
    remaining even dimension. `stacked` leaves (scanned layers) never split their layer axis."""
    spec: list[Any] = [None] * len(shape)
    names = set(path)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tensor > 1 and path[-1] == "kernel" and len(shape) >= 2:
        dim = len(shape) - (1 if names & set(COLUMN_PARALLEL) else 2 if names & set(ROW_PARALLEL) else len(shape) + 1)
        if 0 <= dim < len(shape) and shape[dim] % tensor == 0:
            spec[dim] = "tensor"
    if fsdp > 1:
        free = [d for d in range(int(stacked), len(shape)) if spec[d] is None]
        dim = shard_dim([shape[d] if d in free else 0 for d in range(len(shape))], fsdp)
        if dim is not None and dim in free:
            spec[dim] = "fsdp"
    return P(*spec)


def uses_shard_map(mesh: Mesh) -> bool:
    """Pure data parallelism runs the gradient pass per device in shard_map (one reduce-scatter per
    step); with sharded parameters XLA's partitioner inserts the gathers instead."""
    return mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1
