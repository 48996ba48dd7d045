"""The jitted training step: GradCache gradients of InfoNCE over the global batch, then the optax
update, with every input and output sharding pinned and the state donated.

Pure data parallelism (fsdp = tensor = 1) runs the gradient computation per device in
`jax.shard_map`: each device embeds its own rows, embeddings are all-gathered for the loss, the
local parameter gradients are summed over the scan without any collective, and one
`psum_scatter` at the end leaves each device its ZeRO-2 shard of the gradient. With sharded
parameters the same function runs on global arrays and XLA's partitioner places the collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm2vec_jax.training.chunks import relative_image_index, row_axis
from vlm2vec_jax.training.forward import VisionFactory
from vlm2vec_jax.training.gradcache import EmbedFn, contrastive_grads
from vlm2vec_jax.training.loss import matryoshka_infonce
from vlm2vec_jax.training.packed_gradcache import packed_contrastive_grads
from vlm2vec_jax.training.sharding import BATCH_AXES, batch_size_of, uses_shard_map, zero2_spec

Params = Any
# make_embed(frozen, step_key) -> embed(params, inputs, example_ids): the model's forward for the step.
EmbedFactory = Callable[[Params, jax.Array], EmbedFn]
SIDES = ("query", "target")
PACKED = "packed"  # a packed batch's inputs (data/packing.py) replace its two sides
MASKS = ("valid", "target_valid", "target_key")  # per-row arrays besides the model inputs


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Params  # the trainable parameters (float32 master copy)
    opt_state: optax.OptState


@dataclass(frozen=True)
class StepOptions:
    temperature: float
    chunk_size: int  # queries per device per chunk; 0 = no caching
    mask_duplicate_targets: bool = False  # targets equal to a query's positive are not its negatives
    matryoshka_dims: tuple[int, ...] = ()  # prefixes whose InfoNCE is added to the full width's


def num_chunks(local_rows: int, chunk_size: int) -> int:
    """Chunks per device for `chunk_size` (0 = no caching); the chunk must divide the device's rows."""
    if chunk_size == 0:
        return 0
    if chunk_size < 0 or local_rows % chunk_size:
        raise ValueError(
            f"train.gc_chunk_size={chunk_size} must divide the per-device batch of {local_rows} queries "
            "(global batch / devices), or be 0 for no caching"
        )
    return local_rows // chunk_size


def batch_specs(batch: dict[str, Any]) -> dict[str, Any]:
    """PartitionSpecs of a device batch (rows over the batch axes; packed arrays by device shard)."""

    def spec(axis: int, x: Any) -> P:
        parts: list[Any] = [None] * x.ndim
        parts[axis] = BATCH_AXES
        return P(*parts)

    if PACKED in batch:
        inputs = {PACKED: {k: spec(0, v) for k, v in batch[PACKED].items()}}
    else:
        inputs = {side: {k: spec(row_axis(k), v) for k, v in batch[side].items()} for side in SIDES}
    return {**inputs, **{m: P(BATCH_AXES) for m in MASKS}}


def make_train_step(
    make_embed: EmbedFactory,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    options: StepOptions,
    mesh: Mesh,
    abstract_state: TrainState,
    frozen_shardings: Any,
    batch_example: dict[str, Any],
    make_vision: VisionFactory | None = None,
) -> Callable[[TrainState, Params, dict[str, Any], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted `step(state, frozen, batch, key) -> (state, metrics)`. `abstract_state` gives the
    state's shapes and shardings (`state.abstract_train_state`); `batch_example` (arrays or
    ShapeDtypeStructs of the global batch) fixes the shapes and the chunking. `make_vision` (only
    for a frozen vision tower): packed GradCache runs the tower once per chunk, not twice."""
    per_device = batch_size_of(mesh)
    global_queries = batch_example["valid"].shape[0]
    global_targets = batch_example["target_valid"].shape[0]
    local_queries = global_queries // per_device
    chunks = num_chunks(local_queries, options.chunk_size)
    packed = PACKED in batch_example
    sharded = uses_shard_map(mesh)
    axes = BATCH_AXES if sharded else None
    specs = batch_specs(batch_example)
    grad_specs = jax.tree.map(lambda x: zero2_spec(x.shape, mesh), abstract_state.params)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)

    def gradients(params: Params, frozen: Params, batch: dict[str, Any], key: jax.Array):
        gather = (lambda x: jax.lax.all_gather(x, axes, tiled=True)) if sharded else (lambda x: x)
        query_valid, target_valid = gather(batch["valid"]), gather(batch["target_valid"])
        target_keys = gather(batch["target_key"]) if options.mask_duplicate_targets else None

        def loss_fn(q: jax.Array, t: jax.Array):
            return matryoshka_infonce(q, t, query_valid, target_valid, options.temperature, target_keys, options.matryoshka_dims)

        if sharded:  # local gradients need varying parameters, or shard_map adds a psum per use
            params = jax.tree.map(lambda p: jax.lax.pcast(p, axes, to="varying"), params)
        if packed:
            loss, metrics, grads = packed_contrastive_grads(
                make_embed(frozen, key), loss_fn, params, batch[PACKED], num_queries=global_queries,
                num_examples=global_queries + global_targets, caching=chunks > 0, axes=axes,
                vision=make_vision(frozen) if make_vision is not None else None,
            )
            # The chunks this device's loops ran (its shards' largest count); the pmean below makes it
            # the mean over devices under shard_map, what `StepFlops.at` takes (executed_trips).
            metrics = {**metrics, "packed_chunks": jnp.max(batch[PACKED]["num_chunks"]).astype(jnp.float32)}
        else:
            query, target = (relative_image_index(batch[s]) for s in SIDES)
            q_rows, t_rows = batch["valid"].shape[0], batch["target_valid"].shape[0]
            first = jax.lax.axis_index(axes) if sharded else 0
            # Example ids are global positions: the dropout of an example never depends on the layout.
            query_ids = first * q_rows + jnp.arange(q_rows)
            target_ids = global_queries + first * t_rows + jnp.arange(t_rows)
            loss, metrics, grads = contrastive_grads(
                make_embed(frozen, key), loss_fn, params, query, target, query_ids, target_ids, num_chunks=chunks, axes=axes
            )
        if sharded:
            grads = jax.tree.map(_reduce_scatter, grads, grad_specs, is_leaf=lambda x: isinstance(x, P))
            # Every device computed the same global loss; pmean states it (invariant) at no real cost.
            loss, metrics = jax.lax.pmean((loss, metrics), axes)
        return loss, metrics, grads

    if sharded:
        gradients = jax.shard_map(
            gradients,
            mesh=mesh,
            in_specs=(P(), P(), specs, P()),
            out_specs=(P(), P(), grad_specs),
        )

    def step(state: TrainState, frozen: Params, batch: dict[str, Any], key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        loss, metrics, grads = gradients(state.params, frozen, batch, step_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": sum(jnp.sum(inputs["attention_mask"] > 0) for inputs in _inputs(batch)),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def _inputs(batch: dict[str, Any]) -> list[dict[str, jax.Array]]:
    return [batch[PACKED]] if PACKED in batch else [batch[s] for s in SIDES]


def _reduce_scatter(grad: jax.Array, spec: P) -> jax.Array:
    """Sum a per-device gradient over the batch axes, leaving each device its ZeRO-2 shard."""
    dims = [d for d, s in enumerate(spec) if s is not None]
    if not dims:
        return jax.lax.psum(grad, BATCH_AXES)
    return jax.lax.psum_scatter(grad, BATCH_AXES, scatter_dimension=dims[0], tiled=True)
