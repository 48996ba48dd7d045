"""The device mesh and where every array lives on it.

Mesh axes ('data', 'fsdp', 'tensor'). The batch is split over ('data', 'fsdp') together. ZeRO-2:
parameters replicated, gradients and optimizer state sharded over the batch axes (each leaf along
its largest dimension that divides evenly; leaves too small to split stay replicated). FSDP
(`fsdp` > 1) also shards the parameters over 'fsdp'; `tensor` > 1 splits them Megatron-style by
their logical axes (`LOGICAL_AXIS_RULES`: attention heads and MLP columns; the fused q|k|v is
grouped by key/value head, so a split gives each device whole attention groups), leaving the
collectives to XLA's SPMD partitioner. A parameter whose head or MLP axis the tensor size does not
divide stays whole on every device (correct, just not split).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vlm2vec_jax.models.logical_axes import FUSED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, Axes
from vlm2vec_jax.training.chunks import row_axis

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical axis -> mesh axis. Heads and MLP columns go over 'tensor': a projection into them is
# column-parallel, one out of them row-parallel (one all-reduce after each attention and MLP).
LOGICAL_AXIS_RULES: tuple[tuple[str, str], ...] = ((HEADS, "tensor"), (KV_HEADS, "tensor"), (MLP, "tensor"))
# Never split: a scanned axis is sliced per layer, and a split one would be gathered every layer.
UNSPLIT_AXES = (LAYERS,)
# Not split by FSDP: within a head and across the fused slots (an FSDP split of head_dim made the
# partitioner reshard whole activations: 4.8x the device memory of the 2B recipe's dry run).
FSDP_WHOLE_AXES = (HEAD_DIM, FUSED)


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


def param_spec(axes: Axes, shape: Sequence[int], mesh: Mesh) -> P:
    """Parameter layout from its logical axes: 'tensor' on its first axis `LOGICAL_AXIS_RULES` maps
    there (when the tensor size divides it), 'fsdp' on the largest remaining even dimension that
    may be split."""
    spec: list[Any] = [None] * len(shape)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    rules = dict(LOGICAL_AXIS_RULES)
    if tensor > 1:
        for dim, name in enumerate(axes):
            if rules.get(name) == "tensor" and shape[dim] % tensor == 0:
                spec[dim] = "tensor"
                break
    if fsdp > 1:
        free = [shape[d] if spec[d] is None and axes[d] not in UNSPLIT_AXES + FSDP_WHOLE_AXES else 0 for d in range(len(shape))]
        dim = shard_dim(free, fsdp)
        if dim is not None:
            spec[dim] = "fsdp"
    return P(*spec)


def uses_shard_map(mesh: Mesh) -> bool:
    """Pure data parallelism runs the gradient pass per device in shard_map (one reduce-scatter per
    step); with sharded parameters XLA's partitioner inserts the gathers instead."""
    return mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1
