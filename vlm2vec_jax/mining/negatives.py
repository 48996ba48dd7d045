"""B3++ hard negatives: per cluster, rows drawn from where the cluster's rankings agree.

For a cluster C (docs/reference.md, "B3 batch mining"): score(j) = appearances of j in R[C, :p+m],
minus 2 for each appearance in R[C, :p] (the false-negative zone), members of C scored 0. |C| x h
rows are drawn without replacement with probability proportional to the positive scores, then
dealt to the members, h each at most, skipping for each query the rows it must never see as a
negative: its own false-negative zone R[i, :p] and rows whose target equals its positive (a
repeated label or answer).
A row's negatives are rows whose positives become extra targets of that row's query.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cluster_negatives"]


def cluster_negatives(
    members: np.ndarray, ranking: np.ndarray, target_id: np.ndarray, p: int, m: int, h: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Up to `h` negative rows for each of `members` (task-local ids, in `members` order)."""
    listed = ranking[members, : p + m].reshape(-1)
    zone = ranking[members, :p].reshape(-1)
    candidates, counts = np.unique(listed[listed >= 0], return_counts=True)
    zone_rows, zone_counts = np.unique(zone[zone >= 0], return_counts=True)
    scores = counts.astype(np.float64)
    scores[np.searchsorted(candidates, zone_rows)] -= 2 * zone_counts  # the zone is a prefix of the list
    scores[np.isin(candidates, members)] = 0
    positive = scores > 0
    candidates, scores = candidates[positive], scores[positive]
    draws = min(len(members) * h, len(candidates))
    pool = rng.choice(candidates, draws, replace=False, p=scores / scores.sum()) if draws else candidates
    used = np.zeros(len(pool), bool)
    dealt = []
    for i in members:
        allowed = ~used & ~np.isin(pool, ranking[i, :p]) & (target_id[pool] != target_id[i])
        pick = np.flatnonzero(allowed)[:h]
        used[pick] = True
        dealt.append(pool[pick])
    return dealt
