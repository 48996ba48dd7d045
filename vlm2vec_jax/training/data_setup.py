"""From the config's `data` and `eval` keys to a training set, a batch plan and evaluation records:
MMEB layouts, or the synthetic benchmark generated on first use."""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from vlm2vec_jax.data.batch_plan import BatchPlan, FileBatchPlan, RandomBatchPlan
from vlm2vec_jax.data.mmeb_eval import read_mmeb_eval
from vlm2vec_jax.data.bad_data import BadDataHandler
from vlm2vec_jax.data.mmeb_train import TrainSet, read_mmeb_train
from vlm2vec_jax.data.records import EvalQuery
from vlm2vec_jax.data.synthetic import generate


def data_roots(config: ml_collections.ConfigDict) -> tuple[Path, Path | None]:
    """(MMEB-train root, MMEB-eval root or None). With `data.synthetic` and no roots given, the
    benchmark is generated once under `data.synthetic_dir` and reused."""
    train_root, eval_root = config.data.root, config.eval.root
    if config.data.synthetic and not (train_root and eval_root):
        out = Path(os.path.expanduser(config.data.synthetic_dir)) / f"{config.data.synthetic}-seed{config.seed}"
        generate(out, seed=config.seed, scale=config.data.synthetic)  # every host: the first copy wins
        train_root = train_root or str(out / "train")
        eval_root = eval_root or str(out / "eval")
    if not train_root:
        raise ValueError("data.root is empty: give an MMEB-train directory, or set data.synthetic=default")
    return Path(train_root), Path(eval_root) if eval_root else None


def load_train_set(config: ml_collections.ConfigDict, root: Path, handler: BadDataHandler | None = None) -> TrainSet:
    """The configured training set; `handler` (e.g. one that records what it skips) replaces the
    policy of `data.bad_data`."""
    subsets = "all" if config.data.subsets == "all" else [s.strip() for s in config.data.subsets.split(",") if s.strip()]
    return read_mmeb_train(
        root,
        subsets,
        split=config.data.split,
        image_root=config.data.image_root or None,
        max_rows_per_subset=config.data.max_rows_per_subset or None,
        hard_negatives=config.train.hard_negatives > 0 and not config.data.batch_file,
        positive_prompts=config.data.positive_prompts,
        bad_data=handler or config.data.bad_data,
    )


def batch_plan(config: ml_collections.ConfigDict, train_set: TrainSet) -> BatchPlan:
    """A mined B3 batch file when `data.batch_file` is set, else seeded random batches."""
    if config.data.batch_file:
        plan = FileBatchPlan.from_parquet(config.data.batch_file, len(train_set), train_set.fingerprint)
        if plan.batch_size != config.train.batch_size:
            raise ValueError(
                f"{config.data.batch_file} holds batches of {plan.batch_size} rows but train.batch_size is "
                f"{config.train.batch_size}; set --config.train.batch_size={plan.batch_size}"
            )
        return plan
    tasks = [pair.dataset for pair in train_set]
    return RandomBatchPlan(tasks, config.train.batch_size, config.seed, config.data.homogeneous)


def load_eval_queries(config: ml_collections.ConfigDict, root: Path) -> dict[str, list[EvalQuery]]:
    datasets = "all" if config.eval.datasets == "all" else [s.strip() for s in config.eval.datasets.split(",") if s.strip()]
    return read_mmeb_eval(
        root, datasets, positive_prompts=config.data.positive_prompts, max_rows=config.eval.max_queries or None
    )
