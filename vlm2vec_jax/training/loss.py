"""InfoNCE over the global batch, VLM2Vec's loss: each query against every target of the batch
(its positive, its hard negatives and every other query's targets), temperature-scaled cosine."""

import jax
import jax.numpy as jnp


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
