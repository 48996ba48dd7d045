"""`python -m vlm2vec_jax.mine` end to end: from an npz alone, from a training set (the synthetic
benchmark) whose loader then feeds exactly the mined rows and negatives, and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlm2vec_jax.cli_config import run_cli
from vlm2vec_jax.data.batch_plan import FINGERPRINT_KEY, FileBatchPlan
from vlm2vec_jax.data.pipeline import TrainBatchSource, content_key, make_train_iterator
from vlm2vec_jax.mine import main

CONFIG = str(Path(__file__).parents[1] / "configs" / "mine_b3.py")


def write_npz(path: Path, tasks: list[tuple[str, int]], seed: int = 0, **drop: bool) -> Path:
    """Clustered random vectors for `tasks` ((name, rows) in row order); `drop` leaves keys out."""
    rng = np.random.default_rng(seed)
    task = np.concatenate([[name] * n for name, n in tasks])
    centre = rng.standard_normal((16, 24))[rng.integers(16, size=len(task))]
    arrays = {
        "query": (centre + 0.5 * rng.standard_normal(centre.shape)).astype(np.float32),
        "target": (centre + 0.5 * rng.standard_normal(centre.shape)).astype(np.float32),
        "task": task,
    }
    np.savez(path, **{k: v for k, v in arrays.items() if not drop.get(k)})
    return path


def mine_cli(capsys, *overrides: str) -> tuple[int, str]:
    """(exit code, stderr) of the CLI run in this process."""
    argv = ["mine", f"--config={CONFIG}", "--config.progress=false", *overrides]
    code = run_cli(main, argv, command="vlm2vec_jax.mine", example_config="configs/mine_b3.py")
    return code, capsys.readouterr().err


def test_cli_from_an_npz_alone(tmp_path):
    npz = write_npz(tmp_path / "teacher.npz", [("MSCOCO_t2i", 96), ("OK-VQA", 160)])
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "vlm2vec_jax.mine", f"--config={CONFIG}", f"--config.teacher_embeddings={npz}",
        f"--config.out={out}", "--config.batch_size=32", "--config.cluster_size=8", "--config.m=20",
        "--config.hard_negatives=2", "--config.progress=false",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| MSCOCO_t2i" in done.stdout and "| OK-VQA" in done.stdout  # the printed table
    plan = FileBatchPlan.from_parquet(out / "batches.parquet", 256)
    assert plan.steps_per_epoch == 96 // 32 + 160 // 32 and plan.batch_size == 32
    assert plan.max_hard_negatives == 2
    assert FINGERPRINT_KEY not in (pq.read_schema(out / "batches.parquet").metadata or {})  # no training set
    report = json.loads((out / "report.json").read_text())
    assert [t["task"] for t in report["tasks"]] == ["MSCOCO_t2i", "OK-VQA"]
    assert [t["p"] for t in report["tasks"]] == [30, 70]  # per meta-task defaults
    assert set(report["seconds"]) >= {"ranking", "graph", "metis", "clusters", "batches_and_negatives"}
    assert report["tasks"][0]["metis_part_sizes"] and "edges_in_batch_random" in report["tasks"][0]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, list]:
    """The small synthetic benchmark's training set, read as the trainer reads it."""
    from vlm2vec_jax.training.data_setup import data_roots, load_train_set

    sys.path.insert(0, str(Path(CONFIG).parent))
    from common import base

    config = base()
    config.data.synthetic = "small"
    config.data.synthetic_dir = str(tmp_path_factory.mktemp("synthetic"))
    root, _ = data_roots(config)
    return config, load_train_set(config, root)


def test_the_training_loader_feeds_exactly_the_mined_rows(synthetic, tiny_ckpt, tmp_path, capsys):
    from vlm2vec_jax.training.data_setup import batch_plan, data_roots, load_train_set

    config, train_set = synthetic
    tasks = [(name, len(train_set.subset_range(name))) for name in train_set.names]
    npz = write_npz(tmp_path / "teacher.npz", tasks)
    out = tmp_path / "mined"
    code, err = mine_cli(
        capsys, f"--config.teacher_embeddings={npz}", "--config.data.synthetic=small",
        f"--config.data.synthetic_dir={config.data.synthetic_dir}", f"--config.out={out}",
        "--config.batch_size=32", "--config.cluster_size=8", "--config.m=20", "--config.hard_negatives=1",
    )
    assert code == 0, err
    mined = pq.read_table(out / "batches.parquet")
    assert mined.schema.metadata[FINGERPRINT_KEY].decode() == train_set.fingerprint
    # Rows index the trainer's training set: each row's task there is the task it was mined in.
    assert [train_set[r].dataset for r in mined.column("row").to_pylist()] == mined.column("task").to_pylist()

    # The trainer's path: its config, its training-set read, its batch plan, its pipeline.
    config = config.copy_and_resolve_references()
    config.data.batch_file = str(out / "batches.parquet")
    config.train.batch_size, config.train.hard_negatives = 32, 1
    root, _ = data_roots(config)
    train_set = load_train_set(config, root)
    plan = batch_plan(config, train_set)
    assert isinstance(plan, FileBatchPlan)
    source = TrainBatchSource(
        train_set, plan, tiny_ckpt, max_len=40, max_pixels=56 * 56 * 4, num_steps=3, num_hard_negatives=1
    )
    rows = mined.column("row").to_numpy().reshape(-1, 32)
    negatives = mined.column("hard_negatives").to_pylist()
    checked = 0
    for step, record in enumerate(make_train_iterator(source)):
        np.testing.assert_array_equal(record["rows"], rows[step])
        assert len({train_set[int(r)].dataset for r in record["rows"]}) == 1
        for i, listed in enumerate(negatives[step * 32 : (step + 1) * 32]):
            slot = 2 * i + 1  # query i's positive at 2i, its hard negative at 2i + 1
            if listed and record["target_valid"][slot]:
                assert record["target_key"][slot] == content_key(train_set[listed[0]].positive)
                checked += 1
    assert checked > 48  # most of the 3 x 32 queries got a mined negative the loader placed


