"""MMEB scoring: each query against its own candidates; Precision@1 with candidate 0 as the truth.

As VLM2Vec's `eval.py` + `get_pred`: score = cosine, which is the dot product of our unit vectors;
prediction = `np.argmax` over the row's candidates, so a tie goes to the lowest index (a ground
truth tied with a later duplicate counts as correct); correct iff the prediction is 0. The score
file holds the original's keys: `acc` (a fraction, not a percentage), `num_correct`, `num_pred`.

Ties are made exact: rows with identical vectors (the same side, or different sides a model maps
to the same vector) share one row of the score matrix, so their scores are bit-identical instead
of depending on where a matrix product put them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DatasetScore", "predict", "unique_rows"]

# Queries scored per matrix product: bounds memory when rows have thousands of candidates.
QUERY_CHUNK = 256


@dataclass(frozen=True)
class DatasetScore:
    """One dataset's result. `predictions[i]`: the candidate ranked first for query i.
    `num_items`: distinct sides; `num_encoded`: of those, how many the model encoded (not cached)."""

    dataset: str
    num_correct: int
    num_pred: int
    num_items: int
    num_encoded: int
    predictions: np.ndarray = field(repr=False, compare=False)

    @property
    def acc(self) -> float:
        """Precision@1 as a fraction."""
        return self.num_correct / self.num_pred

    def to_json(self) -> dict[str, float | int]:
        """The `<dataset>_score.json` of VLM2Vec's eval.py."""
        return {"acc": self.acc, "num_correct": self.num_correct, "num_pred": self.num_pred}


def unique_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table, inverse): the bitwise-distinct rows of `vectors`, and the index of each row in it."""
    rows = np.ascontiguousarray(vectors)
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()  # one blob per row
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return rows[first], inverse.reshape(-1)


def predict(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """For each query row, the position of its best candidate (lowest on ties).

    `vectors` (M, D) unit vectors of the distinct sides; `queries` (N,) and `candidates` (N, K)
    index into it, -1 padding a row with fewer candidates."""
    table, inverse = unique_rows(vectors)
    queries, padded = inverse[queries], candidates < 0
    candidates = np.where(padded, 0, inverse[np.maximum(candidates, 0)])
    out = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        used, local = np.unique(candidates[rows], return_inverse=True)
        scores = table[queries[rows]] @ table[used].T  # each distinct pair scored once
        ranked = np.take_along_axis(scores, local.reshape(candidates[rows].shape), axis=1)
        ranked[padded[rows]] = -np.inf
        out[rows] = np.argmax(ranked, axis=1)
    return out
