"""Host data onto the mesh: a pytree put leaf by leaf onto given shardings (parameters, frozen
state), and a host's slice of a global batch made into global arrays sharded over the batch axes."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from vlm2vec_jax.training.sharding import batch_sharding
from vlm2vec_jax.training.state import leaf_names
from vlm2vec_jax.training.step import MASKS, PACKED, SIDES


def place(tree: Any, shardings: Any) -> Any:
    """Put a host-side (or single-device) pytree onto the mesh, leaf by leaf; works on many hosts
    because every process supplies the same values for the shards it owns."""

    def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def device_batch(record: dict[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """This host's slice of a global batch -> global arrays sharded over the batch axes (a packed
    record's arrays by their leading device-shard axis)."""
    inputs = (PACKED,) if PACKED in record else SIDES
    arrays = {**{k: record[k] for k in inputs}, **{m: record[m] for m in MASKS}}

    def put(path: tuple, x: np.ndarray) -> jax.Array:
        names = leaf_names(path)
        sharding = batch_sharding(mesh, "" if names[0] == PACKED else names[-1], x.ndim)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, arrays)
