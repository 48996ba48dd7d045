"""InfoNCE over the global batch, VLM2Vec's loss: each query against every target of the batch
(its positive, its hard negatives and every other query's targets), temperature-scaled cosine;
optionally summed with the same loss on Matryoshka prefixes of the vectors (Qwen3-VL-Embedding,
jina-embeddings-v4), so that truncated embeddings stay usable."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vlm2vec_jax.models.pooling import truncate_and_normalize


def infonce(
    queries: jax.Array,
    targets: jax.Array,
    query_valid: jax.Array,
    target_valid: jax.Array,
    temperature: float,
    target_keys: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of `queries` (B, D) against `targets` (B * n, D), unit vectors, where
    query i's positive is target i * n (n = 1 + hard negatives, VLM2Vec's `arange(0, B*n, n)`).

    Rows the data pipeline masked as bad (`query_valid` False) add nothing; masked targets are
    removed from every denominator. With `target_keys` (B * n,) content ids, a target identical to
    a query's positive (same key) is not a negative of that query: it is removed from its
    denominator, as in-batch duplicates (a repeated class label or answer) would otherwise push a
    query away from its own positive. Returns the loss and `accuracy` (the positive ranked first among
    the valid targets) over valid queries."""
    batch = queries.shape[0]
    per_query = targets.shape[0] // batch
    dtype = jnp.promote_types(queries.dtype, jnp.float32)
    logits = jnp.einsum("qd,td->qt", queries, targets, preferred_element_type=dtype) / temperature
    # A large finite value rather than -inf: a step whose targets are all masked stays NaN-free.
    labels = jnp.arange(batch) * per_query
    keep = jnp.broadcast_to(target_valid[None, :], logits.shape)
    if target_keys is not None:
        duplicate = target_keys[None, :] == target_keys[labels][:, None]
        keep &= ~duplicate | (jnp.arange(logits.shape[1])[None, :] == labels[:, None])
    logits = jnp.where(keep, logits, jnp.finfo(dtype).min)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    weight = query_valid.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = -jnp.sum(jnp.where(query_valid, picked, 0.0)) / count
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return loss, {"accuracy": jnp.sum(correct * weight) / count, "valid_queries": weight.sum()}


def parse_matryoshka_dims(text: str) -> tuple[int, ...]:
    """`train.matryoshka_dims` ("" or e.g. "64,128,256") as increasing ints; ValueError naming the key."""
    try:
        dims = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ValueError(f"train.matryoshka_dims={text!r}: give comma-separated integers, e.g. '64,128,256'") from None
    if any(d <= 0 for d in dims):
        raise ValueError(f"train.matryoshka_dims={text!r}: dimensions must be positive")
    return dims


def matryoshka_infonce(
    queries: jax.Array,
    targets: jax.Array,
    query_valid: jax.Array,
    target_valid: jax.Array,
    temperature: float,
    target_keys: jax.Array | None = None,
    dims: Sequence[int] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`infonce` at the full width plus, for each of `dims`, on the vectors' first `dim` entries
    renormalised, summed; the metrics are the full width's."""
    loss, metrics = infonce(queries, targets, query_valid, target_valid, temperature, target_keys)
    for dim in dims:
        if dim >= queries.shape[-1]:
            raise ValueError(f"train.matryoshka_dims: {dim} is not below the embedding width {queries.shape[-1]} (the full width is always trained)")
        short = infonce(truncate_and_normalize(queries, dim), truncate_and_normalize(targets, dim), query_valid, target_valid, temperature, target_keys)
        loss = loss + short[0]
    return loss, metrics
