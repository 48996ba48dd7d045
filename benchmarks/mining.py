"""B3 mining at scale: 100k rows, D = 256, clustered synthetic embeddings, in ONE task (the worst
case: ranking costs grow with the square of a task's rows; MMEB's largest subsets have ~100k rows).

1. The whole mining (`mine_task` + `batch_epochs`: ranking, mutual graph, METIS, exact-K clusters,
   batches; p = 30, m = 100, K = 32, |B| = 1024), each stage timed, then peak resident memory of the
   process (`ru_maxrss`) measured before anything else runs. `--tasks T` splits the rows into T
   tasks (ranking then costs 1/T: it is per task).
2. The exact top-(p+m) ranking of one task of `--compare-rows` rows (default 20k: each round is
   seconds, so rounds can be interleaved on a shared CPU) against baselines: a plain numpy blocked
   version (matmul + argpartition + sort of the k best per block) and, when `faiss` is importable,
   faiss-cpu's exact `IndexFlatIP` (k+1 searched, the query's own row dropped). Median of
   `--repeats` interleaved rounds; rankings compared with ours (share of identical (row, rank)
   entries: float rounding differs between BLAS libraries, so near-ties can swap).
Goal: the whole mining under 3 minutes and 4 GB here. The CPU is shared: run on a quiet machine.

    python benchmarks/mining.py [--rows 100000] [--dim 256] [--centres 2000] [--tasks 1] [--baselines numpy,faiss]
"""

import argparse
import json
import resource
import statistics
import time

import numpy as np
from tqdm.auto import tqdm

from vlm2vec_jax.mining.miner import MiningSettings, TaskData, batch_epochs, mine_task
from vlm2vec_jax.mining.ranking import rank_targets, unit_rows
from vlm2vec_jax.mining.report import report_table


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
    parser.add_argument("--tasks", type=int, default=1, help="split the rows into this many equal tasks")
    parser.add_argument("--baselines", default="numpy,faiss", help="comma-separated: numpy, faiss; '' = none")
    parser.add_argument("--compare-rows", type=int, default=20_000, help="rows of the ranking comparison")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    query, target = clustered(args.rows, args.dim, args.centres, seed=0)
    settings = MiningSettings(batch_size=1024, cluster_size=32, p=30, m=100)
    split = np.array_split(np.arange(args.rows), args.tasks)
    tasks = [TaskData(f"task{t}", "retrieval", rows, query[rows], target[rows]) for t, rows in enumerate(split)]
    start = time.perf_counter()
    mined = [mine_task(task, settings, progress=True) for task in tasks]
    batches, report = batch_epochs(mined, settings)
    total = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(report_table(report["tasks"]), end="")
    seconds = {**report["seconds"], "total": total}
    print(json.dumps({"rows": args.rows, "dim": args.dim, "tasks": args.tasks, "batches": len(batches),
                      "seconds": seconds, "peak_rss_gb": peak_gb}, indent=2))

    compare(query[: args.compare_rows], target[: args.compare_rows], settings.p + settings.m, args)


def compare(query: np.ndarray, target: np.ndarray, k: int, args: argparse.Namespace) -> None:
    """Ranking of one task of `len(query)` rows: ours against the baselines, runs interleaved (the
    CPU is shared, so each round sees the same load), median seconds, agreement with ours. Ours
    includes its compilation, as in mining (one per task)."""
    methods = {"ours": lambda: rank_targets(query, target, k)}
    if "numpy" in args.baselines:
        methods["numpy"] = lambda: numpy_rank(query, target, k)
    if "faiss" in args.baselines:
        methods["faiss"] = lambda: faiss_rank(query, target, k)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    rankings = {}
    for _ in range(args.repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            rankings[name] = run()
            seconds[name].append(time.perf_counter() - start)
    for name, times in seconds.items():
        same = np.mean(rankings[name] == rankings["ours"])
        print(f"ranking {len(query)} rows, {name}: median {statistics.median(times):.2f} s of {times} "
              f"(same (row, rank) entries as ours: {same:.4%})")


if __name__ == "__main__":
    main()
