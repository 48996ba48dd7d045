"""Batches from clusters, epoch by epoch, and the batch file the trainer reads (`FileBatchPlan`).

A batch is |B| / K clusters of one task. Each epoch shuffles every task's clusters with its own
seeded generator and groups them; a task's last incomplete group is dropped (a different one each
epoch). Tasks are interleaved evenly: the i-th of a task's n batches lands at a random point of
the i-th n-th of the epoch, so no task's batches bunch up at one end.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlm2vec_jax.data.batch_plan import BATCH_FILE_COLUMNS, FINGERPRINT_KEY

__all__ = ["MinedBatch", "epoch_order", "write_batch_file"]


@dataclass(frozen=True)
class MinedBatch:
    """One batch: its task, training-set rows (B,) and each row's hard-negative rows."""

    task: str
    rows: np.ndarray
    hard_negatives: list[np.ndarray]


def epoch_order(
    cluster_counts: Sequence[int], clusters_per_batch: int, rng: np.random.Generator
) -> list[tuple[int, np.ndarray]]:
    """One epoch's batches as (task index, indices of its clusters), in training order."""
    groups: list[tuple[int, np.ndarray]] = []
    keys = []
    for task, count in enumerate(cluster_counts):
        n = count // clusters_per_batch
        chosen = rng.permutation(count)[: n * clusters_per_batch].reshape(n, clusters_per_batch)
        groups += [(task, clusters) for clusters in chosen]
        keys.append((np.arange(n) + rng.random(n)) / max(n, 1))
    order = np.argsort(np.concatenate(keys), kind="stable")
    return [groups[i] for i in order]


def write_batch_file(path: str | os.PathLike, batches: Sequence[MinedBatch], train_set_fingerprint: str | None) -> Path:
    """Write `batches` in file order as the Parquet batch file `FileBatchPlan` reads, atomically.
    The fingerprint (when mining from a training set) lets the trainer refuse another read of the data."""
    path = Path(path)
    size = len(batches[0].rows)
    negatives = [n.astype(np.int64) for b in batches for n in b.hard_negatives]
    offsets = np.concatenate([[0], np.cumsum([len(n) for n in negatives])]).astype(np.int32)
    values = np.concatenate(negatives) if negatives else np.zeros(0, np.int64)
    columns = {
        "batch": pa.array(np.repeat(np.arange(len(batches), dtype=np.int64), size)),
        "row": pa.array(np.concatenate([b.rows for b in batches]).astype(np.int64)),
        "task": pa.array([b.task for b in batches for _ in range(size)], pa.string()),
        "hard_negatives": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64())),
    }
    metadata = {FINGERPRINT_KEY: train_set_fingerprint.encode()} if train_set_fingerprint else None
    table = pa.table([columns[c] for c in BATCH_FILE_COLUMNS], names=list(BATCH_FILE_COLUMNS), metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
