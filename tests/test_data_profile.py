"""The training-set profile (`vlm2vec_jax.data.profile`) against what training really builds.

The reference is the training pipeline itself: `TrainBatchSource` records (images decoded and
resized by the real processor, prompts tokenized by the real tokenizer, truncated), read back as
per-sequence (length, image tokens) pairs. The profile must equal it exactly, per subset and side.
The data is written in MMEB-train's layout with image sizes that take every branch of the resize
rule (under 28 px, over max_pixels, tall), a missing, a corrupt and a header-only image.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm2vec_jax.cli_config import parse_config
from vlm2vec_jax.data.batch_plan import FINGERPRINT_KEY
from vlm2vec_jax.data.pipeline import TrainBatchSource
from vlm2vec_jax.data.profile import SIDES, cli, histogram, load_profile, profile_train_set
from vlm2vec_jax.mining.batches import MinedBatch, write_batch_file
from vlm2vec_jax.processing.image import ImageError, load_image
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image
from vlm2vec_jax.training.data_setup import batch_plan, data_roots, load_train_set
from vlm2vec_jax.training.model_init import write_random_model_dir

REPO = Path(__file__).resolve().parents[1]
IMAGES = {  # name: (height, width); tokens at max_pixels 28*28*16: 9, 4 (blown up to 56x56), 12, 12, 10
    "square.png": (84, 84),
    "small.png": (20, 40),
    "large.png": (500, 600),
    "tall.png": (300, 100),
    "truncated.png": (140, 70),
}
LONG = "The quick brown fox jumps over the lazy dog, and the dog does not move. " * 6
SYN_A = [  # retrieval, with one explicit negative per row: (qry, qry image, pos, pos image, neg, neg image)
    ("<|image_1|> Find a similar photo of a dog in the park.", "square.png", "Represent the given image.", "large.png",
     "A red car is parked next to a small white house.", ""),
    (LONG, "", "", "small.png", "<|image_1|> Represent the given image.", "tall.png"),
    ("<|image_1|> A missing picture.", "missing.png", "Represent the given image.", "square.png", "a dog", ""),
    ("<|image_1|> A corrupt picture.", "corrupt.png", "Represent the given image.", "square.png", "a cat", ""),
    ("Two people are sitting at a wooden table.", "", "Represent the given image.", "truncated.png", "a bus", ""),
    ("Represent the given image with the following question: what colour?", "tall.png", "blue", "", "", "corrupt.png"),
    ("What is the title of this document?", "", "The title is the annual report.", "", "", ""),
]
SYN_B = [  # classification, no negatives
    ("<|image_1|> Represent the given image for classification.", image, label, "")
    for image, label in (("square.png", "dog"), ("small.png", "cat"), ("large.png", "red car"),
                         ("tall.png", "bus"), ("square.png", "bird"))
]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MMEB-train layout: SynA, SynB; images under `header_only/` (truncated.png cut after its
    header) and `complete/` (the same files, truncated.png whole)."""
    root = tmp_path_factory.mktemp("profile_data")
    tasks = {"SynA": {"meta_task": "retrieval"}, "SynB": {"meta_task": "classification"}}
    (root / "datasets.json").write_text(json.dumps(tasks))
    complete, header_only = root / "complete", root / "header_only"
    complete.mkdir()
    for i, (name, (h, w)) in enumerate(IMAGES.items()):
        Image.fromarray(tiny_image(h, w, seed=i)).save(complete / name)
    (complete / "corrupt.png").write_bytes(b"this is not an image at all")
    shutil.copytree(complete, header_only)
    data = (complete / "truncated.png").read_bytes()
    (header_only / "truncated.png").write_bytes(data[: len(data) // 2])
    columns = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
    for name, rows in (("SynA", SYN_A), ("SynB", SYN_B)):
        (root / name).mkdir()
        table = pa.table({c: [r[k] for r in rows] for k, c in enumerate(columns[: len(rows[0])])})
        pq.write_table(table, root / name / "original-00000-of-00001.parquet")
    return root


def config_values(layout: Path, ckpt: Path | str, tmp_path: Path, **keys: object) -> dict[str, object]:
    """Overrides of the demo training config for `layout` (`__` for dots in `keys`)."""
    values = {
        "data.root": layout, "data.image_root": layout / "header_only", "data.synthetic": "", "model.init": ckpt,
        "model.max_len": 40, "model.target_max_len": 24, "model.min_pixels": 56 * 56, "model.max_pixels": 28 * 28 * 16,
        "data.positive_prompts": True, "train.hard_negatives": 1, "workdir": tmp_path / "run",
    }
    return {**values, **{k.replace("__", "."): v for k, v in keys.items()}}


def make_config(layout: Path, ckpt: Path | str, tmp_path: Path, **keys: object) -> ml_collections.ConfigDict:
    """The demo training config on `layout`, parsed as the CLI parses it."""
    values = config_values(layout, ckpt, tmp_path, **keys)
    return parse_config(["profile", "--config", str(REPO / "configs/demo.py"), *overrides(values)], usage="")


def overrides(values: dict[str, object]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items()]


def pipeline_counts(config: ml_collections.ConfigDict, model_dir: Path) -> dict[str, dict[str, Counter]]:
    """(length, image tokens) of every valid sequence of one epoch of training records, by subset and
    side. With random batches the epoch is one batch of every row (mixed tasks)."""
    config = copy.deepcopy(config)
    root, _ = data_roots(config)
    train_set = load_train_set(config, root)
    if not config.data.batch_file:
        config.train.batch_size, config.data.homogeneous = len(train_set), False
    plan = batch_plan(config, train_set)
    h = config.train.hard_negatives
    source = TrainBatchSource(
        train_set, plan, model_dir, max_len=config.model.max_len, target_max_len=config.model.target_max_len,
        num_steps=plan.steps_per_epoch, num_hard_negatives=h, min_pixels=config.model.min_pixels,
        max_pixels=config.model.max_pixels,
    )
    image_id = source.text.image_token_id
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: {side: Counter() for side in SIDES})

    def sequence(inputs: dict, j: int) -> tuple[int, int]:
        real = inputs["attention_mask"][j] == 1
        return int(real.sum()), int((inputs["input_ids"][j][real] == image_id).sum())

    for step in range(plan.steps_per_epoch):
        record = source[step]
        for i, row in enumerate(record["rows"]):
            name, _ = train_set.locate(int(row))
            if record["valid"][i]:
                counts[name]["query"][sequence(record["query"], i)] += 1
            for k in range(1 + h):
                if record["target_valid"][i * (1 + h) + k]:
                    counts[name]["target" if k == 0 else "negative"][sequence(record["target"], i * (1 + h) + k)] += 1
    return counts


def joint(section: dict) -> Counter:
    j = section["joint"]
    return Counter({(t, i): c for t, i, c in zip(j["text_tokens"], j["image_tokens"], j["counts"])})


def test_counts_equal_the_training_pipeline(layout: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    profile = profile_train_set(make_config(layout, tiny_ckpt, tmp_path))
    # The reference decodes: it reads the same rows with truncated.png whole.
    complete = make_config(layout, tiny_ckpt, tmp_path, data__image_root=layout / "complete")
    reference = pipeline_counts(complete, tiny_ckpt)
    assert list(profile["subsets"]) == ["SynA", "SynB"]
    for name, section in profile["subsets"].items():
        for side in SIDES:
            assert joint(section[side]) == reference[name][side], (name, side)
            assert section[side]["sequences"] == sum(reference[name][side].values())
    a = profile["subsets"]["SynA"]
    assert (a["rows"], a["used_rows"], a["query"]["truncated"]) == (7, 5, 1)  # row 1's query is cut at 40 tokens
    assert a["query"]["text_tokens"]["max"] == 40
    b = profile["subsets"]["SynB"]
    assert Counter(dict(zip(b["query"]["image_tokens"]["values"], b["query"]["image_tokens"]["counts"]))) == {
        9: 2, 4: 1, 12: 2  # square twice, small blown up to 56x56, large and tall scaled to max_pixels
    }
    assert b["query"]["patches"]["values"] == [16, 36, 48]
    total = profile["total"]
    for side in SIDES:
        assert joint(total[side]) == joint(a[side]) + joint(b[side])
    assert profile["config"]["patches_per_row"] == 64 and profile["config"]["model.target_max_len"] == 24


def test_missing_and_corrupt_images_are_named_and_a_header_only_file_is_measured(
    layout: Path, tiny_ckpt: Path, tmp_path: Path
) -> None:
    profile = profile_train_set(make_config(layout, tiny_ckpt, tmp_path))
    images = layout / "header_only"
    bad = [(e["row"], e["field"], e["path"], e["reason"]) for e in profile["subsets"]["SynA"]["bad"]]
    assert bad == [
        (2, "qry_image_path", str(images / "missing.png"), "missing_image"),  # skipped by the reader
        (3, "query.image", str(images / "corrupt.png"), "corrupt_image"),  # the row goes
        (5, "negatives[0].image", str(images / "corrupt.png"), "corrupt_image"),  # only the negative goes
    ]
    assert profile["subsets"]["SynB"]["bad"] == []
    assert profile["total"]["bad_counts"] == {"missing_image": 1, "corrupt_image": 2}
    with pytest.raises(ImageError):
        load_image(images / "truncated.png")  # decoding this file fails: the profile only read its header
    # Row 4's positive (truncated.png, 140x70 -> 140x56: 10 tokens) is among SynA's targets.
    assert profile["subsets"]["SynA"]["target"]["image_tokens"]["values"] == [0, 4, 10, 12]


def test_subsets_and_row_cap_are_honoured(layout: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    only_b = profile_train_set(
        make_config(layout, tiny_ckpt, tmp_path, data__subsets="SynB", data__max_rows_per_subset=3)
    )
    assert list(only_b["subsets"]) == ["SynB"] and only_b["config"]["data.subsets"] == ["SynB"]
    assert (only_b["total"]["rows"], only_b["total"]["query"]["sequences"]) == (3, 3)
    assert only_b["subsets"]["SynB"]["query"]["image_tokens"]["values"] == [4, 9, 12]  # square, small, large
    capped = profile_train_set(make_config(layout, tiny_ckpt, tmp_path, data__max_rows_per_subset=2))
    assert [capped["subsets"][n]["rows"] for n in ("SynA", "SynB")] == [2, 2]
    assert capped["subsets"]["SynA"]["bad"] == []  # the bad rows lie past the cap


def test_cli_writes_the_profile_that_load_profile_reads(layout: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    config = make_config(layout, tiny_ckpt, tmp_path)
    out = tmp_path / "out" / "profile.json"
    values = config_values(layout, tiny_ckpt, tmp_path)
    command = [sys.executable, "-m", "vlm2vec_jax.data.profile", "--config", str(REPO / "configs/demo.py"),
               *overrides(values), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "profile: 100%" in done.stderr and "SynA" in done.stdout  # progress bar, summary table
    written = json.loads(out.read_text())
    expected = profile_train_set(config)
    assert {k: v for k, v in written.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}

    loaded = load_profile(out)
    for side in SIDES:
        lengths, images = loaded.lengths(side), loaded.image_tokens(side)
        assert Counter(zip(lengths.tolist(), images.tolist())) == joint(expected["total"][side])
        assert np.array_equal(loaded.patches(side), images * 4)
    assert loaded.lengths("query", "SynB").size == 5
    assert [e["subset"] for e in loaded.bad()] == ["SynA"] * 3


def test_usage_and_data_errors_are_one_line(layout: Path, tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    base = ["profile", "--config", str(REPO / "configs/demo.py"), f"--config.model.init={tiny_ckpt}"]
    assert cli(base) == 2  # no --out
    assert "missing --out" in capsys.readouterr().err
    assert cli([*base, "--config.data.subset=SynB", "--out", str(tmp_path / "p.json")]) == 2
    assert "data.subsets" in capsys.readouterr().err
    nowhere = ["--config.data.synthetic=", f"--config.data.root={tmp_path / 'nowhere'}", f"--out={tmp_path / 'p.json'}"]
    assert cli([*base, *nowhere]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlm2vec_jax.data.profile: error:") and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(ValueError, match="not a version-1 training-set profile"):
        (tmp_path / "other.json").write_text("{}")
        load_profile(tmp_path / "other.json")


def test_random_init_uses_the_tokenizer_training_writes(layout: Path, tmp_path: Path) -> None:
    config = make_config(layout, "random", tmp_path)
    learned = profile_train_set(config)  # no model_init yet: learned in a temporary directory
    assert not (tmp_path / "run").exists()
    root, _ = data_roots(config)
    train_set = load_train_set(config, root)
    written = write_random_model_dir(  # what the trainer writes on its first start
        tmp_path / "run" / "model_init", config.model.architecture.to_dict(),
        (side.text for pair in train_set for side in (pair.query, pair.positive)),
        min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels,
    )
    reused = profile_train_set(config)
    assert reused["config"]["tokenizer"] == str(written) and "temporary" in learned["config"]["tokenizer"]
    assert reused["subsets"] == learned["subsets"]


def test_batch_file_negatives_are_the_mined_rows_positives(layout: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    config = make_config(layout, tiny_ckpt, tmp_path, data__subsets="SynB", train__batch_size=2)
    train_set = load_train_set(config, data_roots(config)[0])
    file = write_batch_file(tmp_path / "batches.parquet", [
        MinedBatch("SynB", np.array([0, 1]), [np.array([2, 3]), np.array([4])]),
        MinedBatch("SynB", np.array([2, 3]), [np.array([0]), np.array([], np.int64)]),
    ], train_set.fingerprint)
    assert pq.read_schema(file).metadata[FINGERPRINT_KEY] == train_set.fingerprint.encode()
    config = make_config(layout, tiny_ckpt, tmp_path, data__subsets="SynB", train__batch_size=2, data__batch_file=file)
    profile = profile_train_set(config)
    section = profile["subsets"]["SynB"]
    assert section["negative"]["sequences"] == 3  # rows 2, 4, 0: the first mined row of each, none for row 3
    assert joint(section["negative"]) == pipeline_counts(config, tiny_ckpt)["SynB"]["negative"]
    assert profile["config"]["negatives_from"].startswith("mined rows' positives")


def test_histogram_is_exact_with_nearest_rank_percentiles() -> None:
    h = histogram(np.array([3, 1, 3, 10, 3, 1, 2, 3, 3, 50]))
    assert (h["values"], h["counts"]) == ([1, 2, 3, 10, 50], [2, 1, 5, 1, 1])
    assert (h["n"], h["sum"], h["mean"], h["p50"], h["p90"], h["p99"], h["max"]) == (10, 79, 7.9, 3, 10, 50, 50)
    assert histogram(np.array([], np.int64))["p50"] is None
