"""`python -m vlm2vec_jax.mine --config configs/mine_b3.py [--config.key=value ...]`: B3 batch mining
(keys documented in configs/mine_b3.py).

The teacher's vectors come from a model (`teacher`, which embeds the training set's queries and
positives, saved to `out/embeddings.npz` for reruns) or from an .npz (`teacher_embeddings`). With a
training set (`data.root` or `data.synthetic`) the npz rows must be its rows, in its order, and the
batch file records its fingerprint; with the npz alone, rows are the npz's rows. Writes
`out/batches.parquet` (read by the trainer's `data.batch_file`), `out/report.json` and
`out/config.json`, and prints the report's table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ml_collections
import numpy as np

from vlm2vec_jax.cli_config import REPORTED_ERRORS, ConfigError, dump_config, run_cli
from vlm2vec_jax.data.mmeb_train import TrainSet
from vlm2vec_jax.data.registry import UnknownDatasetError, train_subset_info
from vlm2vec_jax.models.model_dir import resolve_model_dir
from vlm2vec_jax.mining.batches import write_batch_file
from vlm2vec_jax.mining.miner import MiningSettings, TaskData, mine
from vlm2vec_jax.mining.report import report_table, write_report

BATCH_FILE = "batches.parquet"
REPORT_FILE = "report.json"
EMBEDDINGS_FILE = "embeddings.npz"
NPZ_KEYS = ("query", "target", "task")


def main(config: ml_collections.ConfigDict) -> int:
    settings = _settings(config)
    out = Path(config.out)
    try:
        start = time.perf_counter()
        train_set, root = _train_set(config)
        query, target, task = _teacher_vectors(config, train_set, out)
        seconds_teacher = time.perf_counter() - start
        batches, report = mine(_tasks(config, query, target, task, root), settings, progress=config.progress)
    except ConfigError:
        raise  # a usage error (e.g. a teacher directory that holds no model): run_cli reports it, exit 2
    except REPORTED_ERRORS as err:
        print(f"vlm2vec_jax.mine: error: {err}", file=sys.stderr)
        return 1
    fingerprint = train_set.fingerprint if train_set is not None else None
    write_batch_file(out / BATCH_FILE, batches, fingerprint)
    report["seconds"]["teacher_and_data"] = seconds_teacher
    report["train_set_fingerprint"] = fingerprint
    write_report(out / REPORT_FILE, report)
    dump_config(config, out / "config.json")
    print(report_table(report["tasks"]), end="")
    print(
        f"{report['batches']} batches of {settings.batch_size} rows ({settings.epochs} epoch(s), "
        f"{settings.hard_negatives} hard negatives per row) -> {out / BATCH_FILE}; report: {out / REPORT_FILE}"
    )
    return 0


def _settings(config: ml_collections.ConfigDict) -> MiningSettings:
    """The mining settings, or a ConfigError for keys that cannot work together."""
    if bool(config.teacher) == bool(config.teacher_embeddings):
        raise ConfigError(
            "set exactly one of config.teacher (a model directory) and config.teacher_embeddings (an .npz)"
        )
    if config.teacher and not (config.data.root or config.data.synthetic):
        raise ConfigError("a teacher model embeds the training set: set config.data.root or config.data.synthetic")
    if config.teacher:
        resolve_model_dir(config.teacher)  # before reading any data
    settings = MiningSettings(
        batch_size=config.batch_size, cluster_size=config.cluster_size, p=config.p, m=config.m,
        hard_negatives=config.hard_negatives, epochs=config.epochs, seed=config.seed, block=config.ranking_block,
    )
    try:
        settings.check()
    except ValueError as err:
        raise ConfigError(f"config: {err}") from None
    return settings


def _train_set(config: ml_collections.ConfigDict) -> tuple[TrainSet | None, Path | None]:
    """The training set the trainer would read with these data keys (None when none is given), and
    its root. The trainer's own functions read it, through a config shaped like a training config
    that trains on a batch file (so explicit hard negatives are not read, as in training)."""
    if not (config.data.root or config.data.synthetic):
        return None, None
    from vlm2vec_jax.training.data_setup import data_roots, load_train_set

    view = ml_collections.ConfigDict(
        {"seed": config.seed, "data": {**config.data.to_dict(), "batch_file": BATCH_FILE},
         "eval": {"root": ""}, "train": {"hard_negatives": config.hard_negatives}}
    )
    root, _ = data_roots(view)
    return load_train_set(view, root), root


def _teacher_vectors(
    config: ml_collections.ConfigDict, train_set: TrainSet | None, out: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query (N, D), target (N, D), task (N,) str) in training-set order."""
    if config.teacher:
        query, target = _embed(config, train_set)
        task = np.asarray([pair.dataset for pair in train_set])
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / EMBEDDINGS_FILE, query=query, target=target, task=task)
        return query, target, task
    query, target, task = _load_npz(config.teacher_embeddings)
    if train_set is not None:
        where = f"teacher_embeddings {config.teacher_embeddings}"
        if len(task) != len(train_set):
            raise ValueError(
                f"{where} has {len(task)} rows but the training set has {len(train_set)}: it was embedded from "
                "another read of the data (other subsets, caps or skipped rows)"
            )
        expected = np.asarray([pair.dataset for pair in train_set])
        wrong = np.flatnonzero(task != expected)
        if wrong.size:
            i = int(wrong[0])
            raise ValueError(f"{where}: row {i} is task {task[i]!r} but training-set row {i} is {expected[i]!r}")
    return query, target, task


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    where = f"teacher_embeddings {path}"
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise ValueError(
                    f"{where}: missing key(s) {missing}; it has {data.files}, "
                    "expected query (N, D), target (N, D), task (N,)"
                )
            query, target, task = (data[k] for k in NPZ_KEYS)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"{where}: cannot read it as an .npz ({err})") from None
    if query.ndim != 2 or target.shape != query.shape or task.shape != (len(query),):
        raise ValueError(
            f"{where}: expected query (N, D), target (N, D) and task (N,); "
            f"got {query.shape}, {target.shape}, {task.shape}"
        )
    return query, target, task.astype(str)


