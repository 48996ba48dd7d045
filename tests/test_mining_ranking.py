"""The teacher ranking against numpy brute force, on 1 device and on 8 simulated ones (a subprocess:
the device count is fixed before JAX starts)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from training_runs import xla_flags
from vlm2vec_jax.mining.ranking import LABEL_FRACTION, NO_ROW, rank_by_label, rank_targets, unit_rows


def targets_brute_force(q: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    scores = unit_rows(q) @ unit_rows(t).T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.full((len(q), k), NO_ROW)
    out[:, : min(k, len(q) - 1)] = order[:, : len(q) - 1]
    return out


def labels_brute_force(q: np.ndarray, labels: np.ndarray, gold: np.ndarray, k: int) -> np.ndarray:
    """Row by row: i's labels by similarity minus its gold one, top ceil(30%) kept; rows of those
    labels by label rank, then by query similarity."""
    q, labels = unit_rows(q), unit_rows(labels)
    keep = math.ceil(LABEL_FRACTION * len(labels))
    out = np.full((len(q), k), NO_ROW)
    for i in range(len(q)):
        ranked = [c for c in np.argsort(-(labels @ q[i]), kind="stable") if c != gold[i]][:keep]
        rows = [j for c in ranked for j in sorted(np.flatnonzero(gold == c), key=lambda j: -(q[j] @ q[i]))][:k]
        out[i, : len(rows)] = rows
    return out


def data(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d)).astype(np.float32)
    t = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.standard_normal((classes, d)).astype(np.float32)
    gold = rng.permutation(np.arange(n) % classes)
    return q, t, labels, gold


CASES = [  # (rows, k, block): several padded blocks, and a task smaller than k
    (203, 40, 16),
    (9, 20, 4),
]


@pytest.mark.parametrize("n, k, block", CASES)
def test_rank_targets_equals_brute_force_and_excludes_the_own_positive(n, k, block):
    q, t, _, _ = data(n, 12, 5, seed=n)
    ranking = rank_targets(q, t, k, block=block)
    np.testing.assert_array_equal(ranking, targets_brute_force(q, t, k))
    assert not np.any(ranking == np.arange(n)[:, None])


def test_rank_by_label_equals_brute_force():
    q, _, labels, gold = data(150, 12, 13, seed=1)  # 13 labels: top ceil(3.9) = 4 of the other 12
    ranking = rank_by_label(q, labels[gold], 60, block=16)
    np.testing.assert_array_equal(ranking, labels_brute_force(q, labels, gold, 60))
    listed = ranking >= 0
    assert not np.any((gold[np.where(listed, ranking, 0)] == gold[:, None]) & listed)  # never a row of i's label


EIGHT_DEVICES = """
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from test_mining_ranking import CASES, data, labels_brute_force, targets_brute_force
from vlm2vec_jax.mining.ranking import rank_by_label, rank_targets
assert jax.local_device_count() == 8, jax.devices()
checks = {}
for n, k, block in CASES:
    q, t, _, _ = data(n, 12, 5, seed=n)
    checks[f"targets {n}"] = bool(np.array_equal(rank_targets(q, t, k, block=block), targets_brute_force(q, t, k)))
q, _, labels, gold = data(150, 12, 13, seed=1)
ranking = rank_by_label(q, labels[gold], 60, block=4)
checks["labels"] = bool(np.array_equal(ranking, labels_brute_force(q, labels, gold, 60)))
print(json.dumps(checks))
"""


def test_eight_devices_equal_brute_force():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(8)}
    done = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, os.path.dirname(__file__)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checks = json.loads(done.stdout.strip().splitlines()[-1])
    assert checks == {"targets 203": True, "targets 9": True, "labels": True}
