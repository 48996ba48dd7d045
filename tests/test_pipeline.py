"""Batch plans and the grain training pipeline: order, resume, shapes, hard negatives, bad rows, hosts."""

from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm2vec_jax.data.bad_data import BadDataError
from vlm2vec_jax.data.batch_plan import FINGERPRINT_KEY, FileBatchPlan, RandomBatchPlan
from vlm2vec_jax.data.pipeline import TrainBatchSource, make_train_iterator
from vlm2vec_jax.data.records import Side, TrainPair
from vlm2vec_jax.processing.image import normalize_patches, process_image
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

MAX_LEN = 40
MAX_PIXELS = 56 * 56 * 4  # 64 patches per vision row, 16 image tokens at most
IMAGE_SIZES = [(56, 56), (84, 84), (70, 40), (30, 90)]


# ------------------------------------------------------------------------------------------- plans
def _task_of_row(sizes: dict[str, int]) -> list[str]:
    tasks = [t for t, n in sizes.items() for _ in range(n)]
    return list(np.random.default_rng(0).permutation(tasks))  # tasks interleaved in row order


@pytest.mark.parametrize("homogeneous", [True, False])
def test_random_plan_invariants(homogeneous):
    tasks = _task_of_row({"a": 10, "b": 7, "c": 5})
    plan = RandomBatchPlan(tasks, batch_size=3, seed=1, homogeneous=homogeneous)
    assert plan.steps_per_epoch == (3 + 2 + 1 if homogeneous else 22 // 3)
    epochs = []
    for epoch in range(3):
        batches = [plan.batch(epoch * plan.steps_per_epoch + j) for j in range(plan.steps_per_epoch)]
        rows = np.concatenate([b.rows for b in batches])
        assert all(b.rows.dtype == np.int64 and b.rows.shape == (3,) for b in batches)
        assert len(set(rows.tolist())) == rows.size  # every row at most once per epoch
        for b in batches:
            assert all(len(n) == 0 for n in b.hard_negatives) and len(b.hard_negatives) == 3
            if homogeneous:
                assert {tasks[r] for r in b.rows} == {b.task}
            else:
                assert b.task is None
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order every epoch
    again = RandomBatchPlan(tasks, batch_size=3, seed=1, homogeneous=homogeneous)
    np.testing.assert_array_equal(again.batch(plan.steps_per_epoch + 2).rows, plan.batch(plan.steps_per_epoch + 2).rows)
    other_seed = RandomBatchPlan(tasks, batch_size=3, seed=2, homogeneous=homogeneous)
    assert any(not np.array_equal(other_seed.batch(j).rows, plan.batch(j).rows) for j in range(plan.steps_per_epoch))
    assert repr(again) == repr(plan) != repr(other_seed) and "0x" not in repr(plan)


def test_homogeneous_plan_shuffles_batch_order_across_tasks():
    plan = RandomBatchPlan(_task_of_row({"a": 40, "b": 40}), batch_size=4, seed=0, homogeneous=True)
    order = [plan.batch(j).task for j in range(plan.steps_per_epoch)]
    assert order != sorted(order)


def test_random_plan_rejects_a_batch_larger_than_every_task():
    with pytest.raises(ValueError, match="exceeds the rows of every task"):
        RandomBatchPlan(["a", "a", "b"], batch_size=3, seed=0, homogeneous=True)


def _write_batch_file(path: Path, batches: list[list[int]], tasks: list[str], negatives=None, **kw) -> Path:
    """A B3 batch file whose batches interleave in the file (rows of a batch keep their order), to
    check that the reader groups rows by batch id."""
    labels = np.random.default_rng(0).permutation([b for b, rows in enumerate(batches) for _ in rows])
    rows_of = [iter(rows) for rows in batches]
    records = []
    for b in labels.tolist():
        row = next(rows_of[b])
        records.append((b, row, tasks[b], (negatives or {}).get(row, [])))
    schema = pa.schema(
        [("batch", pa.int64()), ("row", pa.int64()), ("task", pa.string()), ("hard_negatives", pa.list_(pa.int64()))],
        metadata=kw.get("metadata"),
    )
    columns = list(zip(*records))
    pq.write_table(pa.table([list(c) for c in columns], schema=schema), path)
    return path


def test_file_plan_reads_batches_in_order_and_cycles(tmp_path):
    batches = [[5, 1, 7], [0, 2, 3], [9, 8, 4]]
    file = _write_batch_file(tmp_path / "b3.parquet", batches, ["x", "y", "x"], negatives={1: [4, 6], 3: [7]})
    plan = FileBatchPlan.from_parquet(file, num_rows=10)
    assert plan.steps_per_epoch == 3 and plan.batch_size == 3 and plan.max_hard_negatives == 2
    for step in range(7):
        b = plan.batch(step)
        np.testing.assert_array_equal(b.rows, batches[step % 3])
        assert b.task == ["x", "y", "x"][step % 3]
    assert [n.tolist() for n in plan.batch(0).hard_negatives] == [[], [4, 6], []]
    assert [n.tolist() for n in plan.batch(1).hard_negatives] == [[], [], [7]]
    assert repr(plan) == repr(FileBatchPlan.from_parquet(file, num_rows=10)) and "b3.parquet" in repr(plan)


def _table(**columns) -> pa.Table:
    base = {
        "batch": pa.array([0, 0, 1, 1], pa.int64()),
        "row": pa.array([0, 1, 2, 3], pa.int64()),
        "task": pa.array(["t"] * 4),
        "hard_negatives": pa.array([[], [], [], []], pa.list_(pa.int64())),
    }
    base.update(columns)
    return pa.table({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    "table, message",
    [
        (_table(task=None), r"missing column\(s\) \['task'\]"),
        (_table(row=pa.array([0, 1, 2, 3], pa.int32())), "row is int32"),
        (_table(row=pa.array([0, 1, 2, 9], pa.int64())), r"row 9 is outside the training set \[0, 4\)"),
        (_table(batch=pa.array([0, 0, 0, 1], pa.int64())), "batches differ in size"),
        (_table(batch=pa.array([0, 0, 2, 2], pa.int64())), "without gaps"),
        (_table(row=pa.array([0, 0, 2, 3], pa.int64())), "holds a row twice"),
        (_table(hard_negatives=pa.array([[], [7], [], []], pa.list_(pa.int64()))), "hard_negatives holds rows outside"),
    ],
)
def test_file_plan_rejects_bad_files_naming_them(tmp_path, table, message):
    file = tmp_path / "broken.parquet"
    pq.write_table(table, file)
    with pytest.raises(ValueError, match=message) as err:
        FileBatchPlan.from_parquet(file, num_rows=4)
    assert str(file) in str(err.value)


def test_file_plan_refuses_a_file_mined_on_another_training_set(tmp_path):
    file = _write_batch_file(tmp_path / "b3.parquet", [[0, 1]], ["t"], metadata={FINGERPRINT_KEY: b"abc"})
    FileBatchPlan.from_parquet(file, num_rows=2, train_set_fingerprint="abc")
    with pytest.raises(ValueError, match="mined on training set abc"):
        FileBatchPlan.from_parquet(file, num_rows=2, train_set_fingerprint="def")


# ---------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(tiny_image(h, w, seed=i)).save(paths[-1])
    return paths


def _pairs(images: list[str]) -> list[TrainPair]:
    """Three tasks: image -> label (no placeholder in the query text), text -> text with explicit
    negatives, text -> image; 8 + 6 + 6 rows, interleaved in global row order."""
    pairs = []
    for i in range(8):
        pairs.append(TrainPair("cls", i, Side("Represent the image.", images[i % 4]), Side(f"label {i}")))
    for i in range(6):
        negatives = (Side(f"wrong answer {i}"), Side(f"another wrong answer {i}"))
        pairs.append(TrainPair("qa", i, Side(f"What is item {i}?"), Side(f"answer {i}"), negatives[: i % 3]))
    for i in range(6):
        image_side = Side("<|image_pad|>\nRepresent it.", images[i % 4])
        pairs.append(TrainPair("t2i", i, Side(f"Find picture {i}"), image_side))
    return pairs


def _source(ckpt, pairs, plan, **kw) -> TrainBatchSource:
    kw.setdefault("num_steps", 2 * plan.steps_per_epoch)
    return TrainBatchSource(pairs, plan, ckpt, max_len=MAX_LEN, max_pixels=MAX_PIXELS, **kw)


def _arrays(record: dict) -> dict[str, np.ndarray]:
    """Every array of a record, flattened to "query/input_ids"-style keys."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": np.asarray(v) for k, v in value.items()})
        elif key != "bad_data":
            out[key] = np.asarray(value)
    return out


def _shapes(record: dict) -> dict[str, tuple]:
    return {k: (v.shape, v.dtype) for k, v in _arrays(record).items()}


def test_file_plan_honoured_row_for_row_with_two_workers(tiny_ckpt, images, tmp_path):
    pairs = _pairs(images)
    rng = np.random.default_rng(3)
    batches = [rng.choice(len(pairs), 4, replace=False).tolist() for _ in range(3)]
    plan = FileBatchPlan.from_parquet(_write_batch_file(tmp_path / "b3.parquet", batches, ["m"] * 3), len(pairs))
    source = _source(tiny_ckpt, pairs, plan, num_steps=5)
    it = make_train_iterator(source, num_workers=2)
    try:
        got = [(int(r["step"]), np.asarray(r["rows"]).tolist()) for r in it]
    finally:
        it.close()
    assert got == [(step, batches[step % 3]) for step in range(5)]


def test_resume_at_step_k_with_workers_equals_an_uninterrupted_run(tiny_ckpt, images):
    pairs = _pairs(images)
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size=4, seed=7, homogeneous=True)
    source = _source(tiny_ckpt, pairs, plan, num_steps=6, num_hard_negatives=1)
    full = [_arrays(r) for r in make_train_iterator(source, num_workers=0)]
    assert [int(r["step"]) for r in full] == list(range(6))
    it = make_train_iterator(source, start_step=3, num_workers=2)
    try:
        resumed = [_arrays(r) for r in it]
    finally:
        it.close()
    assert len(resumed) == 3
    for expected, got in zip(full[3:], resumed):
        assert expected.keys() == got.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_every_step_has_the_same_shapes(tiny_ckpt, images):
    pairs = _pairs(images)
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size=4, seed=0, homogeneous=True)
    source = _source(tiny_ckpt, pairs, plan, num_hard_negatives=2)
    records = [source[step] for step in range(plan.steps_per_epoch)]
    # the epoch holds text-only batches (qa) and image batches (cls, t2i); all shapes agree anyway
    assert {plan.batch(s).task for s in range(plan.steps_per_epoch)} == {"cls", "qa", "t2i"}
    assert all(_shapes(r) == _shapes(records[0]) for r in records)
    shapes = _shapes(records[0])
    assert shapes["query/input_ids"][0] == (4, MAX_LEN)
    assert shapes["target/input_ids"][0] == (4 * 3, MAX_LEN)
    assert shapes["query/pixel_values"][1] == shapes["target/pixel_values"][1] == np.uint8
    assert shapes["query/pixel_values"][0] == (4, 64, 588) and shapes["target/pixel_values"][0] == (12, 64, 588)
    assert shapes["valid"][0] == (4,) and shapes["target_valid"][0] == (12,)


def test_pixels_travel_as_uint8_and_normalise_on_the_device_to_the_processors_floats(tiny_ckpt, images):
    """A record carries each image's uint8 patches (one frame, 1/8 of the float32 bytes); the
    training forward's `normalize_patches` under jit gives `process_image`'s floats bit for bit."""
    pairs = [p for p in _pairs(images) if p.dataset == "cls"]
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size=4, seed=0, homogeneous=False)
    source = _source(tiny_ckpt, pairs, plan)
    record = source[0]
    pixels = record["query"]["pixel_values"]
    assert pixels.dtype == np.uint8
    normalised = np.asarray(jax.jit(lambda x: normalize_patches(x, source.image_config))(pixels))
    for row, pair_row in enumerate(record["rows"]):
        expected = process_image(pairs[int(pair_row)].query.image, source.image_config).patches
        n = int((record["query"]["patch_segment_ids"][row] > 0).sum())
        assert n == len(expected)
        np.testing.assert_array_equal(normalised[row, :n], expected)
    assert pixels.nbytes * 8 == normalised.nbytes


def test_targets_are_padded_and_truncated_to_their_own_length(tiny_ckpt, images):
    """`target_max_len` shapes (and truncates) every target, positives and negatives, and leaves
    queries at `max_len`; a target side with images must still fit the largest image."""
    pairs = _pairs(images)
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size=4, seed=0, homogeneous=True)
    short = 18  # the 16 tokens of the largest image + 2 text tokens
    source = _source(tiny_ckpt, pairs, plan, num_hard_negatives=1, target_max_len=short)
    full = _source(tiny_ckpt, pairs, plan, num_hard_negatives=1)
    for step in range(plan.steps_per_epoch):
        record, reference = source[step], full[step]
        assert record["query"]["input_ids"].shape == (4, MAX_LEN)
        assert record["target"]["input_ids"].shape == (8, short)
        np.testing.assert_array_equal(record["query"]["input_ids"], reference["query"]["input_ids"])
        for i in range(8):
            ids, expected = _target_text_ids(record, i), _target_text_ids(reference, i)
            assert ids == expected[:short], (step, i)
    with pytest.raises(ValueError, match="max_len 8 leaves no room"):
        _source(tiny_ckpt, pairs, plan, target_max_len=8)  # t2i targets carry up to 16 image tokens
    text_targets = [p for p in pairs if p.dataset != "t2i"]
    text_plan = RandomBatchPlan([p.dataset for p in text_targets], batch_size=4, seed=0, homogeneous=True)
    assert _source(tiny_ckpt, text_targets, text_plan, target_max_len=8)[0]["target"]["input_ids"].shape == (4, 8)


def test_a_side_without_images_in_the_training_set_ships_no_pixels(tiny_ckpt, images):
    pairs = [p for p in _pairs(images) if p.dataset == "cls"]  # image queries, text targets
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size=4, seed=0, homogeneous=False)
    source = _source(tiny_ckpt, pairs, plan)
    assert (source.query_vision_rows, source.target_vision_rows) == (4, 0)
    for step in range(2):
        record = source[step]
        assert record["query"]["pixel_values"].shape == (4, 64, 588)
        assert record["target"]["pixel_values"].shape[0] == record["target"]["patch_segment_ids"].shape[0] == 0


def test_placeholder_is_prepended_to_an_image_side_without_one(tiny_ckpt, images):
    pairs = _pairs(images)
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size=4, seed=0, homogeneous=True)
    source = _source(tiny_ckpt, pairs, plan)
    step = next(s for s in range(plan.steps_per_epoch) if plan.batch(s).task == "cls")
    record, row = source[step], int(plan.batch(step).rows[0])
    n_tokens = int((record["query"]["image_token_index"][0] >= 0).sum())
    expected = source.text.encode(f"<|image_pad|>\n{pairs[row].query.text}", [n_tokens])
    np.testing.assert_array_equal(record["query"]["input_ids"][0, : expected.size], expected)
    assert record["query"]["attention_mask"][0].sum() == expected.size


def _target_text_ids(record: dict, index: int) -> list[int]:
    mask = record["target"]["attention_mask"][index].astype(bool)
    return record["target"]["input_ids"][index][mask].tolist()


def test_hard_negative_layout(tiny_ckpt, images, tmp_path):
    """Target i*(1+h) is row i's positive, then its h negatives: mined rows' positives when the
    plan gives some, else the pair's own negatives; missing ones are invalid padding slots."""
    pairs = _pairs(images)
    qa = [i for i, p in enumerate(pairs) if p.dataset == "qa"]  # pair qa[k] has k % 3 own negatives
    rows = [qa[0], qa[2], qa[5], qa[3]]
    mined = {qa[0]: [qa[1], qa[4]], qa[2]: [qa[1]]}  # qa[2]: one mined beats its two own negatives
    plan = FileBatchPlan.from_parquet(_write_batch_file(tmp_path / "b3.parquet", [rows], ["qa"], mined), len(pairs))
    source = _source(tiny_ckpt, pairs, plan, num_hard_negatives=2)
    record = source[0]
    expected_sides = [
        [pairs[qa[0]].positive, pairs[qa[1]].positive, pairs[qa[4]].positive],
        [pairs[qa[2]].positive, pairs[qa[1]].positive, None],
        [pairs[qa[5]].positive, *pairs[qa[5]].negatives],
        [pairs[qa[3]].positive, None, None],
    ]
    flat = [side for sides in expected_sides for side in sides]
    np.testing.assert_array_equal(record["target_valid"], [side is not None for side in flat])
    assert record["valid"].all()
    for index, side in enumerate(flat):
        expected = [] if side is None else source.text.encode(side.text).tolist()
        assert _target_text_ids(record, index) == expected, index
    # Content keys: qa[1]'s positive fills two slots (mined for qa[0] and for qa[2]): one key.
    keys = record["target_key"]
    assert keys[1] == keys[4] and keys[1] >= 0
    valid_keys = keys[record["target_valid"]]
    assert len(set(valid_keys.tolist())) == len(valid_keys) - 1  # every other side distinct
    assert (keys[~record["target_valid"]] == -1).all()


def _bad_pairs(images: list[str], tmp_path: Path) -> tuple[list[TrainPair], str, str]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Path(images[1]).read_bytes()[:200])  # a truncated PNG
    missing = str(tmp_path / "missing.png")
    pairs = [
        TrainPair("cls", 0, Side("Represent the image.", images[0]), Side("label 0")),
        TrainPair("cls", 1, Side("Represent the image.", str(corrupt)), Side("label 1")),
        TrainPair("t2i", 0, Side("Find picture 0"), Side("<|image_pad|> It.", missing)),
        TrainPair("cls", 2, Side("Represent the image.", images[2]), Side("label 2"), (Side("x", missing),)),
    ]
    return pairs, str(corrupt), missing


def test_skip_policy_masks_and_counts_bad_rows(tiny_ckpt, images, tmp_path):
    pairs, _, _ = _bad_pairs(images, tmp_path)
    plan = FileBatchPlan.from_parquet(_write_batch_file(tmp_path / "b3.parquet", [[0, 1, 2, 3]], ["m"]), len(pairs))
    record = _source(tiny_ckpt, pairs, plan, num_hard_negatives=1, bad_data="skip")[0]
    np.testing.assert_array_equal(record["valid"], [True, False, False, True])
    # row 3's own negative is missing: only that slot is dropped, row 3 stays
    np.testing.assert_array_equal(record["target_valid"], [True, False, False, False, False, False, True, False])
    assert record["bad_data"].counts == {("cls", "corrupt_image"): 1, ("t2i", "missing_image"): 1,
                                         ("cls", "missing_image"): 1}
    for side, valid in (("query", record["valid"]), ("target", record["target_valid"])):
        inputs = record[side]
        assert not inputs["attention_mask"][~valid].any()  # invalid slots are pure padding
        assert (inputs["image_token_index"][~valid] == -1).all()
        assert inputs["attention_mask"][valid].any(axis=1).all()
    # the valid rows' images are the only ones packed: two query images, no target images
    segments = record["query"]["patch_segment_ids"]
    rows, _ = segments.nonzero()
    assert len(set(zip(rows.tolist(), segments[segments > 0].tolist()))) == 2
    assert not record["target"]["patch_segment_ids"].any()


def test_error_policy_names_dataset_row_and_path(tiny_ckpt, images, tmp_path):
    pairs, corrupt, missing = _bad_pairs(images, tmp_path)
    for rows, where, path in (([1, 0], "cls row 1", corrupt), ([2, 0], "t2i row 0", missing)):
        plan = FileBatchPlan.from_parquet(_write_batch_file(tmp_path / "b.parquet", [rows], ["m"]), len(pairs))
        with pytest.raises(BadDataError, match=where) as err:
            _source(tiny_ckpt, pairs, plan, bad_data="error")[0]
        assert path in str(err.value)


def test_hosts_get_disjoint_halves_of_the_global_batch(tiny_ckpt, images):
    pairs = _pairs(images)
    plan = RandomBatchPlan([p.dataset for p in pairs], batch_size=4, seed=3, homogeneous=False)
    whole = _source(tiny_ckpt, pairs, plan, num_hard_negatives=1)
    hosts = [_source(tiny_ckpt, pairs, plan, num_hard_negatives=1, process_index=i, process_count=2) for i in range(2)]
    for step in (0, plan.steps_per_epoch + 1):
        full, halves = whole[step], [host[step] for host in hosts]
        assert set(halves[0]["rows"].tolist()).isdisjoint(halves[1]["rows"].tolist())
        np.testing.assert_array_equal(np.concatenate([h["rows"] for h in halves]), plan.batch(step).rows)
        for side in ("query", "target"):
            for key in ("input_ids", "attention_mask"):
                joined = np.concatenate([h[side][key] for h in halves])
                np.testing.assert_array_equal(joined, full[side][key], err_msg=f"{side}/{key}")
        np.testing.assert_array_equal(np.concatenate([h["target_valid"] for h in halves]), full["target_valid"])
