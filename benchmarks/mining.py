"""B3 mining at scale: 100k rows, D = 256, clustered synthetic embeddings, in ONE task (the worst
case: ranking costs grow with the square of a task's rows; MMEB's largest subsets have ~100k rows).

1. The whole mining (`mine_task` + `batch_epochs`: ranking, mutual graph, METIS, exact-K clusters,
   batches; p = 30, m = 100, K = 32, |B| = 1024), each stage timed, then peak resident memory of the
   process (`ru_maxrss`) measured before anything else runs.
2. The exact top-(p+m) ranking against baselines on the same data: a plain numpy blocked version
   (matmul + argpartition + sort of the k best per block) and, when `faiss` is importable,
   faiss-cpu's exact `IndexFlatIP` (k+1 searched, the query's own row dropped). Rankings are
   compared with ours (share of identical (row, rank) entries; ties make tiny differences possible).
Goal: the whole mining under 3 minutes and 4 GB here. The CPU is shared: run on a quiet machine.

    python benchmarks/mining.py [--rows 100000] [--dim 256] [--centres 2000] [--baselines numpy,faiss]
"""

import argparse
import json
import resource
import time

import numpy as np
from tqdm.auto import tqdm

from vlm2vec_jax.mining.miner import MiningSettings, TaskData, batch_epochs, mine_task
from vlm2vec_jax.mining.ranking import unit_rows


def clustered(rows: int, dim: int, centres: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries and targets drawn around shared random centres: neighbourhoods like a real teacher's."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((centres, dim), dtype=np.float32)[rng.integers(centres, size=rows)]
    query = centre + 0.7 * rng.standard_normal((rows, dim), dtype=np.float32)
    target = centre + 0.7 * rng.standard_normal((rows, dim), dtype=np.float32)
    return unit_rows(query), unit_rows(target)


def numpy_rank(query: np.ndarray, target: np.ndarray, k: int, block: int = 512) -> np.ndarray:
    """The plain baseline: per block, scores, own row masked, argpartition, then sort the k best."""
    out = np.empty((len(query), k), np.int64)
    for start in tqdm(range(0, len(query), block), desc="numpy", leave=False):
        scores = query[start : start + block] @ target.T
        rows = np.arange(start, start + len(scores))
        scores[rows - start, rows] = -np.inf
        best = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
        out[start : start + block] = np.take_along_axis(best, order, axis=1)
    return out


def faiss_rank(query: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(target.shape[1])
    index.add(target)
    _, found = index.search(query, k + 1)
    keep = found != np.arange(len(query))[:, None]
    return np.stack([row[mask][:k] for row, mask in zip(found, keep)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--centres", type=int, default=2000)
    parser.add_argument("--baselines", default="numpy,faiss", help="comma-separated: numpy, faiss; '' = none")
    args = parser.parse_args()

    query, target = clustered(args.rows, args.dim, args.centres, seed=0)
    settings = MiningSettings(batch_size=1024, cluster_size=32, p=30, m=100)
    task = TaskData("bench", "retrieval", np.arange(args.rows), query, target)
    start = time.perf_counter()
    mined = mine_task(task, settings, progress=True)
    batches, report = batch_epochs([mined], settings)
    total = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    task_report = report["tasks"][0]
    result = {
        "rows": args.rows, "dim": args.dim,
        "seconds": {**mined.seconds, "batches": report["seconds"]["batches_and_negatives"], "total": total},
        "peak_rss_gb": peak_gb,
        "graph_edges": task_report["graph_edges"], "mean_degree": task_report["mean_degree"],
        "edges_in_batch_b3": task_report["edges_in_batch_b3"],
        "edges_in_batch_random": task_report["edges_in_batch_random"],
        "metis_part_range": task_report["metis_part_range"], "rows_regrouped": task_report["rows_regrouped"],
        "batches": len(batches),
    }
    print(json.dumps(result, indent=2))

    k = settings.p + settings.m
    for name in filter(None, args.baselines.split(",")):
        start = time.perf_counter()
        theirs = numpy_rank(query, target, k) if name == "numpy" else faiss_rank(query, target, k)
        seconds = time.perf_counter() - start
        print(f"ranking {name}: {seconds:.1f} s (ours {mined.seconds['ranking']:.1f} s); "
              f"same (row, rank) entries as ours: {np.mean(theirs == mined.ranking):.4%}")


if __name__ == "__main__":
    main()
