"""The synthetic benchmark (`vlm2vec_jax.data.synthetic`) at scale "small": the on-disk contract,
determinism, the OOD hold-out, ground truth and hard negatives, reuse and refusal; and at scale
"mmeb_shape" (a tenth of its rows on disk, its full plan in memory): MMEB-train's shapes, read by the
trainer's readers.

Semantic checks re-derive answers from the plan's scene specs with code of their own (caption
parsing, VQA answering, applying edits) and check the pixels of the written images, so they test
what the benchmark means, not only what the generator says about itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tokenizers import Tokenizer

from vlm2vec_jax.data import synthetic, synthetic_shapes
from vlm2vec_jax.data.mmeb_eval import read_mmeb_eval
from vlm2vec_jax.data.mmeb_train import TrainSet, read_mmeb_train
from vlm2vec_jax.data.synthetic import (
    COLOURS,
    EVAL_DATASETS,
    NUMBERS,
    PLURALS,
    POSITIONS,
    SCALES,
    SHAPES,
    TRAIN_SUBSETS,
    Plan,
    Row,
    Side,
    build_plan,
    generate,
    held_out_labels,
)
from vlm2vec_jax.models.model_dir_files import build_tiny_tokenizer
from vlm2vec_jax.processing.image import smart_resize
from vlm2vec_jax.training.data_setup import data_roots, load_train_set

SEED = 0
SMALL = SCALES["small"]
TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
EVAL_TYPES = {
    "qry_text": pa.string(),
    "qry_img_path": pa.string(),
    "tgt_text": pa.list_(pa.string()),
    "tgt_img_path": pa.list_(pa.string()),
}
PLACEHOLDER = "<|image_1|>\n"
META_TASKS = {"classification", "vqa", "retrieval", "grounding"}
BACKGROUND = (235, 235, 235)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "bench"
    generate(out, seed=SEED, scale="small")
    return out


@pytest.fixture(scope="module")
def plan() -> Plan:
    return build_plan(SEED, "small")


def tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def train_file(root: Path, name: str, split: str = "original") -> list[dict]:
    return pq.read_table(root / "train" / name / f"{split}-00000-of-00001.parquet").to_pylist()


def eval_file(root: Path, name: str) -> list[dict]:
    return pq.read_table(root / "eval" / name / "test-00000-of-00001.parquet").to_pylist()


def sides(row: Row) -> Iterable[Side]:
    return (row.query, *row.targets)


def labels_of(side: Side) -> set[tuple[str, str]]:
    return {(c, s) for c, s, _ in side.facts}


# --- determinism ---


def test_same_seed_is_byte_identical_across_processes(bench: Path, tmp_path: Path) -> None:
    # Another process with another hash seed, through the CLI: set iteration order cannot leak in.
    out = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    args = ["--out", str(out), "--seed", str(SEED), "--scale", "small"]
    cmd = [sys.executable, "-m", "vlm2vec_jax.data.synthetic", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=120)
    assert "384 train rows in 6 subsets" in done.stdout
    assert tree_digest(out) == tree_digest(bench)


def test_other_seed_differs_and_an_empty_dir_is_used(bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "seed1"
    out.mkdir()
    manifest = generate(out, seed=1, scale="small")
    assert manifest["seed"] == 1
    a, b = tree_digest(bench), tree_digest(out)
    parquets = [k for k in a if k.endswith(".parquet")]
    assert len(parquets) == 2 * len(TRAIN_SUBSETS) + len(EVAL_DATASETS)
    assert all(a[k] != b[k] for k in parquets), "every parquet file should change with the seed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


# --- layout ---


def test_manifest(bench: Path) -> None:
    manifest = json.loads((bench / "MANIFEST.json").read_text())
    assert (manifest["seed"], manifest["scale"], manifest["generator_version"]) == (SEED, "small", 1)
    assert [tuple(x) for x in manifest["held_out"]] == list(held_out_labels(SEED))
    assert list(manifest["train"]) == list(TRAIN_SUBSETS)
    assert list(manifest["eval"]) == list(EVAL_DATASETS)
    for name, counts in manifest["train"].items():
        assert counts["rows"] == len(train_file(bench, name)) == SMALL.train_rows
    for name, counts in manifest["eval"].items():
        rows = eval_file(bench, name)
        assert counts["rows"] == len(rows) == SMALL.eval_rows
        assert {len(r["tgt_text"]) for r in rows} == {counts["candidates"]}


def test_train_layout(bench: Path) -> None:
    root = bench / "train"
    described = json.loads((root / "datasets.json").read_text())
    assert described == {name: {"meta_task": meta} for name, meta in TRAIN_SUBSETS.items()}
    assert {p.name for p in root.iterdir() if p.is_dir()} == {*described, "images"}
    assert {p.name for p in (root / "images").iterdir()} == set(described)
    for name in described:
        files = {p.name for p in (root / name).iterdir()}
        assert files == {"original-00000-of-00001.parquet", "diverse_instruction-00000-of-00001.parquet"}
        for split in ("original", "diverse_instruction"):
            schema = pq.read_schema(root / name / f"{split}-00000-of-00001.parquet")
            assert schema.names == list(TRAIN_COLUMNS)
            assert all(t == pa.string() for t in schema.types)
        original, diverse = train_file(bench, name), train_file(bench, name, "diverse_instruction")
        # Same rows; only the query's instruction is reworded (its body, e.g. a caption, is kept).
        for a, b in zip(original, diverse, strict=True):
            assert {k: v for k, v in a.items() if k != "qry"} == {k: v for k, v in b.items() if k != "qry"}
            assert a["qry"] != b["qry"] and a["qry"].startswith(PLACEHOLDER) == b["qry"].startswith(PLACEHOLDER)
        for row in original:
            for text, path in zip(TRAIN_COLUMNS[::2], TRAIN_COLUMNS[1::2]):
                check_side(root, name, row[text], row[path])


def test_eval_layout(bench: Path) -> None:
    root = bench / "eval"
    described = json.loads((root / "datasets.json").read_text())
    assert described == {name: {"meta_task": m, "split": s} for name, (m, s) in EVAL_DATASETS.items()}
    assert {p.name for p in root.iterdir() if p.is_dir()} == {*described, "images"}
    assert {p.name for p in (root / "images").iterdir()} == set(described)
    for name in described:
        assert [p.name for p in (root / name).iterdir()] == ["test-00000-of-00001.parquet"]
        schema = pq.read_schema(root / name / "test-00000-of-00001.parquet")
        assert dict(zip(schema.names, schema.types)) == EVAL_TYPES
        for row in eval_file(bench, name):
            check_side(root, name, row["qry_text"], row["qry_img_path"])
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) > 1
            for text, path in zip(row["tgt_text"], row["tgt_img_path"]):
                check_side(root, name, text, path)
            pairs = list(zip(row["tgt_text"], row["tgt_img_path"]))
            assert len(set(pairs)) == len(pairs), f"{name}: repeated candidate"


def check_side(root: Path, name: str, text: str, path: str) -> None:
    """MMEB's convention: a side has an image iff its text starts with the placeholder and a newline."""
    assert text and text.count("<|image_1|>") == (1 if path else 0)
    assert text.startswith(PLACEHOLDER) == bool(path), (text, path)
    if path:
        assert path.startswith(f"images/{name}/") and path.endswith(".png")
        assert (root / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_images_are_referenced_rgb_pngs(bench: Path) -> None:
    for part, columns in (("train", ("qry_image_path", "pos_image_path", "neg_image_path")), ("eval", ())):
        root = bench / part
        referenced = set()
        for name in TRAIN_SUBSETS if part == "train" else EVAL_DATASETS:
            if part == "train":
                referenced |= {r[c] for r in train_file(bench, name) for c in columns}
            else:
                rows = eval_file(bench, name)
                referenced |= {r["qry_img_path"] for r in rows} | {p for r in rows for p in r["tgt_img_path"]}
        on_disk = {str(p.relative_to(root)) for p in (root / "images").rglob("*") if p.is_file()}
        assert on_disk == referenced - {""}, "unreferenced or missing image files"
        for path in on_disk:
            with Image.open(root / path) as img:
                assert img.format == "PNG" and img.mode == "RGB"
                assert img.size == (84, 84) or max(img.size) < 84  # scenes, or grounding crops
                assert not img.info.get("dpi") and "exif" not in img.info


def test_readers_accept_the_layout(bench: Path) -> None:
    train = read_mmeb_train(bench / "train", "all", image_root=bench / "train", hard_negatives=True, bad_data="error")
    assert len(train) == len(TRAIN_SUBSETS) * SMALL.train_rows
    assert all(len(pair.negatives) == 1 for pair in train)
    evals = read_mmeb_eval(bench / "eval", image_root=bench / "eval")
    assert set(evals) == set(EVAL_DATASETS) and all(len(q) == SMALL.eval_rows for q in evals.values())


def test_every_meta_task_in_train_and_in_both_eval_splits() -> None:
    assert set(TRAIN_SUBSETS.values()) == META_TASKS
    for split in ("IND", "OOD"):
        assert {m for m, s in EVAL_DATASETS.values() if s == split} == META_TASKS


# --- the files are the plan, and the plan means what it says ---


def test_files_are_the_plan(bench: Path, plan: Plan) -> None:
    for name, rows in plan.train.items():
        written = train_file(bench, name)
        assert [r["qry"] for r in written] == [row.query.text() for row in rows]
        assert [r["pos_text"] for r in written] == [row.targets[0].text() for row in rows]
        assert [r["neg_text"] for r in written] == [row.targets[1].text() for row in rows]
        check_pictures(bench / "train", written[:4], rows[:4], ("qry_image_path", "pos_image_path", "neg_image_path"))
    for name, rows in plan.eval.items():
        written = eval_file(bench, name)
        assert [r["qry_text"] for r in written] == [row.query.text() for row in rows]
        assert [r["tgt_text"] for r in written] == [[t.text() for t in row.targets] for row in rows]
        for r, row in zip(written[:2], rows[:2]):
            for path, side in zip([r["qry_img_path"], *r["tgt_img_path"]], sides(row)):
                assert_picture(bench / "eval", path, side)


def check_pictures(root: Path, written: list[dict], rows: list[Row], columns: tuple[str, ...]) -> None:
    for r, row in zip(written, rows):
        for column, side in zip(columns, sides(row)):
            assert_picture(root, r[column], side)


def assert_picture(root: Path, path: str, side: Side) -> None:
    assert bool(path) == (side.picture is not None)
    if path:
        with Image.open(root / path) as img:
            assert np.array_equal(np.asarray(img), np.asarray(synthetic.render(side.picture)))


def test_scene_pixels_show_exactly_the_listed_objects(bench: Path, plan: Plan) -> None:
    """Every object's colour is drawn in its cell, and cells without objects are empty (or hold the
    glyph's ink): the attributes the OOD and hard-negative tests reason about are what images show."""
    checked = 0
    for part, datasets in (("train", plan.train), ("eval", plan.eval)):
        root = bench / part
        for name, rows in datasets.items():
            written = train_file(bench, name) if part == "train" else eval_file(bench, name)
            for r, row in zip(written, rows):
                path = r["qry_image_path" if part == "train" else "qry_img_path"]
                if row.query.picture is None or row.query.picture.box is not None:
                    continue
                pixels = np.asarray(Image.open(root / path))
                objects = {cell: colour for colour, _, cell in row.query.facts}
                glyph_cell = row.query.picture.scene.glyph_cell
                for cell in range(9):
                    y, x = divmod(cell, 3)
                    block = pixels[28 * y : 28 * y + 28, 28 * x : 28 * x + 28].reshape(-1, 3)
                    colours = {tuple(int(v) for v in p) for p in np.unique(block, axis=0)} - {BACKGROUND}
                    if cell in objects:
                        assert colours == {COLOURS[objects[cell]]}, (name, path, cell)
                    elif cell != glyph_cell:
                        assert not colours, (name, path, cell)
                checked += 1
    assert checked > 300


def parse_caption(text: str) -> set[tuple[str, str, int]]:
    assert text.endswith(".")
    parts = re.split(r", | and ", text[0].lower() + text[1:-1])
    facts = set()
    for part in parts:
        m = re.fullmatch(r"an? (\w+) (\w+) at the (.+)", part)
        assert m and (m[1] == "orange") == part.startswith("an "), part
        facts.add((m[1], m[2], POSITIONS.index(m[3])))
    return facts


def vqa_answer(question: str, side: Side) -> str:
    scene = side.picture.scene
    objs = scene.objs
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        [o] = [o for o in objs if o.shape == m[1]]
        return o.colour
    if m := re.fullmatch(r"What shape is at the (.+)\?", question):
        [o] = [o for o in objs if POSITIONS[o.cell] == m[1]]
        return o.shape
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        [o] = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
        return POSITIONS[o.cell]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return NUMBERS[sum(o.colour == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        shape = next(s for s, plural in PLURALS.items() if plural == m[1])
        return NUMBERS[sum(o.shape == shape for o in objs)]
    assert question == "What text is written in the image?" and scene.glyph
    return scene.glyph


def apply_edit(text: str, facts: Iterable[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
    by_shape = {s: (c, cell) for c, s, cell in facts}
    assert len(by_shape) == len(list(facts)), "an edit needs distinct shapes to name its object"
    if m := re.fullmatch(r"make the (\w+) (\w+)", text):
        by_shape[m[1]] = (m[2], by_shape[m[1]][1])
    elif m := re.fullmatch(r"turn the (\w+) into a (\w+)", text):
        by_shape[m[2]] = by_shape.pop(m[1])
    else:
        m = re.fullmatch(r"move the (\w+) to the (.+)", text)
        by_shape[m[1]] = (by_shape[m[1]][0], POSITIONS.index(m[2]))
    return {(c, s, cell) for s, (c, cell) in by_shape.items()}


def correct(name: str, query: Side, target: Side) -> bool:
    """Whether `target` answers `query`, derived independently of the generator."""
    base = name.removesuffix("_OOD")
    if base == "SynCls":
        [(c, s, _)] = query.facts
        return target.body == f"{c} {s}"
    if base == "SynVQA":
        return target.body == vqa_answer(query.body, query)
    if base == "SynCaption_t2i":
        return set(target.facts) == parse_caption(query.body)
    if base == "SynCaption_i2t":
        return parse_caption(target.body) == set(query.facts)
    if base == "SynEdit":
        return set(target.facts) == apply_edit(query.body, query.facts)
    # SynGround: the crop of the named object, cut from the query's own image.
    objs = query.picture.scene.objs
    if m := re.fullmatch(r"the object at the (.+)", query.body):
        [o] = [o for o in objs if POSITIONS[o.cell] == m[1]]
    else:
        [o] = [o for o in objs if f"{o.colour} {o.shape}" == query.body]
    box = target.picture.box
    centre = ((o.cell % 3) * 28 + 14, (o.cell // 3) * 28 + 14)
    return (
        target.picture.scene == query.picture.scene
        and target.facts == ((o.colour, o.shape, -1),)
        and box[0] <= centre[0] < box[2]
        and box[1] <= centre[1] < box[3]
    )


def test_ground_truth_is_candidate_zero_and_only_it(plan: Plan) -> None:
    for name, rows in plan.eval.items():
        for row in rows:
            verdicts = [correct(name, row.query, t) for t in row.targets]
            assert verdicts[0] and not any(verdicts[1:]), (name, row.query.text())
            identities = [t.identity for t in row.targets]
            assert len(set(identities)) == len(identities)
    for name, rows in plan.train.items():
        for row in rows:
            assert correct(name, row.query, row.targets[0]) and not correct(name, row.query, row.targets[1])


def test_candidate_counts(plan: Plan) -> None:
    for name, rows in plan.eval.items():
        meta, split = EVAL_DATASETS[name]
        expected = (36 if split == "OOD" else 30) if meta == "classification" else SMALL.candidates(meta)
        assert {len(row.targets) for row in rows} == {expected}, name
        if meta == "classification":  # every label of the dataset
            assert {t.body for t in rows[0].targets} == {f"{c} {s}" for c, s in plan_labels(plan, split)}


def plan_labels(plan: Plan, split: str) -> list[tuple[str, str]]:
    everything = [(c, s) for c in COLOURS for s in SHAPES]
    return everything if split == "OOD" else [x for x in everything if x not in plan.held_out]


# --- OOD ---


def test_held_out_pairs(plan: Plan) -> None:
    held = held_out_labels(SEED)
    assert plan.held_out == held and len(held) == 6
    assert sorted(c for c, _ in held) == sorted(COLOURS) and sorted(s for _, s in held) == sorted(SHAPES)
    assert held_out_labels(SEED) == held  # deterministic
    assert len({held_out_labels(seed) for seed in range(20)}) > 1  # and drawn from the seed


def test_ood_combinations_never_appear_in_train_or_ind_eval(bench: Path, plan: Plan) -> None:
    held = set(plan.held_out)
    for name, rows in plan.train.items():
        for row in rows:
            for side in sides(row):
                assert not labels_of(side) & held, (name, side.text())
    for name, rows in plan.eval.items():
        if EVAL_DATASETS[name][1] == "IND":
            assert all(not labels_of(side) & held for row in rows for side in sides(row)), name
    # Every OOD ground truth involves a held-out pair (in the image the query shows, or the target).
    for name in (n for n, (_, split) in EVAL_DATASETS.items() if split == "OOD"):
        for row in plan.eval[name]:
            assert (labels_of(row.query) | labels_of(row.targets[0])) & held, (name, row.query.text())
    # The written train texts never name a held-out pair either (both instruction variants).
    pattern = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b", re.IGNORECASE)
    for name in TRAIN_SUBSETS:
        for split in ("original", "diverse_instruction"):
            for row in train_file(bench, name, split):
                for text in (row["qry"], row["pos_text"], row["neg_text"]):
                    named = {(c.lower(), s) for c, s in pattern.findall(text)}
                    assert not named & held, (name, text)


def test_ind_eval_queries_are_not_train_queries(bench: Path) -> None:
    def keys(root: Path, rows: list[dict], text: str, path: str) -> set[tuple[str, str]]:
        return {(r[text], hashlib.sha256((root / r[path]).read_bytes()).hexdigest() if r[path] else "") for r in rows}

    for name in TRAIN_SUBSETS:
        train = keys(bench / "train", train_file(bench, name), "qry", "qry_image_path")
        evals = keys(bench / "eval", eval_file(bench, name), "qry_text", "qry_img_path")
        assert len(train) == SMALL.train_rows and len(evals) == SMALL.eval_rows  # unique within each
        assert not train & evals, name


# --- hard negatives and families ---


def one_edit_apart(a: Iterable[tuple[str, str, int]], b: Iterable[tuple[str, str, int]]) -> bool:
    """b is a with one object recoloured, reshaped or moved, or two objects' colours swapped."""
    ca, cb = {cell: (c, s) for c, s, cell in a}, {cell: (c, s) for c, s, cell in b}
    if ca.keys() == cb.keys():
        diff = [cell for cell in ca if ca[cell] != cb[cell]]
        if len(diff) == 1:
            (c1, s1), (c2, s2) = ca[diff[0]], cb[diff[0]]
            return (c1 == c2) != (s1 == s2)
        if len(diff) == 2:
            i, j = diff
            return cb[i] == (ca[j][0], ca[i][1]) and cb[j] == (ca[i][0], ca[j][1])
        return False
    gone, new = ca.keys() - cb.keys(), cb.keys() - ca.keys()
    if len(gone) != 1 or len(new) != 1:
        return False
    shared = ca.keys() & cb.keys()
    return ca[gone.pop()] == cb[new.pop()] and all(ca[c] == cb[c] for c in shared)


def hard_pair(name: str, positive: Side, negative: Side) -> bool:
    """Whether a negative differs from the positive in one attribute only (for its meta-task)."""
    if TRAIN_SUBSETS[name.removesuffix("_OOD")] == "vqa":
        return negative.kind == positive.kind and negative.body != positive.body
    if name.startswith(("SynCls", "SynGround")):
        [(c1, s1, _)], [(c2, s2, _)] = positive.facts, negative.facts
        return (c1 == c2) != (s1 == s2)
    return one_edit_apart(positive.facts, negative.facts)


def wrong_edit(name: str, query: Side, candidate: Side) -> bool:
    """SynEdit's other hard kind: another edit of the query's own image (e.g. the wrong object)."""
    return name == "SynEdit" and one_edit_apart(query.facts, candidate.facts)


def test_train_negatives_are_hard(plan: Plan) -> None:
    for name, rows in plan.train.items():
        for row in rows:
            positive, negative = row.targets
            assert negative.identity != positive.identity
            assert hard_pair(name, positive, negative), (name, row.query.text(), negative.text(), negative.facts)


def test_eval_rows_hold_hard_distractors(plan: Plan) -> None:
    for name, rows in plan.eval.items():
        if EVAL_DATASETS[name][0] == "classification":
            continue  # ranks every label: 10 of 30 (IND) share the colour or the shape
        hard = [
            sum(hard_pair(name, row.targets[0], t) or wrong_edit(name, row.query, t) for t in row.targets[1:])
            for row in rows
        ]
        # Grounding's one-off crops come from other rows' scenes, which a 12-row dataset may lack:
        # at least the own scene's confuser and one more.
        assert min(hard) >= (2 if EVAL_DATASETS[name][0] == "grounding" else SMALL.hard), (name, hard)


def test_a_scale_without_hard_distractors_keeps_the_train_rows_and_draws_random_pools(
    plan: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's scale is default's with `hard=0`: the same training data, MMEB's kind of pools."""
    assert SCALES["demo"] == replace(SCALES["default"], hard=0)
    monkeypatch.setitem(SCALES, "small_random_pools", replace(SMALL, hard=0))
    random_pools = build_plan(SEED, "small_random_pools")
    assert random_pools.train == plan.train
    for name, rows in random_pools.eval.items():
        meta_task = EVAL_DATASETS[name][0]
        assert [len(r.targets) for r in rows] == [len(r.targets) for r in plan.eval[name]], name
        if meta_task != "retrieval":
            continue  # every label; a small pool of answers or crops is full of near misses by chance
        hard = [
            sum(hard_pair(name, r.targets[0], t) or wrong_edit(name, r.query, t) for t in r.targets[1:]) for r in rows
        ]
        assert sum(hard) < len(rows) * SMALL.hard / 2, (name, hard)  # the small scale puts in 4 per row


def test_train_rows_come_in_shuffled_families(plan: Plan) -> None:
    """Most rows outside classification have a near-duplicate elsewhere in their subset (what B3's
    batches can group), but rarely right next to it (what sequential batches would get for free)."""

    def related(name: str, a: Row, b: Row) -> bool:
        if name.startswith("SynCaption"):  # one-edit variants of one scene
            return hard_pair(name, a.targets[0], b.targets[0])
        return a.query.picture == b.query.picture  # edits of / questions about / objects in one image

    for name in ("SynVQA", "SynCaption_t2i", "SynCaption_i2t", "SynEdit", "SynGround"):
        rows = plan.train[name]
        near = [[j for j, b in enumerate(rows) if j != i and related(name, a, b)] for i, a in enumerate(rows)]
        assert sum(map(bool, near)) > 0.6 * len(rows), name
        adjacent = sum(any(abs(i - j) == 1 for j in js) for i, js in enumerate(near))
        assert adjacent < 0.3 * len(rows), name


# --- reuse and refusal ---


def test_existing_generation_is_reused(bench: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(bench)
    manifest = generate(bench, seed=SEED, scale="small")
    assert manifest == json.loads((bench / "MANIFEST.json").read_text())
    synthetic.main(["--out", str(bench), "--seed", str(SEED), "--scale", "small"])
    assert "384 train rows in 6 subsets, 120 eval queries in 10 datasets" in capsys.readouterr().out
    assert tree_digest(bench) == before


def test_another_generation_is_not_overwritten(bench: Path) -> None:
    before = tree_digest(bench)
    with pytest.raises(FileExistsError, match="another synthetic benchmark"):
        generate(bench, seed=SEED + 1, scale="small")
    with pytest.raises(FileExistsError, match="another synthetic benchmark"):
        generate(bench, seed=SEED, scale="default")
    assert tree_digest(bench) == before


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and has no MANIFEST.json"):
        generate(out, seed=SEED, scale="small")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    with pytest.raises(ValueError, match="unknown scale"):
        generate(tmp_path / "new", scale="huge")


# --- mmeb_shape: MMEB-train's shapes (image sizes, text-only targets, long queries) ---

SHAPE = SCALES["mmeb_shape"]
SHAPE_SMALL = "mmeb_shape_small"  # mmeb_shape's mix and subsets in a tenth of its rows, rendered serially
SHAPED_SUBSETS = [*TRAIN_SUBSETS, *SHAPE.extra_subsets]
TEXT_TARGETS = {"SynCls", "SynVQA", "SynCaption_i2t"}  # text-only targets (MMEB: 22 of 36 datasets)
MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff"}
SMALL_TEXTS_SHA256 = "d921199b16c37746"  # every text of build_plan(0, "small"), as generator version 1 writes it


@pytest.fixture(scope="module")
def shape_small_scale() -> Iterable[str]:
    with pytest.MonkeyPatch.context() as mp:
        rows = tuple((name, n // 10) for name, n in SHAPE.subset_rows)
        small = replace(SHAPE, train_rows=SHAPE.train_rows // 10, subset_rows=rows, eval_rows=8, workers=1)
        mp.setitem(SCALES, SHAPE_SMALL, replace(small, retrieval=8, vqa=8, grounding=6, hard=3))
        yield SHAPE_SMALL


@pytest.fixture(scope="module")
def shaped(shape_small_scale: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainSet]:
    """Generated and read as the trainer does (`data_roots`, then `load_train_set` with hard negatives)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "configs"))
    from common import base  # the configs' shared defaults, as the CLIs load them

    config = base()
    config.data.synthetic = shape_small_scale
    config.data.synthetic_dir = str(tmp_path_factory.mktemp("shaped"))
    config.data.bad_data = "error"
    config.train.hard_negatives = 1
    start = time.perf_counter()
    root, _ = data_roots(config)
    print(f"\n{shape_small_scale}: generated in {time.perf_counter() - start:.2f} s")
    return root.parent, load_train_set(config, root)


@pytest.fixture(scope="module")
def shape_plan() -> Plan:
    """The full scale's plan: its sizes and texts, without rendering."""
    return build_plan(SEED, "mmeb_shape")


def image_sizes(root: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for path in sorted((root / "images").rglob("*.*")):
        with Image.open(path) as img:
            assert img.mode == "RGB" and not img.info.get("dpi") and "exif" not in img.info
            assert img.format == {".png": "PNG", ".jpg": "JPEG"}[path.suffix]
            sizes[str(path.relative_to(root))] = img.size
    return sizes


def pictures_of(datasets: Iterable[list[Row]]) -> list[synthetic.Picture]:
    """The distinct pictures of some datasets' rows, in first-use order."""
    return list(dict.fromkeys(s.picture for rows in datasets for row in rows for s in sides(row) if s.picture))


def image_tokens(width: int, height: int) -> int:
    """Merged Qwen2-VL tokens after smart_resize at the processor's default cap (1280)."""
    h, w = smart_resize(height, width)
    return h * w // 28**2


def test_mmeb_shape_loads_through_the_trainers_readers(shaped: tuple[Path, TrainSet]) -> None:
    out, train = shaped
    scale = SCALES[SHAPE_SMALL]
    rows = {name: dict(scale.subset_rows).get(name, scale.train_rows) for name in SHAPED_SUBSETS}
    assert train.names == tuple(sorted(SHAPED_SUBSETS))
    assert {name: len(train.subset_range(name)) for name in train.names} == rows
    for pair in train:
        [negative] = pair.negatives  # the hard negative, in MMEB's neg_text / neg_image_path columns
        assert negative != pair.positive and (negative.image is None) == (pair.positive.image is None)
        for side in (pair.query, pair.positive, negative):
            assert (side.image is None) == ("<|image_pad|>" not in side.text)
            assert side.image is None or Path(side.image).read_bytes()[:8].startswith(MAGIC[Path(side.image).suffix])
    evals = read_mmeb_eval(out / "eval", image_root=out / "eval")
    assert set(evals) == {*EVAL_DATASETS, *SHAPE.extra_subsets}
    assert all(len(queries) == scale.eval_rows for queries in evals.values())
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert list(manifest["train"]) == SHAPED_SUBSETS and manifest["scale"] == SHAPE_SMALL
    # Every written image is referenced; large ones are JPEG, thumbnails and most crops PNG.
    for part in ("train", "eval"):
        sizes = image_sizes(out / part)
        referenced = {p for name in manifest[part] for p in referenced_images(out, part, name)}
        assert set(sizes) == referenced
        for path, (w, h) in sizes.items():
            assert path.endswith(".jpg" if w * h >= SHAPE.shapes.jpeg_min_pixels else ".png"), (path, w, h)


def referenced_images(out: Path, part: str, name: str) -> set[str]:
    if part == "train":
        return {r[c] for r in train_file(out, name) for c in TRAIN_COLUMNS[1::2]} - {""}
    rows = eval_file(out, name)
    return ({r["qry_img_path"] for r in rows} | {p for r in rows for p in r["tgt_img_path"]}) - {""}


def test_mmeb_shape_images_vary_in_size_and_aspect(shaped: tuple[Path, TrainSet], shape_plan: Plan) -> None:
    cap = SHAPE.shapes.max_pixels
    # On disk: many sizes, tall pages and wide ones, documents near the cap, thumbnails.
    sizes = list(image_sizes(shaped[0] / "train").values())
    assert len(set(sizes)) > 0.5 * len(sizes) > 100
    assert all(w * h <= cap for w, h in sizes)
    assert sum(h >= 1.8 * w for w, h in sizes) >= 3 and sum(w >= 1.8 * h for w, h in sizes) >= 3
    assert sum(w * h >= 0.6 * cap for w, h in sizes) >= 10 and sum(w * h < 0.05 * cap for w, h in sizes) >= 10
    # The full scale's distribution, in image tokens: most medium, a few small, a tail of documents.
    pictures = pictures_of(shape_plan.train.values())
    tokens = np.array([image_tokens(*p.size) for p in pictures])
    shares = {kind: np.mean([p.canvas.kind == kind for p in pictures]) for kind in ("small", "photo", "document")}
    print(f"\nmmeb_shape: {len(tokens)} train images, image tokens p5/25/50/75/95/max "
          f"{np.percentile(tokens, [5, 25, 50, 75, 95, 100]).round().astype(int).tolist()}, "
          f"kinds {({k: round(float(v), 3) for k, v in shares.items()})}")  # fmt: skip
    assert 80 <= np.median(tokens) <= 160 and tokens.max() <= 340 and tokens.min() >= 4
    assert 0.05 <= shares["document"] <= 0.2 and 0.05 <= shares["small"] <= 0.2 and shares["photo"] > 0.6
    # Documents (and with them the largest images) are mostly VQA's queries, as DocVQA's and InfographicsVQA's.
    docs = {name: sum(row.query.picture is not None and row.query.picture.canvas.kind == "document" for row in rows)
            for name, rows in shape_plan.train.items()}  # fmt: skip
    assert docs["SynVQA"] > 0.5 * sum(docs.values()) and docs["SynGround"] == 0


def test_mmeb_shape_text_only_targets(shaped: tuple[Path, TrainSet], shape_plan: Plan) -> None:
    _, train = shaped
    for name in train.names:
        rows = train.subset_range(name)
        text_only = {pair.positive.image is None for pair in train[rows.start : rows.stop]}
        assert text_only == {name in TEXT_TARGETS}, name
    rows = {name: len(rows) for name, rows in shape_plan.train.items()}
    share = sum(rows[name] for name in TEXT_TARGETS) / sum(rows.values())
    print(f"\nmmeb_shape: {sum(rows.values())} train rows, {share:.0%} with text-only targets")
    assert 0.55 <= share <= 0.65  # MMEB-train: 13 of 20 subsets


def test_mmeb_shape_has_long_text_only_queries(shape_plan: Plan, tmp_path: Path) -> None:
    """Dialogues of a few to a few dozen rounds among short captions: counted with the tests' tiny
    BPE (about 1.8 characters a token) and in characters (Qwen2's tokenizer: about 4 a token)."""
    tokenizer = Tokenizer.from_file(str(build_tiny_tokenizer(tmp_path) / "tokenizer.json"))
    texts = [row.query.text() for rows in shape_plan.train.values() for row in rows if row.query.picture is None]
    tokens = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
    chars = np.array([len(t) for t in texts])
    print(f"\nmmeb_shape: {len(texts)} text-only queries, characters p5/50/90/99/max "
          f"{np.percentile(chars, [5, 50, 90, 99, 100]).astype(int).tolist()}, tiny-BPE tokens "
          f"{np.percentile(tokens, [5, 50, 90, 99, 100]).astype(int).tolist()}")  # fmt: skip
    assert np.median(chars) < 300 and np.mean(chars >= 1000) >= 0.05 and np.mean(tokens >= 500) >= 0.05
    dialogues = [len(row.query.body) for row in shape_plan.train["SynDialog"]]
    assert min(dialogues) < 150 and max(dialogues) > 1500


def dialogue_fits(dialogue: str, facts: Iterable[tuple[str, str, int]]) -> bool:
    """Whether every answer of a SynDialog dialogue is true of a scene with these objects (an
    independent reading of its rounds); the rounds must state every object."""
    by_cell = {cell: (c, s) for c, s, cell in facts}
    stated, last_cell = set(), None
    for q, a in re.findall(r"Q: (.+?\?) A: (.+?\.)(?= Q: |$)", dialogue):
        ok = True
        if m := re.fullmatch(r"how many shapes are there\?", q):
            ok = a == f"{NUMBERS[len(by_cell)]}."
        elif m := re.fullmatch(r"what is at the (.+)\?", q):
            cell = POSITIONS.index(m[1])
            ok = cell in by_cell and re.fullmatch(rf"an? {' '.join(by_cell[cell])}\.", a) is not None
            stated.add(cell)
        elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", q):
            cell = POSITIONS.index(re.fullmatch(r"at the (.+)\.", a)[1])
            ok = by_cell.get(cell) == (m[1], m[2])
            stated.add(cell)
        elif m := re.fullmatch(r"is there anything at the (.+)\?", q):
            last_cell = POSITIONS.index(m[1])
            ok = a == "no, it is empty." if last_cell not in by_cell else a == f"yes, a {by_cell[last_cell][1]}."
        elif q == "what colour is it?":
            ok = last_cell in by_cell and by_cell[last_cell][0] == a[:-1]
            stated.add(last_cell)
        elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
            ok = a == "no." and (m[1], m[2]) not in by_cell.values()
        elif m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
            ok = a == f"{NUMBERS[sum(c == m[1] for c, _ in by_cell.values())]}."
        elif m := re.fullmatch(r"how many (\w+) are there\?", q):
            shape = next(s for s, plural in PLURALS.items() if plural == m[1])
            ok = a == f"{NUMBERS[sum(s == shape for _, s in by_cell.values())]}."
        if not ok:
            return False
    return stated == set(by_cell)


def test_mmeb_shape_dialogues_identify_their_image(shape_plan: Plan) -> None:
    for row in shape_plan.train["SynDialog"]:
        positive, negative = row.targets
        assert dialogue_fits(row.query.body, positive.facts) and not dialogue_fits(row.query.body, negative.facts)
        assert one_edit_apart(positive.facts, negative.facts)
    for row in shape_plan.eval["SynDialog"]:
        fits = [dialogue_fits(row.query.body, t.facts) for t in row.targets]
        assert fits == [True] + [False] * (len(row.targets) - 1)
    # No train text, dialogues' small talk included, names a held-out pair.
    held = set(shape_plan.held_out)
    pattern = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b", re.IGNORECASE)
    for rows in shape_plan.train.values():
        for side in (side for row in rows for side in sides(row)):
            named = {(c.lower(), s) for c, s in pattern.findall(side.text())}
            assert not labels_of(side) & held and not named & held, side.text()


def test_mmeb_shape_canvases_show_the_scene(shape_plan: Plan) -> None:
    """Scaled onto a photo, thumbnail or page, every object's centre keeps its colour, a grounding
    crop holds its object's centre, and a page's text stays out of the figure."""
    by_kind: dict[tuple[str, bool], list] = {}
    for picture in pictures_of(shape_plan.train.values()):
        by_kind.setdefault((picture.canvas.kind, picture.box is not None), []).append(picture)
    assert set(by_kind) == {(kind, crop) for kind in ("small", "photo", "document") for crop in (False, True)} - {
        ("document", True)  # grounding (MMEB's MSCOCO) crops photos only
    }
    for group in by_kind.values():
        for picture in group[:8]:
            img = np.asarray(synthetic.render(picture))
            canvas, scene = picture.canvas, picture.scene
            assert img.shape[1::-1] == picture.size
            left, top, side = canvas.scene_box
            k = side / 84
            origin = synthetic_shapes.scaled_box(canvas, picture.box, 84)[:2] if picture.box else (0, 0)
            inside = 0
            for o in scene.objs:
                cx = left + k * ((o.cell % 3) * 28 + 14 + o.dx) - origin[0]
                cy = top + k * ((o.cell // 3) * 28 + 14 + o.dy) - origin[1]
                if 0 <= cx < img.shape[1] and 0 <= cy < img.shape[0]:
                    assert tuple(img[int(cy), int(cx)]) == COLOURS[o.colour], (picture, o)
                    inside += 1
            assert inside >= 1 if picture.box else inside == len(scene.objs)
            if not picture.box:
                figure = img[top : top + side, left : left + side].reshape(-1, 3).astype(np.int64) @ [65536, 256, 1]
                allowed = {BACKGROUND, (20, 20, 20), *(COLOURS[o.colour] for o in scene.objs)}
                assert set(np.unique(figure).tolist()) <= {r * 65536 + g * 256 + b for r, g, b in allowed}


def test_mmeb_shape_is_deterministic(shaped: tuple[Path, TrainSet], shape_small_scale: str, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, seed=SEED, scale=shape_small_scale)
    assert tree_digest(again) == tree_digest(shaped[0])
    plans = [build_plan(seed, shape_small_scale) for seed in (SEED, SEED + 1)]
    sizes = [[p.size for p in pictures_of(plan.train.values())] for plan in plans]
    assert sizes[0] != sizes[1]


def test_the_other_scales_keep_their_scenes() -> None:
    """mmeb_shape's fields are off in the other scales (84x84 scenes, six subsets, equal rows), and
    the small scale's texts are pinned (change them only with GENERATOR_VERSION)."""
    for name in ("small", "default", "demo"):
        assert (SCALES[name].shapes, SCALES[name].extra_subsets, SCALES[name].subset_rows) == (None, (), ())
    plan = build_plan(SEED, "small")
    texts = [side.text() for rows in (*plan.train.values(), *plan.eval.values()) for row in rows for side in sides(row)]
    assert all(p.canvas is None for p in pictures_of((*plan.train.values(), *plan.eval.values())))
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16] == SMALL_TEXTS_SHA256
