"""Gradients of the contrastive loss over a large batch in bounded memory: GradCache as two
`lax.scan` passes inside one jit (Gao et al. 2021, as VLM2Vec uses it).

Pass 1 embeds every chunk without keeping activations; the loss over the whole (global) batch
gives d loss / d embedding; pass 2 re-embeds chunk by chunk under `jax.vjp` and pulls that cached
gradient back into the parameters, accumulating. Dropout is replayed exactly because the embed
function's randomness is a pure function of (step key, example id), never of the chunking. With
`num_chunks == 0` nothing is cached: one forward with its vjp kept, one backward, the plain step.

The same code runs per device inside `jax.shard_map` (then `axes` names the batch mesh axes:
embeddings are all-gathered so every query sees every target of the global batch, and each device
pulls back only its own rows' gradient) or on global arrays under plain jit (`axes=None`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vlm2vec_jax.batch import ModelInputs
from vlm2vec_jax.training.chunks import merge_rows, take_chunk

Params = Any
# embed(params, inputs, example_ids) -> (rows, D) unit vectors; randomness keyed by example id.
EmbedFn = Callable[[Params, ModelInputs, jax.Array], jax.Array]
# loss(queries, targets) over the global batch -> (loss, metrics)
LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _gather(x: jax.Array, axes: tuple[str, ...] | None) -> jax.Array:
    return x if axes is None else jax.lax.all_gather(x, axes, tiled=True)


def _local(x: jax.Array, rows: int, axes: tuple[str, ...] | None) -> jax.Array:
    """This device's rows of a gathered (global) array."""
    if axes is None:
        return x
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axes) * rows, rows)


def contrastive_grads(
    embed: EmbedFn,
    loss_fn: LossFn,
    params: Params,
    query: ModelInputs,
    target: ModelInputs,
    query_ids: jax.Array,
    target_ids: jax.Array,
    *,
    num_chunks: int,
    axes: tuple[str, ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    """(loss, metrics, parameter gradients of the local rows) for one batch; `num_chunks` chunks
    per device (0 = no caching). Gradients are per device (un-reduced) under shard_map."""
    q_rows, t_rows = query_ids.shape[0], target_ids.shape[0]

    def embed_both(p: Params, q: ModelInputs, t: ModelInputs, qi: jax.Array, ti: jax.Array) -> tuple[jax.Array, jax.Array]:
        return embed(p, q, qi), embed(p, t, ti)

    def embedding_grads(q_emb: jax.Array, t_emb: jax.Array) -> tuple[jax.Array, dict, jax.Array, jax.Array]:
        (loss, metrics), (dq, dt) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            _gather(q_emb, axes), _gather(t_emb, axes)
        )
        return loss, metrics, _local(dq, q_rows, axes), _local(dt, t_rows, axes)

    if num_chunks == 0:
        (q_emb, t_emb), pullback = jax.vjp(lambda p: embed_both(p, query, target, query_ids, target_ids), params)
        loss, metrics, dq, dt = embedding_grads(q_emb, t_emb)
        return loss, metrics, pullback((dq, dt))[0]

    def chunk_inputs(k: jax.Array) -> tuple[ModelInputs, ModelInputs, jax.Array, jax.Array]:
        ids = take_chunk({"query": query_ids, "target": target_ids}, num_chunks, k)
        return take_chunk(query, num_chunks, k), take_chunk(target, num_chunks, k), ids["query"], ids["target"]

    def pass1(_: None, k: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
        return None, embed_both(jax.lax.stop_gradient(params), *chunk_inputs(k))

    chunk_numbers = jnp.arange(num_chunks)
    _, (q_emb, t_emb) = jax.lax.scan(pass1, None, chunk_numbers)
    loss, metrics, dq, dt = embedding_grads(merge_rows(q_emb), merge_rows(t_emb))

    def pass2(acc: Params, k: jax.Array) -> tuple[Params, None]:
        chunk = chunk_inputs(k)
        cotangent = take_chunk({"q": dq, "t": dt}, num_chunks, k)
        _, pullback = jax.vjp(lambda p: embed_both(p, *chunk), params)
        (grads,) = pullback((cotangent["q"], cotangent["t"]))
        return jax.tree.map(jnp.add, acc, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(pass2, zeros, chunk_numbers)
    return loss, metrics, grads