@pytest.mark.parametrize(
    "overrides, code, message",
    [
        (["--config.cluster_size=12"], 2, "multiple of cluster_size"),
        (["--config.cluster_sise=8"], 2, "cluster_size"),  # the closest valid key is named
        (["--config.teacher=/nowhere"], 2, "exactly one of"),
        (["--config.teacher=/nowhere", "--config.teacher_embeddings=", "--config.data.root=/data"], 2,
         "model /nowhere: no such directory"),
        (["--config.batch_size=128"], 1, "'OK-VQA' has 96 rows, fewer than one batch of 128"),
    ],
)
def test_usage_and_data_errors(tmp_path, capsys, overrides, code, message):
    npz = write_npz(tmp_path / "t.npz", [("MSCOCO_t2i", 128), ("OK-VQA", 96)])
    got, err = mine_cli(capsys, f"--config.teacher_embeddings={npz}", f"--config.out={tmp_path}", *overrides)
    assert got == code and message in err, err


def test_npz_errors_name_the_file_and_key(synthetic, tmp_path, capsys):
    config, train_set = synthetic
    missing = write_npz(tmp_path / "no_task.npz", [("MSCOCO_t2i", 64)], task=True)
    code, err = mine_cli(capsys, f"--config.teacher_embeddings={missing}", f"--config.out={tmp_path}")
    assert code == 1 and str(missing) in err and "missing key(s) ['task']" in err
    short = write_npz(tmp_path / "short.npz", [(train_set.names[0], len(train_set) - 1)])
    code, err = mine_cli(
        capsys, f"--config.teacher_embeddings={short}", f"--config.out={tmp_path}", "--config.data.synthetic=small",
        f"--config.data.synthetic_dir={config.data.synthetic_dir}",
    )
    assert code == 1 and str(short) in err
    assert f"{len(train_set) - 1} rows but the training set has {len(train_set)}" in err
    unknown = write_npz(tmp_path / "unknown.npz", [("MyTask", 64)])
    code, err = mine_cli(capsys, f"--config.teacher_embeddings={unknown}", f"--config.out={tmp_path}")
    assert code == 1 and "MyTask" in err and "config.meta_task" in err


def test_teacher_model_embeds_the_training_set_and_its_npz_reproduces_the_file(synthetic, tiny_ckpt, tmp_path, capsys):
    config, train_set = synthetic
    data = [
        "--config.data.synthetic=small", f"--config.data.synthetic_dir={config.data.synthetic_dir}",
        "--config.data.max_rows_per_subset=16", "--config.data.subsets=SynCls,SynVQA",  # few items to encode
    ]
    common = ["--config.batch_size=16", "--config.cluster_size=8", "--config.m=10", *data]
    teacher = [f"--config.teacher={tiny_ckpt}", "--config.teacher_batch_size=128"]
    code, err = mine_cli(capsys, *teacher, f"--config.out={tmp_path / 'model'}", *common)
    assert code == 0, err
    with np.load(tmp_path / "model" / "embeddings.npz") as saved:
        assert saved["query"].shape == saved["target"].shape == (2 * 16, 64)
        assert saved["task"].tolist() == ["SynCls"] * 16 + ["SynVQA"] * 16
        np.testing.assert_allclose(np.linalg.norm(saved["query"], axis=1), 1.0, rtol=1e-5)
    npz = str(tmp_path / "model" / "embeddings.npz")
    code, err = mine_cli(capsys, f"--config.teacher_embeddings={npz}", f"--config.out={tmp_path / 'npz'}", *common)
    assert code == 0, err
    assert (tmp_path / "model" / "batches.parquet").read_bytes() == (tmp_path / "npz" / "batches.parquet").read_bytes()
