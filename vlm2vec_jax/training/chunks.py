"""Row chunks of a batch for GradCache: strided (chunk k = rows k, k + n, k + 2n, ...), so that when
the batch is sharded over devices by contiguous blocks, every chunk keeps the same per-device
layout and slicing it moves no data between devices (contiguous chunks would add all-to-alls)."""

import jax
import jax.numpy as jnp

from vlm2vec_jax.batch import MERGE_UNITS, ModelInputs

# The row axis of each ModelInputs array (position_ids carries its 3 M-RoPE axes first).
ROW_AXIS = {"position_ids": 1}


def row_axis(key: str) -> int:
    return ROW_AXIS.get(key, 0)


def relative_image_index(inputs: ModelInputs) -> ModelInputs:
    """`image_token_index` made relative to its own sequence's vision row (-1 stays -1).

    Training batches put sequence i's image in vision row i (`Batcher(aligned=True)`), so an index
    is row * U + k with U merged tokens per row; keeping only k makes any slice of rows (a chunk,
    a device's shard, a host's part) self-contained. `absolute_image_index` undoes it."""
    per_row = _tokens_per_row(inputs)
    index = inputs["image_token_index"]
    if per_row == 0:
        return inputs
    return {**inputs, "image_token_index": jnp.where(index >= 0, index % per_row, -1)}


def absolute_image_index(inputs: ModelInputs) -> ModelInputs:
    """The model's layout back from `relative_image_index`, for these rows."""
    per_row = _tokens_per_row(inputs)
    index = inputs["image_token_index"]
    if per_row == 0:
        return inputs
    offset = jnp.arange(index.shape[0], dtype=index.dtype)[:, None] * per_row
    return {**inputs, "image_token_index": jnp.where(index >= 0, index + offset, -1)}


def _tokens_per_row(inputs: ModelInputs) -> int:
    rows, patches = inputs["patch_segment_ids"].shape
    return 0 if rows == 0 else patches // MERGE_UNITS


def take_chunk(tree: dict[str, jax.Array], num_chunks: int, k: jax.Array) -> dict[str, jax.Array]:
    """Chunk `k` (traced) of each array: rows k, k + num_chunks, ... on its `row_axis`.

    Read in place inside the GradCache scans: viewing rows as (rows / n, n) is free in row-major
    layout, so each chunk is one strided dynamic slice and the step never holds a chunk-major copy
    of the whole batch (which would grow its memory with the batch). Zero-row arrays (a side
    without images) come back as they are."""

    def take(key: str, x: jax.Array) -> jax.Array:
        axis = row_axis(key)
        rows = x.shape[axis]
        if rows == 0:
            return x
        if rows % num_chunks:
            raise ValueError(f"{key}: {rows} rows do not split into {num_chunks} chunks")
        x = x.reshape(*x.shape[:axis], rows // num_chunks, num_chunks, *x.shape[axis + 1 :])
        return jax.lax.dynamic_index_in_dim(x, k, axis=axis + 1, keepdims=False)

    return {key: take(key, x) for key, x in tree.items()}


def merge_rows(chunked: jax.Array) -> jax.Array:
    """The rows of a (num_chunks, rows_per_chunk, ...) stack of `take_chunk` results, in batch order."""
    n, per_chunk = chunked.shape[:2]
    return jnp.swapaxes(chunked, 0, 1).reshape(n * per_chunk, *chunked.shape[2:])
