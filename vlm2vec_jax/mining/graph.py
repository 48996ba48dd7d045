"""B3's graph of one task: rows are nodes, an edge joins two rows that are in each other's S.

S = R[:, p:p+m]: the p best-ranked rows are skipped (likely false negatives: near-duplicates of
the positive), the next m are the strong negatives a batch should hold. An edge is kept only when
it is mutual (j in S[i] and i in S[j]), which drops hubs that rank high for everyone. The result is
undirected, unweighted, without self loops, in the CSR form METIS reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse

__all__ = ["Graph", "mutual_graph", "strong_negatives"]


@dataclass(frozen=True)
class Graph:
    """Undirected CSR adjacency: the neighbours of node i are adjncy[xadj[i]:xadj[i+1]], sorted;
    every edge is stored in both directions."""

    xadj: np.ndarray
    adjncy: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.xadj) - 1

    @property
    def num_edges(self) -> int:
        """Undirected edges (each stored twice)."""
        return len(self.adjncy) // 2

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) of every undirected edge, u < v."""
        u = np.repeat(np.arange(self.num_nodes, dtype=np.int64), np.diff(self.xadj))
        keep = u < self.adjncy
        return u[keep], self.adjncy[keep]


def strong_negatives(ranking: np.ndarray, p: int, m: int) -> np.ndarray:
    """S = R[:, p:p+m] (entries may be NO_ROW = -1 where the task ran out of rows)."""
    return ranking[:, p : p + m]


def mutual_graph(neighbours: np.ndarray) -> Graph:
    """The graph of mutual entries of `neighbours` ((N, m) node ids, negative = none)."""
    n = neighbours.shape[0]
    src = np.repeat(np.arange(n, dtype=np.int64), neighbours.shape[1])
    dst = neighbours.reshape(-1).astype(np.int64)
    keep = (dst >= 0) & (dst != src)
    src, dst = src[keep], dst[keep]
    directed = scipy.sparse.csr_array((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    mutual = directed.multiply(directed.T).tocsr()  # entry (i, j) iff both (i, j) and (j, i)
    mutual.sort_indices()
    return Graph(mutual.indptr.astype(np.int64), mutual.indices.astype(np.int64))
