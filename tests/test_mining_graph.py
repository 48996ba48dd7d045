"""Mutual graph, exact-K clusters, and planted communities recovered through the whole mining
(real pymetis)."""

import numpy as np
import pytest

from vlm2vec_jax.mining.clusters import exact_clusters, metis_parts
from vlm2vec_jax.mining.graph import mutual_graph
from vlm2vec_jax.mining.miner import MiningSettings, TaskData, mine


def test_mutual_graph_keeps_mutual_pairs_only_without_self_loops():
    neighbours = np.array([
        [1, 2, 0],    # 0-1 mutual, 0->2 one-way, self ignored
        [0, 3, -1],   # 1-3 mutual, -1 = no row
        [3, 1, -1],   # 2-3 mutual, 2->1 one-way
        [1, 2, 2],    # a repeated entry counts once
    ])
    graph = mutual_graph(neighbours)
    adjacency = {i: graph.adjncy[graph.xadj[i] : graph.xadj[i + 1]].tolist() for i in range(4)}
    assert adjacency == {0: [1], 1: [0, 3], 2: [3], 3: [1, 2]}
    assert graph.num_edges == 3
    assert sorted(zip(*(e.tolist() for e in graph.edges()))) == [(0, 1), (1, 3), (2, 3)]


@pytest.mark.parametrize("seed", range(3))
def test_exact_clusters_place_every_row_once_in_clusters_of_exactly_k(seed):
    rng = np.random.default_rng(seed)
    # Uneven parts: oversized, undersized, some part ids never used (METIS can return empty parts).
    parts = rng.choice([0, 1, 2, 5, 6, 9], size=203, p=[0.4, 0.25, 0.15, 0.1, 0.05, 0.05])
    clusters = exact_clusters(parts, 8)
    placed = np.concatenate([clusters.members.reshape(-1), clusters.leftover])
    np.testing.assert_array_equal(np.sort(placed), np.arange(203))
    assert clusters.members.shape == (203 // 8, 8)
    assert len(clusters.leftover) == 203 % 8
    whole = sum(np.sum(parts == p) // 8 for p in np.unique(parts))
    assert clusters.regrouped == (len(clusters.members) - whole) * 8  # every whole chunk of a part kept as is
    for cluster in clusters.members[:whole]:
        assert len(set(parts[cluster])) == 1


def test_metis_parts_of_disjoint_cliques_cut_nothing():
    blocks = np.arange(64) // 8
    graph = mutual_graph(np.stack([np.flatnonzero(blocks == b) for b in blocks]))
    cut, parts = metis_parts(graph, 8, seed=0)
    assert cut == 0
    assert all(len(set(parts[blocks == b])) == 1 for b in range(8))


def test_planted_communities_share_a_batch():
    """48 communities of 8 tight rows each at random centres; S = the 12 best (p = 0): the 7 others
    of its community and 5 rows outside it, so the graph also links communities. At least 95% of the
    planted pairs must land in one batch (random batches of 32 out of 384 rows: about 8%)."""
    rng = np.random.default_rng(0)
    communities, size, dim = 48, 8, 32
    centre = rng.standard_normal((communities, dim))
    planted = np.repeat(np.arange(communities), size)
    order = rng.permutation(len(planted))  # communities scattered over the row order
    planted = planted[order]
    query = centre[planted] + 0.15 * rng.standard_normal((len(planted), dim))
    target = centre[planted] + 0.15 * rng.standard_normal((len(planted), dim))
    task = TaskData("planted", "retrieval", np.arange(len(planted)), query, target)
    batches, report = mine([task], MiningSettings(batch_size=32, cluster_size=8, p=0, m=12))
    batch_of = np.empty(len(planted), np.int64)
    for b, batch in enumerate(batches):
        batch_of[batch.rows] = b
    i, j = np.triu_indices(size, 1)
    members = [np.flatnonzero(planted == c) for c in range(communities)]
    same = [batch_of[rows[i]] == batch_of[rows[j]] for rows in members]
    assert np.mean(same) >= 0.95
    assert report["tasks"][0]["edges_in_batch_b3"] > 2 * report["tasks"][0]["edges_in_batch_random"]
