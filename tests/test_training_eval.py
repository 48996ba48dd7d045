"""The trainer's own evaluation and its bad-data accounting, end to end through `vlm2vec_jax.train`.

Evaluation: a tiny run with `eval.every` on logs `eval/<dataset>`, `eval/<meta-task>`, IND, OOD
and overall at the chosen step and at the end (metrics.jsonl and TensorBoard), and its final values
are those of the library's `evaluate` on the run's export loaded with `Embedder.from_pretrained`;
two processes (jax.distributed on 127.0.0.1, the weights gathered across hosts for eval and export)
log the values of one.

Bad data: an MMEB-layout training set with one row whose image is missing and one whose image does
not decode trains all its steps and counts both under `data/skipped/<dataset>/<reason>`;
`data.bad_data=error` stops before compiling, naming the dataset, row and image.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from training_runs import (
    STEPS, environment, metrics, run, run_ok, run_on_local_hosts, shared_dirs, tail, train_command,
)

EVAL_EVERY = 4  # steps 4 and STEPS (8)
# A few queries per dataset: every dataset, meta-task and the IND/OOD/overall groups still appear.
EVAL = {"eval__every": EVAL_EVERY, "eval__max_queries": 4, "eval__batch_size": 16, "export__at_end": True}


def eval_lines(workdir: Path) -> dict[int, dict]:
    """{step: the eval/* values logged at it} (an eval line holds only eval/* keys)."""
    out: dict[int, dict] = {}
    for line in metrics(workdir):
        values = {k: v for k, v in line.items() if k.startswith("eval/")}
        if values:
            assert values.keys() == line.keys() - {"step"}, line
            assert line["step"] not in out, f"step {line['step']} evaluated twice"
            out[line["step"]] = values
    return out


def expected_eval_keys(eval_root: Path) -> set[str]:
    import json

    infos = json.loads((eval_root / "datasets.json").read_text())  # the synthetic benchmark's datasets
    return {f"eval/{name}" for name in infos} | {f"eval/{i['meta_task']}" for i in infos.values()} | {
        "eval/IND", "eval/OOD", "eval/overall",
    }


def tensorboard_scalars(directory: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar in the TensorBoard event files of `directory` (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = value.simple_value
    return out


def independent_eval(workdir: Path, eval_root: Path) -> dict[str, float]:
    """eval/* of the run's export, by `Embedder.from_pretrained` and the library's `evaluate` on the
    eval data the run used (its config's eval keys), in this process (one device)."""
    from vlm2vec_jax import Embedder
    from vlm2vec_jax.data.registry import eval_datasets
    from vlm2vec_jax.evaluation.evaluate import evaluate
    from vlm2vec_jax.evaluation.summary import summarize
    from vlm2vec_jax.training.data_setup import load_eval_queries
    from training_runs import run_config

    config = run_config(workdir)
    embedder = Embedder.from_pretrained(
        workdir / "export", min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels,
        position_rule=config.model.position_rule,
    )
    scores = evaluate(embedder, load_eval_queries(config, eval_root), batch_size=config.eval.batch_size, show_progress=False)
    summary = summarize(scores, eval_datasets(eval_root))
    values = {f"eval/{name}": s.acc for name, s in scores.items()}
    values.update({f"eval/{g}": s.acc for g, s in summary.groups.items() if s.acc is not None})
    return values


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> Path:
    shared = shared_dirs(tmp_path_factory)
    workdir = tmp_path_factory.mktemp("eval_1proc") / "run"
    run_ok(train_command(workdir, shared, **EVAL), environment(shared, 1), workdir.parent / "train.log")
    return workdir


@pytest.mark.slow
def test_trainer_evaluation_logs_every_group_and_matches_evaluating_the_export(eval_run, tmp_path_factory) -> None:
    eval_root = shared_dirs(tmp_path_factory)["synthetic"] / "small-seed0" / "eval"
    lines = eval_lines(eval_run)
    assert sorted(lines) == [EVAL_EVERY, STEPS]
    for step, values in lines.items():
        assert values.keys() == expected_eval_keys(eval_root), step
        assert all(0.0 <= v <= 1.0 for v in values.values()), values
    # Precision@1 is num_correct / num_pred per dataset (groups: means of those): the same weights
    # and the same float32 computation give the same argmax, so the values are equal exactly (a
    # rounding difference could flip only an exact tie among candidates).
    assert lines[STEPS] == independent_eval(eval_run, eval_root)
    assert tensorboard_scalars(eval_run / "tensorboard", "eval/overall") == pytest.approx(
        {s: v["eval/overall"] for s, v in lines.items()}, rel=1e-6  # TensorBoard stores float32
    )


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(eval_run, tmp_path, tmp_path_factory) -> None:
    shared = shared_dirs(tmp_path_factory)
    workdir = tmp_path / "run"
    run_on_local_hosts(tmp_path, workdir, shared, devices=1, **EVAL)
    # Training on 2 hosts equals 1 (test_training_multihost, for losses); so does what it evaluates.
    assert eval_lines(workdir) == eval_lines(eval_run)
    # The export (weights gathered from both hosts) evaluates to the same values too.
    assert independent_eval(workdir, shared["synthetic"] / "small-seed0" / "eval") == eval_lines(eval_run)[STEPS]


# ----------------------------------------------------------------------------------------- bad data
DATASET = "SynCls"
ROWS = 16
CORRUPT_ROW, MISSING_ROW = 3, 11


def bad_training_set(root: Path, synthetic_train: Path) -> tuple[str, str]:
    """`root`: MMEB-train layout, subset SynCls's first ROWS rows with its images copied; row
    CORRUPT_ROW's image is garbage bytes, row MISSING_ROW's image file does not exist. Returns
    (corrupt path, missing path) as the readers resolve them."""
    import pyarrow.parquet as pq

    name = "original-00000-of-00001.parquet"
    table = pq.read_table(synthetic_train / DATASET / name).slice(0, ROWS).to_pydict()
    images = root / "images" / DATASET
    images.mkdir(parents=True)
    for path in table["qry_image_path"]:
        shutil.copy(synthetic_train / path, root / path)
    corrupt = root / table["qry_image_path"][CORRUPT_ROW]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image" * 4)
    table["qry_image_path"][MISSING_ROW] = f"images/{DATASET}/missing.png"
    (root / DATASET).mkdir()
    import pyarrow as pa

    pq.write_table(pa.table(table), root / DATASET / name)
    shutil.copy(synthetic_train / "datasets.json", root / "datasets.json")
    return str(corrupt), str(root / table["qry_image_path"][MISSING_ROW])


def draws_of(root: Path, dataset_row: int, batch_size: int, seed: int) -> int:
    """How often the run's random batches (steps 0..STEPS-1) hold the training set's row
    `dataset_row` of DATASET: each draw decodes its image once."""
    import numpy as np

    from vlm2vec_jax.data.batch_plan import RandomBatchPlan
    from vlm2vec_jax.data.mmeb_train import read_mmeb_train

    pairs = list(read_mmeb_train(root, [DATASET], bad_data="skip"))
    index = [p.row for p in pairs].index(dataset_row)
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size, seed, True)
    return sum(int(np.sum(plan.batch(s).rows == index)) for s in range(STEPS))


@pytest.mark.slow
def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path, tmp_path_factory) -> None:
    from vlm2vec_jax.data.bad_data import CORRUPT_IMAGE, MISSING_IMAGE

    shared = shared_dirs(tmp_path_factory)
    root = tmp_path / "train"
    corrupt, missing = bad_training_set(root, shared["synthetic"] / "small-seed0" / "train")
    data = {"data__root": root, "data__subsets": DATASET}
    decodes = draws_of(root, CORRUPT_ROW, 8, seed=0)
    assert decodes > 0, "the corrupt row is never drawn: pick another row"

    # "error": stops at reading (before any compile), naming dataset, row, column and image.
    log = tmp_path / "error.log"
    assert run(train_command(tmp_path / "error_run", shared, data__bad_data="error", **data), environment(shared), log) != 0
    text = tail(log)
    assert f"{DATASET} row {MISSING_ROW}, column 'qry_image_path'" in text and missing in text, text
    assert "compiled the training step" not in log.read_text()

    workdir = tmp_path / "run"
    run_ok(train_command(workdir, shared, **data), environment(shared), tmp_path / "train.log")
    lines = metrics(workdir)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    last = lines[-1]
    skipped = {k: v for k, v in last.items() if k.startswith("data/skipped/")}
    # The missing image: dropped when the set is read (once); the corrupt one: at each draw.
    assert skipped == {f"data/skipped/{DATASET}/{MISSING_IMAGE}": 1, f"data/skipped/{DATASET}/{CORRUPT_IMAGE}": decodes}, skipped
    assert all(line[f"data/skipped/{DATASET}/{MISSING_IMAGE}"] == 1 for line in lines)
    assert corrupt  # (no per-row report file is written: the counts are the record)
