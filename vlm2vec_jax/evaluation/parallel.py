"""Encoding data-parallel over every device of every host.

Each host takes a strided share of the items (item i goes to host i % process_count), encodes it
with the Embedder's own length-bucketed batches, each batch split over a 1-D mesh of the host's
devices, and the shares are gathered so every host ends with all vectors in item order.

Why a per-host mesh rather than one global program: a global SPMD step needs every host to feed
batches of the same shape at every step, but batch shapes follow the data (text length and image
buckets), which differ between shares. Host-local programs need no agreement; the only collective
is the final gather. The weights are replicated on every local device for the duration; weights
sharded across hosts (FSDP training) are gathered first.

A batch is split along its rows when the device count divides them (the text side) and along its
packed vision rows likewise; otherwise that array is replicated. The jitted forward is SPMD: where
XLA needs a vision row on another device it moves it, so the vectors equal the one-device ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vlm2vec_jax.embedder import Embedder, Item, embed_program

__all__ = ["DATA_AXIS", "DataParallelEmbedder", "host_local_copy"]

DATA_AXIS = "data"
# position_ids is (3, B, L); every other array of a batch has its rows first.
_ROW_AXIS = {"position_ids": 1}


def host_local_copy(x: Any) -> np.ndarray | jax.Array:
    """`x` usable by a host-local program: as it is when this host holds all of it, else gathered
    from the other hosts (every host must call this for such arrays)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x
    return multihost_utils.process_allgather(x, tiled=True)


class DataParallelEmbedder(Embedder):
    """`embedder` with its batches split over this host's devices and its items over all hosts.

    `encode` keeps `Embedder.encode`'s contract (vectors in item order, on every host); with
    several processes every host must call it with the same items.
    """

    def __init__(self, embedder: Embedder, devices: Sequence[jax.Device] | None = None) -> None:
        super().__init__(
            embedder.model, embedder.text, embedder.image_config, position_rule=embedder.position_rule,
            padding_side=embedder.padding_side, source_dir=embedder.source_dir, num_threads=embedder.num_threads,
            packing=embedder.packing, prompt_format=embedder.prompt_format, instruction=embedder.instruction,
        )
        devices = list(devices if devices is not None else jax.local_devices())
        self.rows_multiple = len(devices)  # every packed batch splits over the mesh
        # Auto axis type: jax 0.10 defaults to Explicit, under which sharding propagation raises.
        self.mesh: Mesh = jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._replicated_state = jax.tree.map(lambda x: jax.device_put(host_local_copy(x), replicated), self._state)

    def encode(self, items: Sequence[Item], *, batch_size: int = 16, show_progress: bool = False) -> np.ndarray:
        """(N, D) unit vectors of `items`, this host encoding items[process_index::process_count]."""
        hosts, host = jax.process_count(), jax.process_index()
        local = super().encode(list(items)[host::hosts], batch_size=batch_size, show_progress=show_progress)
        if hosts == 1:
            return local
        share = -(-len(items) // hosts)  # the largest share: every host sends the same shape
        padded = np.zeros((share, self.dim), np.float32)
        padded[: len(local)] = local
        gathered = np.asarray(multihost_utils.process_allgather(padded))  # (hosts, share, D)
        out = np.empty((len(items), self.dim), np.float32)
        for h in range(hosts):
            rows = range(h, len(items), hosts)
            out[h::hosts] = gathered[h, : len(rows)]
        return out

    def embed_batch(self, batch: Mapping[str, np.ndarray]) -> jax.Array:
        """Unit vectors of one built batch (`Embedder.embed_batch`), computed over the mesh; returns
        immediately."""
        placed = {key: jax.device_put(value, self._sharding(key, value)) for key, value in batch.items()}
        with jax.set_mesh(self.mesh):  # kernels XLA cannot partition (splash attention) shard_map over it
            return embed_program(self._graphdef, self._replicated_state, placed)

    def _sharding(self, key: str, value: np.ndarray) -> NamedSharding:
        """Rows split over the mesh when the device count divides them, else replicated."""
        axis = _ROW_AXIS.get(key, 0)
        rows, devices = value.shape[axis], self.mesh.size
        spec = [None] * value.ndim
        if rows and rows % devices == 0:
            spec[axis] = DATA_AXIS
        return NamedSharding(self.mesh, PartitionSpec(*spec))