def _embed(config: ml_collections.ConfigDict, train_set: TrainSet) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's vectors of every query and positive, each distinct side encoded once."""
    from vlm2vec_jax.embedder import Embedder
    from vlm2vec_jax.evaluation.encoding import SideEncoder
    from vlm2vec_jax.evaluation.sides import SideTable

    embedder = Embedder.from_pretrained(
        resolve_model_dir(config.teacher), dtype=config.teacher_dtype, max_len=config.teacher_max_len or None
    )
    table = SideTable()
    queries = [table.add(pair.query, i, "qry_image_path") for i, pair in enumerate(train_set)]
    positives = [table.add(pair.positive, i, "pos_image_path") for i, pair in enumerate(train_set)]
    encode = SideEncoder(embedder, batch_size=config.teacher_batch_size, show_progress=config.progress)
    vectors, _ = encode(table, "the training set")
    return vectors[queries], vectors[positives]


def _tasks(
    config: ml_collections.ConfigDict, query: np.ndarray, target: np.ndarray, task: np.ndarray, root: Path | None
) -> list[TaskData]:
    """Rows grouped by task, tasks in order of first appearance, each with its meta-task."""
    names, first = np.unique(task, return_index=True)
    tasks = []
    for name in names[np.argsort(first)]:
        rows = np.flatnonzero(task == name)
        tasks.append(TaskData(str(name), _meta_task(config, str(name), root), rows, query[rows], target[rows]))
    return tasks


def _meta_task(config: ml_collections.ConfigDict, name: str, root: Path | None) -> str:
    try:
        return train_subset_info(name, root).meta_task
    except UnknownDatasetError as err:
        if config.meta_task:
            return config.meta_task
        raise ValueError(f"{err}; or set config.meta_task for every task the table does not know") from None


if __name__ == "__main__":
    sys.exit(run_cli(main, command="vlm2vec_jax.mine", example_config="configs/mine_b3.py"))
