"""Batch plans: a pure, deterministic map from a training step to the rows of that step's global batch.

The step is the data position: `plan.batch(step)` depends on nothing but the plan and `step`, so a
run resumed at step k sees exactly the batches an uninterrupted run would have seen, on any number
of hosts and data workers. Rows are indices into the training set's global row order (the order of
the `TrainSet`, which B3 batch files refer to too). A step past the first epoch wraps into the next.

- `RandomBatchPlan`: every epoch a fresh permutation seeded by (seed, epoch). Homogeneous batches
  are drawn within one task (VLM2Vec/B3 batch per subset) and the batches of all tasks shuffled
  together; each task's remainder that does not fill a batch is dropped for that epoch (a different
  remainder every epoch). Mixed batches are one global shuffle, remainder dropped.
- `FileBatchPlan`: the batches of a B3 batch file, in file order. B3 mines a fresh batch order per
  epoch into the file itself, so the plan does not reshuffle: epoch e replays the file's batches
  from the start (a file holding several mined epochs is consumed in full before it wraps).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["BATCH_FILE_COLUMNS", "FINGERPRINT_KEY", "BatchPlan", "FileBatchPlan", "PlannedBatch", "RandomBatchPlan"]

# Columns of a B3 batch file (types in `FileBatchPlan`).
BATCH_FILE_COLUMNS = ("batch", "row", "task", "hard_negatives")
# Optional Parquet key-value metadata: the `TrainSet.fingerprint` the file was mined on.
FINGERPRINT_KEY = b"train_set_fingerprint"


@dataclass(frozen=True)
class PlannedBatch:
    """One global batch: training-set rows (int64, (batch_size,)), each row's hard-negative rows
    (rows whose positives are its extra targets; empty arrays when none) and the batch's task
    (None when the batch mixes tasks)."""

    rows: np.ndarray
    hard_negatives: list[np.ndarray]
    task: str | None


class BatchPlan(Protocol):
    """What the pipeline needs from a plan; `__repr__` must be stable (it names the data position)."""

    batch_size: int

    @property
    def steps_per_epoch(self) -> int: ...

    def batch(self, step: int) -> PlannedBatch: ...


def _digest(*arrays: np.ndarray | Sequence[str]) -> str:
    """A short content fingerprint, the same in every process and run (unlike `hash`)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes() if isinstance(a, np.ndarray) else "\0".join(a).encode())
        h.update(b"|")
    return h.hexdigest()[:12]


def _check_step(step: int) -> int:
    step = int(step)
    if step < 0:
        raise IndexError(f"step must be >= 0, got {step}")
    return step


