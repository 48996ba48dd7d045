"""B3 mining end to end, from teacher embeddings to batches: per task rank, graph, METIS, exact-K
clusters; then, epoch by epoch, batches of clusters (and B3++ negatives) with tasks interleaved.

Everything random is seeded by `MiningSettings.seed` (METIS included), so the same embeddings and
settings give the same batches, byte for byte in the file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from vlm2vec_jax.mining.batches import MinedBatch, epoch_order
from vlm2vec_jax.mining.clusters import Clusters, exact_clusters, metis_parts
from vlm2vec_jax.mining.graph import Graph, mutual_graph, strong_negatives
from vlm2vec_jax.mining.negatives import cluster_negatives
from vlm2vec_jax.mining.ranking import rank_by_label, rank_targets, target_ids
from vlm2vec_jax.mining.report import edges_in_batches, random_batch_of, size_histogram

__all__ = ["DEFAULT_P", "MinedTask", "MiningSettings", "TaskData", "batch_epochs", "mine", "mine_task"]

# Ranks skipped as likely false negatives, by meta-task (B3 section 4). Classification skips none:
# its false negatives are the rows of the gold label, which its label ranking never lists.
DEFAULT_P = {"retrieval": 30, "grounding": 30, "vqa": 70, "classification": 0}


@dataclass(frozen=True)
class MiningSettings:
    """`p` < 0 means DEFAULT_P of each task's meta-task; `block`: queries per device per ranking step."""

    batch_size: int
    cluster_size: int = 32
    p: int = -1
    m: int = 100
    hard_negatives: int = 0
    epochs: int = 1
    seed: int = 0
    block: int = 512

    def p_for(self, meta_task: str) -> int:
        return self.p if self.p >= 0 else DEFAULT_P[meta_task]

    def check(self) -> None:
        """A ValueError naming the first setting that cannot work."""
        if self.cluster_size < 1 or self.batch_size < 1 or self.batch_size % self.cluster_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of cluster_size ({self.cluster_size}): "
                "a batch is batch_size / cluster_size whole clusters"
            )
        for name in ("m", "epochs", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")


@dataclass(frozen=True)
class TaskData:
    """One task's rows (global training-set indices) and their teacher vectors (N, D) each side."""

    name: str
    meta_task: str
    rows: np.ndarray
    queries: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class MinedTask:
    """One task after the per-task stages (node ids are positions in `TaskData.rows`; `target_id`
    only when hard negatives are asked for)."""

    task: TaskData
    p: int
    ranking: np.ndarray
    graph: Graph
    edge_cut: int
    parts: np.ndarray
    clusters: Clusters
    target_id: np.ndarray | None
    seconds: dict[str, float]


def mine(
    tasks: Sequence[TaskData], settings: MiningSettings, *, progress: bool = False
) -> tuple[list[MinedBatch], dict]:
    """(batches of every epoch in training order, the report's dict)."""
    settings.check()
    for task in tasks:
        if len(task.rows) < settings.batch_size:
            raise ValueError(
                f"task {task.name!r} has {len(task.rows)} rows, fewer than one batch of {settings.batch_size}: "
                "lower batch_size, or leave the task out (data.subsets)"
            )
    return batch_epochs([mine_task(task, settings, progress) for task in tasks], settings, progress=progress)


def batch_epochs(
    mined: Sequence[MinedTask], settings: MiningSettings, *, progress: bool = False
) -> tuple[list[MinedBatch], dict]:
    """The batches of every epoch from mined tasks, and the report (the second half of `mine`)."""
    start = time.perf_counter()
    per_batch = settings.batch_size // settings.cluster_size
    batches: list[MinedBatch] = []
    first_epoch: list[tuple[int, np.ndarray]] = []
    total = sum(len(t.clusters.members) // per_batch for t in mined) * settings.epochs
    with tqdm(total=total, desc="batches", unit="batch", disable=not progress, leave=False) as bar:
        for epoch in range(settings.epochs):
            order_rng = np.random.default_rng([settings.seed, epoch])
            order = epoch_order([len(t.clusters.members) for t in mined], per_batch, order_rng)
            negatives_rng = np.random.default_rng([settings.seed, epoch, 1])
            first_epoch = first_epoch or order
            for index, clusters in order:
                batches.append(_batch(mined[index], clusters, settings, negatives_rng))
                bar.update()
    seconds_batches = time.perf_counter() - start

    reports = [_task_report(t, i, first_epoch, settings) for i, t in enumerate(mined)]
    stage_totals = {stage: sum(r["seconds"][stage] for r in reports) for stage in reports[0]["seconds"]}
    report = {
        "settings": asdict(settings),
        "rows": sum(len(t.task.rows) for t in mined),
        "batches": len(batches),
        "batches_per_epoch": len(batches) // settings.epochs,
        "seconds": {**stage_totals, "batches_and_negatives": seconds_batches},
        "tasks": reports,
    }
    return batches, report


def mine_task(task: TaskData, settings: MiningSettings, progress: bool = False) -> MinedTask:
    """Rank, graph, METIS and exact-K clusters of one task, each stage timed."""
    if task.meta_task not in DEFAULT_P:
        raise ValueError(f"task {task.name!r}: unknown meta-task {task.meta_task!r}; one of {list(DEFAULT_P)}")
    seconds = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    p = settings.p_for(task.meta_task)
    rank = rank_by_label if task.meta_task == "classification" else rank_targets
    ranking = rank(task.queries, task.targets, p + settings.m, block=settings.block, desc=task.name, progress=progress)
    lap("ranking")
    graph = mutual_graph(strong_negatives(ranking, p, settings.m))
    lap("graph")
    edge_cut, parts = metis_parts(graph, len(task.rows) // settings.cluster_size, settings.seed)
    lap("metis")
    clusters = exact_clusters(parts, settings.cluster_size)
    lap("clusters")
    ids = target_ids(task.targets) if settings.hard_negatives else None
    return MinedTask(task, p, ranking, graph, edge_cut, parts, clusters, ids, seconds)


def _batch(mined: MinedTask, clusters: np.ndarray, settings: MiningSettings, rng: np.random.Generator) -> MinedBatch:
    """The rows of `clusters` of a task, with B3++ negatives when asked, as training-set rows."""
    members = mined.clusters.members[clusters]
    rows = mined.task.rows
    if settings.hard_negatives:
        negatives = [
            rows[n]
            for cluster in members
            for n in cluster_negatives(
                cluster, mined.ranking, mined.target_id, mined.p, settings.m, settings.hard_negatives, rng
            )
        ]
    else:
        negatives = [np.zeros(0, np.int64)] * members.size
    return MinedBatch(mined.task.name, rows[members.reshape(-1)], negatives)


def _task_report(
    mined: MinedTask, index: int, first_epoch: list[tuple[int, np.ndarray]], settings: MiningSettings
) -> dict:
    """The task's line of the report; in-batch shares are over the first epoch's batches."""
    task, graph = mined.task, mined.graph
    b3_batch_of = np.full(len(task.rows), -1, np.int64)
    for batch, (owner, clusters) in enumerate(first_epoch):
        if owner == index:
            b3_batch_of[mined.clusters.members[clusters].reshape(-1)] = batch
    random_rng = np.random.default_rng([settings.seed, index, 2])
    random_batch = random_batch_of(len(task.rows), settings.batch_size, random_rng)
    part_sizes = np.bincount(mined.parts, minlength=max(1, len(task.rows) // settings.cluster_size))
    batches = int(sum(owner == index for owner, _ in first_epoch))
    return {
        "task": task.name,
        "meta_task": task.meta_task,
        "rows": len(task.rows),
        "p": mined.p,
        "m": settings.m,
        "graph_edges": graph.num_edges,
        "mean_degree": 2 * graph.num_edges / len(task.rows),
        "edges_in_batch_b3": edges_in_batches(graph, b3_batch_of),
        "edges_in_batch_random": edges_in_batches(graph, random_batch),
        "metis_edge_cut": mined.edge_cut,
        "metis_edge_cut_share": mined.edge_cut / graph.num_edges if graph.num_edges else 0.0,
        "metis_part_sizes": size_histogram(part_sizes),
        "clusters": len(mined.clusters.members),
        "rows_regrouped": mined.clusters.regrouped,
        "rows_left_over": len(mined.clusters.leftover),
        "batches_per_epoch": batches,
        "rows_dropped_per_epoch": len(task.rows) - batches * settings.batch_size,
        "seconds": mined.seconds,
        "seconds_total": sum(mined.seconds.values()),
    }
