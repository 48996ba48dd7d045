"""What a mining run did, per task: how much of B3's graph its batches hold against random batches of
the same size (the quantity B3 maximises), METIS's edge cut, cluster sizes, and time per stage.
Written as report.json and printed as a table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vlm2vec_jax.mining.graph import Graph

__all__ = ["edges_in_batches", "random_batch_of", "report_table", "size_histogram", "write_report"]

_NO_BATCH = -1


def edges_in_batches(graph: Graph, batch_of: np.ndarray) -> float:
    """Share of the graph's edges whose two ends are in the same batch (`batch_of`: (N,) batch id
    per node, -1 = in no batch this epoch); 0 for a graph without edges."""
    u, v = graph.edges()
    if not len(u):
        return 0.0
    same = (batch_of[u] == batch_of[v]) & (batch_of[u] != _NO_BATCH)
    return float(same.mean())


def random_batch_of(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Batch id per node under one seeded random epoch of `batch_size` batches (remainder in none):
    the baseline B3 is measured against."""
    batch_of = np.full(n, _NO_BATCH, np.int64)
    full = n // batch_size * batch_size
    batch_of[rng.permutation(n)[:full]] = np.arange(full) // batch_size
    return batch_of


def size_histogram(sizes: np.ndarray) -> dict[str, int]:
    """{size: how many}, sizes as strings (JSON keys), ascending."""
    values, counts = np.unique(np.asarray(sizes), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


_COLUMNS = (
    ("task", "task", "{}"),
    ("rows", "rows", "{}"),
    ("p", "p", "{}"),
    ("edges", "graph_edges", "{}"),
    ("in-batch B3", "edges_in_batch_b3", "{:.1%}"),
    ("in-batch random", "edges_in_batch_random", "{:.1%}"),
    ("METIS cut", "metis_edge_cut_share", "{:.1%}"),
    ("parts min/max", "metis_part_range", "{}"),
    ("regrouped", "rows_regrouped", "{}"),
    ("left over", "rows_left_over", "{}"),
    ("batches/epoch", "batches_per_epoch", "{}"),
    ("time s", "seconds_total", "{:.1f}"),
)


def report_table(tasks: Sequence[Mapping]) -> str:
    """A Markdown table, one line per task report."""
    head = [name for name, _, _ in _COLUMNS]
    lines = [[fmt.format(task[key]) for _, key, fmt in _COLUMNS] for task in tasks]
    widths = [max(len(cell) for cell in column) for column in zip(head, *lines)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(cells) for cells in lines)]) + "\n"


def write_report(path: str | os.PathLike, report: Mapping) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path
