"""Batches and B3++ negatives: every row at most once per epoch (exactly once for whole tasks),
fixed batch size, one task per batch, tasks interleaved, negatives never false ones, same seed ->
same file bytes."""

import numpy as np
import pytest

from vlm2vec_jax.mining.batches import epoch_order, write_batch_file
from vlm2vec_jax.mining.miner import MiningSettings, TaskData, batch_epochs, mine_task
from vlm2vec_jax.mining.negatives import cluster_negatives
from vlm2vec_jax.mining.ranking import target_ids

BATCH, K = 32, 8
# (name, meta-task, rows): 128 and 96 fill whole batches, 100 leaves 4 batches + 4 rows over.
TASKS = [("VisDial", "retrieval", 128), ("ImageNet_1K", "classification", 100), ("OK-VQA", "vqa", 96)]


def make_tasks(seed: int = 0) -> list[TaskData]:
    """Rows of the three tasks interleaved in the global order; clustered vectors; the classification
    task's targets are 7 labels, the VQA task repeats a few answers (duplicate targets)."""
    rng = np.random.default_rng(seed)
    owner = rng.permutation(np.repeat(np.arange(len(TASKS)), [n for _, _, n in TASKS]))
    tasks = []
    for t, (name, meta, n) in enumerate(TASKS):
        centre = rng.standard_normal((12, 16))[rng.integers(12, size=n)]
        query = centre + 0.5 * rng.standard_normal((n, 16))
        target = centre + 0.5 * rng.standard_normal((n, 16))
        if meta == "classification":
            target = rng.standard_normal((7, 16))[rng.integers(7, size=n)]
        if meta == "vqa":
            target[::4] = target[0]  # "yes" answers: one positive shared by a quarter of the rows
        tasks.append(TaskData(name, meta, np.flatnonzero(owner == t), query, target))
    return tasks


@pytest.fixture(scope="module")
def mined():
    settings = MiningSettings(batch_size=BATCH, cluster_size=K, m=20, p=-1, hard_negatives=3, epochs=3, seed=5)
    per_task = [mine_task(task, settings) for task in make_tasks()]
    batches, report = batch_epochs(per_task, settings)
    return per_task, batches, report


def test_every_row_once_per_epoch_in_fixed_size_single_task_batches(mined):
    per_task, batches, report = mined
    task_of_row = {int(r): m.task.name for m in per_task for r in m.task.rows}
    per_epoch = sum(n // BATCH for _, _, n in TASKS)
    assert len(batches) == 3 * per_epoch == 3 * report["batches_per_epoch"]
    epochs = [batches[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
    for epoch in epochs:
        assert all(len(b.rows) == BATCH for b in epoch)
        assert all({task_of_row[int(r)] for r in b.rows} == {b.task} for b in epoch)
        rows = np.concatenate([b.rows for b in epoch])
        assert len(np.unique(rows)) == len(rows)  # no row twice in an epoch
        for m in per_task:
            covered = np.isin(m.task.rows, rows).sum()
            assert covered == len(m.task.rows) // BATCH * BATCH  # whole tasks: every row; others lose the remainder
    assert [b.rows.tolist() for b in epochs[0]] != [b.rows.tolist() for b in epochs[1]]  # reshuffled per epoch


def test_negatives_are_never_false_negatives(mined):
    per_task, batches, _ = mined
    by_name = {m.task.name: m for m in per_task}
    dealt = dict.fromkeys(by_name, 0)
    for batch in batches:
        m = by_name[batch.task]
        local = {int(r): i for i, r in enumerate(m.task.rows)}
        ids = target_ids(m.task.targets)
        for position, (row, negatives) in enumerate(zip(batch.rows, batch.hard_negatives)):
            i = local[int(row)]
            cluster = batch.rows[position // K * K : (position // K + 1) * K]
            assert len(negatives) <= 3 and len(np.unique(negatives)) == len(negatives)
            assert all(int(n) in local for n in negatives)  # same task
            neg = np.array([local[int(n)] for n in negatives], dtype=np.int64)
            assert not np.isin(negatives, cluster).any()  # never a member (row itself included)
            assert not np.isin(neg, m.ranking[i, : m.p]).any()  # never in its false-negative zone
            assert not np.any(ids[neg] == ids[i])  # never a copy of its own positive
            dealt[batch.task] += len(negatives)
    slots = {name: 3 * BATCH * sum(b.task == name for b in batches) for name in by_name}
    # Almost every row gets its h; not in the 96-row VQA task, whose p = 70 puts most rows in every zone.
    assert dealt["VisDial"] > 0.9 * slots["VisDial"] and dealt["ImageNet_1K"] > 0.9 * slots["ImageNet_1K"]


def test_negative_scores_follow_the_unified_distribution():
    """Cluster {0, 1}, p = 1, m = 3. Row 5: twice in R[C, :4], never in the zone -> score 2. Row 6:
    in the zone once (-2) and listed twice -> 0, never drawn. Rows 7 and 9: once -> 1. Row 1 is a
    member -> 0. With h = 1 two of {5, 7, 9} are drawn: 5 is left out with probability 1/6 (1/3 if
    the draw ignored the scores)."""
    ranking = np.array([[6, 5, 7, 1], [1, 5, 6, 9]] + [[0, 0, 0, 0]] * 8)
    rng = np.random.default_rng(0)
    drawn = [cluster_negatives(np.array([0, 1]), ranking, np.arange(10), p=1, m=3, h=1, rng=rng) for _ in range(600)]
    pools = [set(np.concatenate(d).tolist()) for d in drawn]
    assert all(len(pool) == 2 and pool <= {5, 7, 9} for pool in pools)
    assert all(6 not in d[0] for d in drawn)  # 6 is in row 0's zone (and scores 0 anyway)
    assert np.mean([5 not in pool for pool in pools]) < 0.25


def test_tasks_are_interleaved():
    rng = np.random.default_rng(0)
    for _ in range(20):
        order = [task for task, _ in epoch_order([16, 16], 2, rng)]  # 8 batches of each task
        changes = np.flatnonzero(np.diff(order)) + 1
        runs = np.diff([0, *changes, len(order)])  # lengths of same-task stretches
        assert runs.max() <= 2


def test_same_seed_same_file_bytes(tmp_path):
    def run(seed: int, name: str) -> bytes:
        settings = MiningSettings(batch_size=BATCH, cluster_size=K, m=20, hard_negatives=2, epochs=2, seed=seed)
        batches, _ = batch_epochs([mine_task(task, settings) for task in make_tasks()], settings)
        return write_batch_file(tmp_path / name, batches, "abc").read_bytes()

    assert run(1, "a.parquet") == run(1, "b.parquet")
    assert run(1, "a.parquet") != run(2, "c.parquet")
