"""The teacher's ranking R of one task: for each query, its top-k rows of the task, best first.

Exact, not approximate: a block of queries is scored against every row of the task at once, so
memory is O(block x N) per device whatever N is, and `lax.top_k` picks the k best (ties to the
lower row, so R is a deterministic function of the embeddings). Each block is split over the local
devices along the query axis (`shard_map`, rows replicated); blocks are dispatched ahead of the one
being read back so the host never waits on an idle device.

Two scores, one machinery:
- `rank_targets` (retrieval, VQA, grounding): cos(query i, positive j), j = i excluded.
- `rank_by_label` (classification; docs/reference.md, "B3 batch mining"): a row's target is its
  class label, so the ranking is over labels: i's top ceil(30% x #labels) predicted labels, its
  gold label removed, and the rows whose gold label is among them, by label rank (ties within a
  label broken by query similarity). Rows sharing i's label, i included, never appear: they have
  i's positive.
Entries past the last row that qualifies are `NO_ROW`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

__all__ = ["LABEL_FRACTION", "NO_ROW", "rank_by_label", "rank_targets", "target_ids", "unit_rows"]

NO_ROW = -1
# Classification: the share of labels a query's "predicted labels" cover (B3's ceil(30% x #classes)).
LABEL_FRACTION = 0.3
# Label rank dominates, query similarity (in [-1, 1]) only breaks ties within a label.
_TIE_WEIGHT = 0.25
_AXIS = "rows"
# Blocks dispatched ahead of the one read back.
_IN_FLIGHT = 2

Score = Callable[..., jax.Array]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (cosine = dot product); all-zero rows stay zero."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def target_ids(targets: np.ndarray) -> np.ndarray:
    """(N,) int64 id of each row's target: equal ids = identical vectors (a class label or an answer
    shared by several rows: the same positive, so never a negative of one another)."""
    return _distinct(targets)[1].astype(np.int64)


def _distinct(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, each row's index into them)."""
    vectors, ids = np.unique(np.asarray(targets, np.float32), axis=0, return_inverse=True)
    return vectors, ids.reshape(-1)


def rank_targets(
    queries: np.ndarray, targets: np.ndarray, k: int, *, block: int = 512, desc: str = "", progress: bool = False
) -> np.ndarray:
    """(N, k) int32: R[i] = rows j != i by decreasing cos(query i, target j)."""
    _check_pair(queries, targets)
    rows = np.arange(len(queries), dtype=np.int32)
    return _top_k_blocks(_target_scores, [unit_rows(queries), rows], [unit_rows(targets)], k, block, desc, progress)


def rank_by_label(
    queries: np.ndarray, targets: np.ndarray, k: int, *, block: int = 512, desc: str = "", progress: bool = False
) -> np.ndarray:
    """(N, k) int32 for a classification task (module docstring): labels are the distinct target
    vectors; rows whose label is outside i's top labels, or is i's own, are never ranked."""
    _check_pair(queries, targets)
    labels, gold = _distinct(targets)
    gold = gold.astype(np.int32)
    top_labels = math.ceil(LABEL_FRACTION * len(labels))
    q = unit_rows(queries)

    def score(q_block: jax.Array, gold_block: jax.Array, label_vectors: jax.Array, gold_all: jax.Array,
              q_all: jax.Array) -> jax.Array:
        own = jnp.arange(label_vectors.shape[0])[None, :] == gold_block[:, None]
        label_scores = jnp.where(own, -jnp.inf, q_block @ label_vectors.T)
        label_rank = jnp.argsort(jnp.argsort(-label_scores, axis=1), axis=1)  # 0 = best; own label last
        rank = jnp.take(label_rank, gold_all, axis=1)  # (b, N): rank of row j's label for query i
        scores = -rank.astype(jnp.float32) + _TIE_WEIGHT * (q_block @ q_all.T)
        excluded = (rank >= top_labels) | (gold_all[None, :] == gold_block[:, None])
        return jnp.where(excluded, -jnp.inf, scores)

    return _top_k_blocks(score, [q, gold], [unit_rows(labels), gold, q], k, block, desc, progress)


def _target_scores(q_block: jax.Array, rows: jax.Array, t_all: jax.Array) -> jax.Array:
    scores = q_block @ t_all.T
    return jnp.where(jnp.arange(t_all.shape[0])[None, :] == rows[:, None], -jnp.inf, scores)


def _check_pair(queries: np.ndarray, targets: np.ndarray) -> None:
    if queries.ndim != 2 or queries.shape != targets.shape:
        raise ValueError(f"queries and targets must both be (N, D); got {queries.shape} and {targets.shape}")


def _top_k_blocks(
    score: Score, per_row: list[np.ndarray], shared: list[np.ndarray], k: int, block: int, desc: str, progress: bool
) -> np.ndarray:
    """Run `score(*row_block_arrays, *shared) -> (b, N)` (-inf = excluded) over blocks of rows and
    keep each row's top k columns; NO_ROW pads columns that are excluded or missing (k >= N)."""
    n = len(per_row[0])
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), (_AXIS,))
    per_device = max(1, min(block, math.ceil(n / len(devices))))
    step = per_device * len(devices)
    width = min(k, n)

    def top(*args: jax.Array) -> jax.Array:
        values, index = jax.lax.top_k(score(*args), width)
        return jnp.where(jnp.isfinite(values), index, NO_ROW).astype(jnp.int32)

    row_spec, all_spec = PartitionSpec(_AXIS), PartitionSpec()
    fn = jax.jit(
        jax.shard_map(
            top, mesh=mesh, in_specs=(row_spec,) * len(per_row) + (all_spec,) * len(shared), out_specs=row_spec
        )
    )
    row_sharding, replicated = NamedSharding(mesh, row_spec), NamedSharding(mesh, all_spec)
    shared_on_device = [jax.device_put(a, replicated) for a in shared]
    padded = math.ceil(n / step) * step
    per_row = [np.concatenate([a, np.zeros((padded - n, *a.shape[1:]), a.dtype)]) for a in per_row]

    out = np.full((n, k), NO_ROW, np.int32)
    in_flight: deque[tuple[int, jax.Array]] = deque()
    with tqdm(total=n, desc=f"rank {desc}".strip(), unit="query", disable=not progress, leave=False) as bar:

        def collect(keep: int) -> None:
            while len(in_flight) > keep:
                start, result = in_flight.popleft()
                stop = min(start + step, n)
                out[start:stop, :width] = np.asarray(result)[: stop - start]
                bar.update(stop - start)

        for start in range(0, n, step):
            blocks = [jax.device_put(a[start : start + step], row_sharding) for a in per_row]
            in_flight.append((start, fn(*blocks, *shared_on_device)))
            collect(keep=_IN_FLIGHT)
        collect(keep=0)
    return out
