"""Clusters of exactly K rows from the mutual graph: METIS k-way partition, then an exact-size fix-up.

METIS minimises the edges cut between N // K parts, so a part gathers rows that are strong negatives
of each other. Its parts are only roughly balanced (and can come back empty), while a batch is
|B| / K clusters of exactly K rows. The fix-up keeps every full K-chunk of a part together and pools
the rest: the remainder of oversized parts and the rows of undersized ones. The pool is ordered by
part, so the fragments of one part stay adjacent, and re-chunked into K; the last fewer-than-K rows
are left out of every cluster and counted. Every row ends in at most one cluster, and every row is
either in a cluster or counted as left over. (B3's original refill appends a position index where
it means a row; here rows are only ever moved as rows.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pymetis

from vlm2vec_jax.mining.graph import Graph

__all__ = ["Clusters", "exact_clusters", "metis_parts"]


@dataclass(frozen=True)
class Clusters:
    """`members` (C, K) node ids; `leftover` nodes in no cluster (fewer than K, after pooling);
    `regrouped`: nodes in a cluster built from the pool rather than from their own METIS part."""

    members: np.ndarray
    leftover: np.ndarray
    regrouped: int


def metis_parts(graph: Graph, n_parts: int, seed: int) -> tuple[int, np.ndarray]:
    """(edges cut, (N,) part of each node) of a METIS k-way partition into `n_parts` parts."""
    if n_parts <= 1:
        return 0, np.zeros(graph.num_nodes, np.int64)
    adjacency = pymetis.CSRAdjacency(adj_starts=graph.xadj, adjacent=graph.adjncy)
    result = pymetis.part_graph(n_parts, adjacency=adjacency, options=pymetis.Options(seed=seed))
    return int(result.edge_cuts), np.asarray(result.vertex_part, np.int64)


def exact_clusters(parts: np.ndarray, size: int) -> Clusters:
    """Clusters of exactly `size` nodes from a partition (module docstring)."""
    order = np.argsort(parts, kind="stable")  # nodes grouped by part, node order within a part
    counts = np.bincount(parts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(order)) - starts[parts[order]]  # rank of each node within its part
    whole = position < (counts // size * size)[parts[order]]
    kept, pool = order[whole], order[~whole]
    usable = len(pool) // size * size
    members = np.concatenate([kept, pool[:usable]]).reshape(-1, size)
    return Clusters(members, np.sort(pool[usable:]), usable)
