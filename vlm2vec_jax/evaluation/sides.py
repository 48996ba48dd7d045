"""Distinct sides: what an evaluation encodes, each (text, image) once.

MMEB candidates repeat heavily (a classification dataset ranks the same labels for each of its
queries; retrieval rows draw from one pool), so, as VLM2Vec's `get_paired_data` does, a dataset is
reduced to its distinct sides, and queries and candidates become integer rows of one vector table.
Queries and candidates share the table: the same (text, image) is the same vector on either side.
Each side remembers where it first appears, so a bad image is reported by dataset, row and column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlm2vec_jax.data.records import EvalQuery, Side

__all__ = ["CANDIDATE_IMAGE_COLUMN", "QUERY_IMAGE_COLUMN", "IndexedDataset", "SideTable", "SideUse", "index_queries"]

# MMEB-eval's image columns: where a side's image path came from.
QUERY_IMAGE_COLUMN = "qry_img_path"
CANDIDATE_IMAGE_COLUMN = "tgt_img_path"


@dataclass(frozen=True)
class SideUse:
    """Where a side first appears: the dataset row and the image column it came from."""

    row: int
    column: str


class SideTable:
    """Distinct sides in first-seen order, with where each first appears."""

    def __init__(self) -> None:
        self.sides: list[Side] = []
        self.first_use: list[SideUse] = []
        self._index: dict[Side, int] = {}

    def __len__(self) -> int:
        return len(self.sides)

    def add(self, side: Side, row: int, column: str) -> int:
        """The table row of `side`, appended when new."""
        index = self._index.get(side)
        if index is None:
            index = self._index[side] = len(self.sides)
            self.sides.append(side)
            self.first_use.append(SideUse(row, column))
        return index


@dataclass(frozen=True)
class IndexedDataset:
    """One evaluation dataset as table rows: `queries` (N,), `candidates` (N, K) with -1 padding
    rows that have fewer than K candidates; `rows` are the queries' file rows."""

    name: str
    table: SideTable
    queries: np.ndarray
    candidates: np.ndarray
    rows: np.ndarray


def index_queries(name: str, queries: Sequence[EvalQuery]) -> IndexedDataset:
    """Dedup `queries` of dataset `name` into a side table and index arrays."""
    if not queries:
        raise ValueError(f"{name}: no queries to evaluate (is the dataset empty, or were all its rows skipped?)")
    table = SideTable()
    width = max(len(q.candidates) for q in queries)
    query_index = np.empty(len(queries), np.int64)
    candidate_index = np.full((len(queries), width), -1, np.int64)
    for i, q in enumerate(queries):
        if not q.candidates:
            raise ValueError(f"{name} row {q.row}: the query has no candidates")
        query_index[i] = table.add(q.query, q.row, QUERY_IMAGE_COLUMN)
        candidate_index[i, : len(q.candidates)] = [table.add(c, q.row, CANDIDATE_IMAGE_COLUMN) for c in q.candidates]
    rows = np.fromiter((q.row for q in queries), np.int64, count=len(queries))
    return IndexedDataset(name, table, query_index, candidate_index, rows)
