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


# Distinct part sizes shown in the table before it shortens to the range (report.json has them all).
_SIZES_SHOWN = 4


def _part_sizes(task: Mapping) -> str:
    """METIS's part sizes as "size:count ...", or "min..max (n sizes)" when there are many."""
    histogram = task["metis_part_sizes"]
    if len(histogram) <= _SIZES_SHOWN:
        return " ".join(f"{size}:{count}" for size, count in histogram.items())
    return f"{min(histogram, key=int)}..{max(histogram, key=int)} ({len(histogram)} sizes)"


def _stage_seconds(task: Mapping) -> str:
    return "/".join(f"{seconds:.1f}" for seconds in task["seconds"].values())


_COLUMNS = (
    ("task", lambda t: t["task"]),
    ("rows", lambda t: str(t["rows"])),
    ("p", lambda t: str(t["p"])),
    ("edges", lambda t: str(t["graph_edges"])),
    ("in-batch B3", lambda t: f"{t['edges_in_batch_b3']:.1%}"),
    ("in-batch random", lambda t: f"{t['edges_in_batch_random']:.1%}"),
    ("METIS cut", lambda t: f"{t['metis_edge_cut_share']:.1%}"),
    ("METIS part sizes", _part_sizes),
    ("regrouped", lambda t: str(t["rows_regrouped"])),
    ("left over", lambda t: str(t["rows_left_over"])),
    ("batches/epoch", lambda t: str(t["batches_per_epoch"])),
    ("s rank/graph/METIS/clusters", _stage_seconds),
)


def report_table(tasks: Sequence[Mapping]) -> str:
    """A Markdown table, one line per task report."""
    head = [name for name, _ in _COLUMNS]
    lines = [[cell(task) for _, cell in _COLUMNS] for task in tasks]
    widths = [max(len(cell) for cell in column) for column in zip(head, *lines)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(cells) for cells in lines)]) + "\n"


def write_report(path: str | os.PathLike, report: Mapping) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path