class RandomBatchPlan:
    """Seeded random batches, homogeneous in task or mixed (see the module docstring)."""

    def __init__(self, task_of_row: Sequence[str], batch_size: int, seed: int, homogeneous: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.task_names, codes = np.unique(np.asarray(task_of_row, dtype=object).astype(str), return_inverse=True)
        self.task_names = [str(t) for t in self.task_names]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.homogeneous = bool(homogeneous)
        self._codes = codes.astype(np.int32)
        self._task_rows = [np.flatnonzero(self._codes == t) for t in range(len(self.task_names))]
        if homogeneous:
            self._steps = sum(len(rows) // self.batch_size for rows in self._task_rows)
        else:
            self._steps = len(self._codes) // self.batch_size
        if self._steps == 0:
            raise ValueError(
                f"batch_size {batch_size} exceeds the rows of every task ({len(self._codes)} rows in total"
                f"{', batches homogeneous in task' if homogeneous else ''}); lower the batch size"
            )
        self._fingerprint = _digest(self._codes, self.task_names)
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def batch(self, step: int) -> PlannedBatch:
        epoch, index = divmod(_check_step(step), self._steps)
        rows, tasks = self._epoch(epoch)
        task = self.task_names[tasks[index]] if self.homogeneous else None
        return PlannedBatch(rows[index].copy(), [np.zeros(0, np.int64)] * self.batch_size, task)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, batch_size) rows and (steps,) task codes of one epoch; the last epoch is cached
        because consecutive steps almost always share it."""
        cache = self._cache
        if cache is not None and cache[0] == epoch:
            return cache[1], cache[2]
        rng = np.random.default_rng([self.seed, epoch])
        b = self.batch_size
        if self.homogeneous:
            chunks, tasks = [], []
            for t, task_rows in enumerate(self._task_rows):
                n = len(task_rows) // b
                chunks.append(rng.permutation(task_rows)[: n * b].reshape(n, b))
                tasks.append(np.full(n, t, np.int32))
            order = rng.permutation(self._steps)
            rows, codes = np.concatenate(chunks)[order], np.concatenate(tasks)[order]
        else:
            rows = rng.permutation(len(self._codes))[: self._steps * b].reshape(self._steps, b)
            codes = np.full(self._steps, -1, np.int32)
        rows = rows.astype(np.int64)
        self._cache = (epoch, rows, codes)
        return rows, codes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # workers rebuild it; keeps pickles small

    def __repr__(self) -> str:
        return (
            f"RandomBatchPlan(rows={len(self._codes)}, tasks={len(self.task_names)}, batch_size={self.batch_size}, "
            f"seed={self.seed}, homogeneous={self.homogeneous}, fingerprint={self._fingerprint})"
        )


class FileBatchPlan:
    """The batches of a B3 batch file (Parquet: `batch` int64, `row` int64, `task` string,
    `hard_negatives` list<int64>), one per step, cycling in file order (see the module docstring).

    A batch is all rows with the same `batch` value, in the order they appear in the file; batches
    are taken by increasing `batch` value, which must run 0, 1, ..., n-1.
    """

    def __init__(
        self,
        rows: np.ndarray,
        negative_offsets: np.ndarray,
        negatives: np.ndarray,
        task_codes: np.ndarray,
        task_names: Sequence[str],
        name: str,
    ) -> None:
        """Prefer `from_parquet`; this takes the validated arrays: rows (steps, B), CSR hard
        negatives per row in row-major order, each batch's task code (-1 = mixed)."""
        self._rows = rows
        self._neg_offsets = negative_offsets
        self._negatives = negatives
        self._task_codes = task_codes
        self.task_names = list(task_names)
        self.batch_size = int(rows.shape[1])
        self.name = name
        self._fingerprint = _digest(rows, negative_offsets, negatives, task_codes, self.task_names)

    @classmethod
    def from_parquet(
        cls, path: str | os.PathLike, num_rows: int, train_set_fingerprint: str | None = None
    ) -> FileBatchPlan:
        """Read and validate a B3 batch file against a training set of `num_rows` rows. When both
        the file's metadata and the caller give a training-set fingerprint they must agree: rows
        mined on another read of the data would silently mean other pairs."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = os.fspath(path)

        def fail(msg: str) -> ValueError:
            return ValueError(f"B3 batch file {path}: {msg}")

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise fail(f"cannot read it as Parquet ({type(e).__name__}: {e})") from e
        _check_schema(table, fail)
        mined_on = (table.schema.metadata or {}).get(FINGERPRINT_KEY)
        if train_set_fingerprint is not None and mined_on is not None and mined_on.decode() != train_set_fingerprint:
            raise fail(
                f"it was mined on training set {mined_on.decode()} but this one is {train_set_fingerprint} "
                "(other subsets, caps or skipped rows); mine again or read the data as it was read for mining"
            )

        batch = table.column("batch").to_numpy()
        row = table.column("row").to_numpy()
        neg_col = table.column("hard_negatives").combine_chunks()
        neg_flat = neg_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        neg_offsets = neg_col.offsets.to_numpy().astype(np.int64)
        neg_offsets = neg_offsets - neg_offsets[0]  # flatten() starts at the first list's values
        task_names, task = np.unique(
            table.column("task").to_numpy(zero_copy_only=False).astype(str), return_inverse=True
        )
        if neg_flat.min(initial=0) < 0 or neg_flat.max(initial=0) >= num_rows:
            raise fail(f"hard_negatives holds rows outside the training set [0, {num_rows})")
        if row.min() < 0 or row.max() >= num_rows:
            bad = row[(row < 0) | (row >= num_rows)][0]
            raise fail(
                f"row {bad} is outside the training set [0, {num_rows}); was it mined on another training set?"
            )

        order = np.argsort(batch, kind="stable")  # by batch id, file order within a batch
        ids, sizes = np.unique(batch[order], return_counts=True)
        if ids[0] != 0 or ids[-1] != len(ids) - 1:
            raise fail(f"batch ids must run 0..n-1 without gaps; found {len(ids)} ids from {ids[0]} to {ids[-1]}")
        if np.any(sizes != sizes[0]):
            bad = int(ids[np.flatnonzero(sizes != sizes[0])[0]])
            raise fail(
                f"batches differ in size: batch 0 has {sizes[0]} rows, batch {bad} has {sizes[ids == bad][0]}; "
                "every batch must have the same size"
            )
        rows = row[order].reshape(len(ids), int(sizes[0]))
        sorted_rows = np.sort(rows, axis=1)
        dup = np.flatnonzero(np.any(sorted_rows[:, 1:] == sorted_rows[:, :-1], axis=1))
        if dup.size:
            raise fail(
                f"batch {int(dup[0])} holds a row twice (a false in-batch negative); rows must be unique per batch"
            )
        tasks = task[order].reshape(rows.shape)
        task_codes = np.where(np.all(tasks == tasks[:, :1], axis=1), tasks[:, 0], -1).astype(np.int32)

        # Reorder the hard-negative lists (CSR) with the rows: list k of the result is list order[k].
        counts = np.diff(neg_offsets)[order]
        new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        gather = np.repeat(neg_offsets[:-1][order] - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
        negatives = neg_flat[gather]
        names = [str(t) for t in task_names]
        return cls(rows.astype(np.int64), new_offsets, negatives, task_codes, names, os.path.basename(path))

    @property
    def steps_per_epoch(self) -> int:
        return int(self._rows.shape[0])

    @property
    def max_hard_negatives(self) -> int:
        """The most hard negatives any row has in the file (0 when the file has none)."""
        return int(np.diff(self._neg_offsets).max(initial=0))

    def batch(self, step: int) -> PlannedBatch:
        index = _check_step(step) % self.steps_per_epoch
        first = index * self.batch_size
        offsets = self._neg_offsets[first : first + self.batch_size + 1]
        code = int(self._task_codes[index])
        return PlannedBatch(
            self._rows[index].copy(),
            [self._negatives[a:b].copy() for a, b in zip(offsets[:-1], offsets[1:])],
            self.task_names[code] if code >= 0 else None,
        )

    def __repr__(self) -> str:
        return (
            f"FileBatchPlan(file={self.name!r}, batches={self.steps_per_epoch}, batch_size={self.batch_size}, "
            f"fingerprint={self._fingerprint})"
        )


def _check_schema(table: pa.Table, fail: Callable[[str], ValueError]) -> None:
    """Columns, Arrow types and nulls of a B3 batch file, each error naming the file (via `fail`)."""
    import pyarrow as pa

    missing = [c for c in BATCH_FILE_COLUMNS if c not in table.column_names]
    if missing:
        raise fail(f"missing column(s) {missing}; it has {table.column_names}, expected {list(BATCH_FILE_COLUMNS)}")
    types = {c: table.schema.field(c).type for c in BATCH_FILE_COLUMNS}
    negatives = types["hard_negatives"]
    expected = {
        "batch": types["batch"] == pa.int64(),
        "row": types["row"] == pa.int64(),
        "task": pa.types.is_string(types["task"]) or pa.types.is_large_string(types["task"]),
        "hard_negatives": (pa.types.is_list(negatives) or pa.types.is_large_list(negatives))
        and negatives.value_type == pa.int64(),
    }
    wrong = [f"{c} is {types[c]}" for c, ok in expected.items() if not ok]
    if wrong:
        raise fail(
            f"wrong column type(s): {', '.join(wrong)}; expected batch int64, row int64, task string, "
            "hard_negatives list<int64>"
        )
    for c in BATCH_FILE_COLUMNS:
        if table.column(c).null_count:
            raise fail(f"column {c!r} has {table.column(c).null_count} null(s); an empty list means no hard negatives")
    if table.num_rows == 0:
        raise fail("it holds no batches")
