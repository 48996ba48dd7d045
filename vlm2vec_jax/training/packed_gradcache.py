"""GradCache over packed chunks (`data/packing.py`): the step costs what its batch holds.

The same two passes as `gradcache.contrastive_grads`, but over chunks of fixed token and patch
budgets that hold a variable number of sequences, with a dynamic trip count: each device runs
`num_chunks` of its chunk capacity (`lax.fori_loop` with a traced bound, a while loop), so a batch
of short sequences runs fewer chunks under one compiled program for the whole run. A dynamic trip
count rather than a few bucketed programs: one compile, no shape ladder to tune, and GradCache never
differentiates through the loop (each pass-2 iteration takes its own vjp), so a while loop costs
nothing in reverse mode.

Pass 1 writes each chunk's slot embeddings into a buffer of every example of the global batch by
global id (rows no device wrote stay zero: invalid sequences, whose embeddings the loss masks);
under `shard_map` the devices' disjoint rows are summed into the global buffer (one all-reduce of
batch x D floats). The loss is InfoNCE on that buffer, exactly the padded step's; pass 2 gathers
each slot's cotangent by id and pulls it back through the chunk's vjp.

With a frozen vision tower (`vision` given) pass 1 also keeps each chunk's image features in a
buffer of the chunk capacity and pass 2 reads them back instead of running the tower again: the
tower has nothing to differentiate, so its second forward (what the PyTorch originals run) would
only recompute the same numbers.

Under plain jit (sharded parameters) the per-shard chunks are stacked on a leading axis: chunk c
of every shard runs as one, and the trip count is the largest shard's.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm2vec_jax.batch import MERGE_UNITS
from vlm2vec_jax.training.gradcache import EmbedFn, LossFn

Params = Any
# vision(params, chunk) -> the frozen tower's features of the chunk (`training.forward.make_vision_factory`)
VisionFn = Callable[[Params, dict[str, jax.Array]], dict[str, jax.Array]]
# Arrays of a packed chunk the model reads (the rest is bookkeeping for the loop).
TEXT = ("input_ids", "attention_mask", "image_token_index", "token_example", "token_position")
VISION = ("pixel_values", "patch_positions", "patch_segment_ids")


def packed_chunk(packed: dict[str, jax.Array], c: jax.Array | int) -> dict[str, jax.Array]:
    """Chunk `c` of every shard as one model input: shard g's rows follow shard g - 1's, its image
    and pooled-token indices offset by the rows before it; `slot_example` (G * S,) comes along."""
    take = {k: jax.lax.dynamic_index_in_dim(x, c, axis=1, keepdims=False) for k, x in packed.items() if k != "num_chunks"}
    shards, text_rows, length = take["input_ids"].shape
    vision_rows, patches = take["patch_segment_ids"].shape[1:]
    merge = lambda x: x.reshape(shards * x.shape[1], *x.shape[2:])  # noqa: E731
    chunk = {k: merge(take[k]) for k in TEXT + VISION}
    chunk["position_ids"] = jnp.moveaxis(take["position_ids"], 1, 0).reshape(3, shards * text_rows, length)
    shard = jnp.arange(shards, dtype=jnp.int32)[:, None, None]
    index = take["image_token_index"]
    chunk["image_token_index"] = merge(jnp.where(index >= 0, index + shard * (vision_rows * patches // MERGE_UNITS), -1))
    chunk["pool_index"] = (take["pool_index"] + shard[:, 0] * (text_rows * length)).reshape(-1)
    chunk["slot_example"] = take["slot_example"].reshape(-1)
    return chunk


def packed_contrastive_grads(
    embed: EmbedFn,
    loss_fn: LossFn,
    params: Params,
    packed: dict[str, jax.Array],
    *,
    num_queries: int,
    num_examples: int,
    caching: bool,
    axes: tuple[str, ...] | None = None,
    vision: VisionFn | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    """(loss, metrics, parameter gradients of the local chunks). `packed` holds this device's
    shards (leading axis G, chunk axis C); `num_examples` = queries + targets of the global batch,
    the first `num_queries` of them queries. Without `caching` the single chunk is embedded once
    with its vjp kept (capacity 1). `vision(params, chunk)`: the frozen tower's features of a
    chunk, computed once in pass 1 and reused in pass 2 (module docstring)."""

    def embed_chunk(p: Params, chunk: dict[str, jax.Array]) -> jax.Array:
        inputs = {k: v for k, v in chunk.items() if k not in ("token_example", "slot_example")}
        return embed(p, inputs, chunk["token_example"])

    def scatter(buffer: jax.Array, chunk: dict[str, jax.Array], rows: jax.Array) -> jax.Array:
        slots = chunk["slot_example"]
        return buffer.at[jnp.where(slots >= 0, slots, num_examples)].add(rows, mode="drop")

    def gather(cotangents: jax.Array, chunk: dict[str, jax.Array]) -> jax.Array:
        slots = chunk["slot_example"]
        return jnp.where((slots >= 0)[:, None], cotangents[jnp.maximum(slots, 0)], 0.0)

    def embedding_grads(buffer: jax.Array) -> tuple[jax.Array, dict, jax.Array]:
        if axes is not None:  # varying again, as the loss's gathered masks are: an invariant input
            # would be broadcast inside the loss, and its gradient summed over the devices (x devices)
            buffer = jax.lax.pcast(jax.lax.psum(buffer, axes), axes, to="varying")
        (loss, metrics), (dq, dt) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            buffer[:num_queries], buffer[num_queries:]
        )
        return loss, metrics, jnp.concatenate([dq, dt])

    first = packed_chunk(packed, 0)
    width = jax.eval_shape(embed_chunk, params, first).shape[-1]
    varying = (lambda x: jax.lax.pcast(x, axes, to="varying")) if axes is not None else (lambda x: x)  # noqa: E731
    # written per device: a loop carry must be device-varying from the start
    empty = varying(jnp.zeros((num_examples, width), jnp.float32))
    if not caching:
        rows, pullback = jax.vjp(lambda p: embed_chunk(p, first), params)
        loss, metrics, cotangents = embedding_grads(scatter(empty, first, rows))
        return loss, metrics, pullback(gather(cotangents, first).astype(rows.dtype))[0]

    trips = jnp.max(packed["num_chunks"])
    frozen = jax.lax.stop_gradient(params)
    keeps_features = vision is not None and first["patch_segment_ids"].shape[0] > 0  # a frozen tower, and images
    features = {}
    if keeps_features:  # a buffer of every chunk's features, by chunk (the capacity, C)
        capacity = packed["patch_segment_ids"].shape[1]
        shapes = jax.eval_shape(vision, frozen, first)
        features = {k: varying(jnp.zeros((capacity, *s.shape), s.dtype)) for k, s in shapes.items()}

    def pass1(c: jax.Array, carry: tuple[jax.Array, dict[str, jax.Array]]) -> tuple[jax.Array, dict[str, jax.Array]]:
        buffer, kept = carry
        chunk = packed_chunk(packed, c)
        if keeps_features:
            computed = vision(frozen, chunk)
            kept = {k: jax.lax.dynamic_update_index_in_dim(kept[k], computed[k], c, 0) for k in kept}
            chunk = {**chunk, **computed}
        return scatter(buffer, chunk, embed_chunk(frozen, chunk)), kept

    buffer, features = jax.lax.fori_loop(0, trips, pass1, (empty, features))
    loss, metrics, cotangents = embedding_grads(buffer)

    def pass2(c: jax.Array, acc: Params) -> Params:
        chunk = packed_chunk(packed, c)
        chunk.update({k: jax.lax.dynamic_index_in_dim(x, c, keepdims=False) for k, x in features.items()})
        rows, pullback = jax.vjp(lambda p: embed_chunk(p, chunk), params)
        (grads,) = pullback(gather(cotangents, chunk).astype(rows.dtype))
        return jax.tree.map(jnp.add, acc, grads)

    grads = jax.lax.fori_loop(0, trips, pass2, jax.tree.map(jnp.zeros_like, params))
    return loss, metrics, grads


def executed_trips(num_chunks: np.ndarray, devices: int, per_device_loops: bool) -> float:
    """How many times a step's chunk loops run, for its FLOPs (`throughput.StepFlops.at`), given
    the batch's `num_chunks` of every device shard (global order). With per-device loops
    (shard_map) each device runs its own shards' largest count and a loop body's FLOPs count once
    per device, so this is the mean over devices; under plain jit every shard runs the largest."""
    counts = np.asarray(num_chunks)
    if not per_device_loops:
        return float(counts.max())
    return float(counts.reshape(devices, -1).max(axis=1).mean())
