"""A synthetic multimodal benchmark written in the MMEB-train and MMEB-eval layouts, from a seed.

    python -m vlm2vec_jax.data.synthetic --out DIR [--seed N] [--scale small|default|demo|mmeb_shape]

It is the project's built-in data (demo, tests, notebook): rendered scenes of coloured shapes
covering MMEB's four meta-tasks, small enough for a tiny model to learn on a CPU in minutes, and
structured so that batch composition (B3) and out-of-distribution generalisation can be measured.

Scenes. An 84x84 image is a 3x3 grid of 28 px cells, one Qwen2-VL merged token each (patch 14,
merge 2). A cell holds at most one object: a colour (6) and a shape (6), with a random size and
offset inside its cell; VQA scenes may also show a two-character glyph string (PIL's bitmap font).
Every text (class label, caption, question, edit, referring expression) is a function of the
discrete content (colours, shapes, cells, glyphs), never of size or offset. Two images with the same
discrete content are therefore the same answer, and eval candidates are kept distinct by that
content, so no distractor is a hidden positive.

Hard negatives are one edit away from the positive: one object recoloured, reshaped or moved, or
two objects' colours swapped (the binding error small models make); labels that share the colour
or the shape; answers of the same type (another count, colour, shape, position or glyph string);
the unedited reference image or the wrong edit (SynEdit); the crop of the confuser object that
shares the target's colour or shape (SynGround). Each train row carries one as `neg_*`; eval rows
mix up to `Scale.hard` of them with easy distractors drawn from other rows of the dataset.

Batch composition matters because train rows come in families of near-duplicates: one scene and
one-edit variants of it (SynCaption_*), several edits of one reference image (SynEdit), several
questions about one image (SynVQA), a target and its confuser in one image (SynGround). Rows are
shuffled, so a random batch rarely holds two members of a family, while a batch built from a
teacher's neighbourhoods (B3) does: in-batch negatives are hard only when batches are composed
well. Classification needs no families: labels sharing a colour or a shape are already each other's
neighbours.

OOD. Six colour-shape pairs, one per colour and one per shape (a permutation drawn from the seed),
appear in no train row (no image, text or negative) and in no IND eval row, while every colour and
every shape still trains with five partners. Each `*_OOD` eval dataset puts a held-out pair in every
ground truth, so it measures composing a colour and a shape only ever seen apart.

MMEB's shapes (`--scale mmeb_shape`). The same tasks with the length variation of real MMEB-train,
for packing and throughput benchmarks: images of varied sizes and aspect ratios (`Scale.shapes`, see
`synthetic_shapes`: mostly photos, a few thumbnails, a tail of tall and wide documents; large ones as
JPEG), text-only targets in 60% of the train rows (the classification and VQA subsets get more rows,
`Scale.subset_rows`, as in MMEB where 13 of 20 train subsets have them), and a VisDial-like subset,
SynDialog (`Scale.extra_subsets`): a text-only dialogue of a few to a few dozen rounds -> the image,
its hard negative an image one edit away. The other scales keep 84x84 scenes and their exact files.

Splits and determinism. Queries are unique within a dataset and no IND eval query (text and image)
occurs in train. One `random.Random` per (seed, part, dataset) drives the plan; images are pure
functions of their specs, written as PNG (JPEG for large `mmeb_shape` images) with fixed settings
and no metadata, named in plan order;
nothing iterates over a hash-ordered set. The same seed and scale give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import cache, cached_property
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlm2vec_jax.data.synthetic_shapes import (
    JPEG_QUALITY,
    PAGE,
    Canvas,
    Shapes,
    big_text_mask,
    draw_canvas,
    paint_page,
    scaled_box,
    text_size,
)

__all__ = [
    "EVAL_DATASETS",
    "EXTRA_SUBSETS",
    "GENERATOR_VERSION",
    "OOD_DATASETS",
    "SCALES",
    "TRAIN_SUBSETS",
    "Picture",
    "Plan",
    "Row",
    "Scale",
    "Shapes",
    "Side",
    "build_plan",
    "generate",
    "held_out_labels",
    "main",
    "render",
]

GENERATOR_VERSION = 1

# --- Vocabulary ---

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (230, 205, 30),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "star": "stars", "cross": "crosses"}  # fmt: skip
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")  # fmt: skip
NUMBERS = ("zero", "one", "two", "three", "four")  # VQA scenes hold at most four shapes
GLYPH_CHARS = "AEHKMRTX"  # capitals that stay distinct in the 6x11 bitmap font

Label = tuple[str, str]  # (colour, shape)
Fact = tuple[str, str, int]  # (colour, shape, cell); cell -1 when a side shows or names no position

ALL_LABELS: tuple[Label, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

IMAGE_SIZE = 84
CELL = IMAGE_SIZE // 3
CROP_MARGIN = 6  # a grounding crop is the object's cell plus this margin: slivers of neighbours show
BACKGROUND = (235, 235, 235)
INK = (20, 20, 20)

# --- Instructions (MMEB's wording where MMEB has the task; "everyday" dropped: these are not photos) ---

IMAGE_PLACEHOLDER = "<|image_1|>"
CLS_Q = "Represent the given image for classification."
VQA_Q = "Represent the given image with the following question:"
T2I_Q = "Find me an image that matches the given caption:"
I2T_Q = "Find an image caption describing the given image."
EDIT_Q = "Given an image, find a similar image with the described changes:"
GROUND_LABEL_Q = "Select the portion of the image that isolates the object of the given label:"
GROUND_EXPR_Q = "Select the portion of the image that follows the language expressions:"
DIALOG_Q = "Represent the given dialogue about an image, which is used for image retrieval:"
IMAGE_T = "Represent the given image."
CROP_T = "Represent the given cropped image of the object."

# The diverse_instruction files rephrase the query instruction (one variant drawn per row).
DIVERSE_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    CLS_Q: (
        "Identify the object shown in the image.",
        "Classify the shape in the given picture.",
        "Represent this picture for classifying the object it shows.",
    ),
    VQA_Q: (
        "Answer the question about the given image:",
        "Look at the image and answer the following question:",
        "Represent the image together with this question:",
    ),
    T2I_Q: (
        "Retrieve the image described by this caption:",
        "Find the picture that this caption describes:",
        "Which image shows the following scene?",
    ),
    I2T_Q: (
        "Find a caption for the given image.",
        "Retrieve the text that describes this picture.",
        "Represent the given image for caption retrieval.",
    ),
    EDIT_Q: (
        "Find the image obtained from this one after the following change:",
        "Retrieve the given image edited as follows:",
        "Apply the change to the image and find the result:",
    ),
    GROUND_LABEL_Q: (
        "Find the region of the image showing the object with this label:",
        "Crop the object of the given label out of the image:",
        "Locate in the image the object named here:",
    ),
    GROUND_EXPR_Q: (
        "Find the region of the image that this expression refers to:",
        "Crop the object described by the expression out of the image:",
        "Locate in the image the object described here:",
    ),
    DIALOG_Q: (
        "Find the image this dialogue is about:",
        "Retrieve the picture discussed in the following conversation:",
        "Represent this dialogue for finding the image it describes:",
    ),
}

# --- Datasets and scales ---

TRAIN_SUBSETS: dict[str, str] = {
    "SynCls": "classification",
    "SynVQA": "vqa",
    "SynCaption_t2i": "retrieval",
    "SynCaption_i2t": "retrieval",
    "SynEdit": "retrieval",
    "SynGround": "grounding",
}
"""Train subset -> meta-task. Every one is also an IND eval dataset (held-out rows)."""

OOD_DATASETS = ("SynCls_OOD", "SynVQA_OOD", "SynCaption_t2i_OOD", "SynGround_OOD")

EVAL_DATASETS: dict[str, tuple[str, str]] = {
    **{name: (meta, "IND") for name, meta in TRAIN_SUBSETS.items()},
    **{name: (TRAIN_SUBSETS[name.removesuffix("_OOD")], "OOD") for name in OOD_DATASETS},
}
"""Eval dataset -> (meta-task, "IND" | "OOD")."""

EXTRA_SUBSETS: dict[str, str] = {"SynDialog": "retrieval"}
"""Train subsets (each also an IND eval dataset) that only scales naming them in `extra_subsets` write."""

_META_TASKS = {**TRAIN_SUBSETS, **EXTRA_SUBSETS}
_EVAL_INFO = {**EVAL_DATASETS, **{name: (meta, "IND") for name, meta in EXTRA_SUBSETS.items()}}


@dataclass(frozen=True)
class Scale:
    """Sizes of one generation. Classification ranks all labels of its dataset; other eval rows
    rank `retrieval` / `vqa` / `grounding` candidates, of which up to `hard` are hard negatives.
    `shapes`: the image-size mix (None: 84x84 scenes); `extra_subsets`: names from EXTRA_SUBSETS;
    `subset_rows`: (subset, train rows) where a subset gets other than `train_rows`."""

    train_rows: int  # per train subset
    eval_rows: int  # per eval dataset
    retrieval: int
    vqa: int
    grounding: int  # at most the number of labels: grounding candidates show distinct objects
    hard: int
    workers: int  # rendering processes
    shapes: Shapes | None = None
    extra_subsets: tuple[str, ...] = ()
    subset_rows: tuple[tuple[str, int], ...] = ()

    def candidates(self, meta_task: str) -> int:
        return {"retrieval": self.retrieval, "vqa": self.vqa, "grounding": self.grounding}[meta_task]


SCALES: dict[str, Scale] = {
    # Tests: a few hundred train rows, rendered serially in about a second.
    "small": Scale(train_rows=64, eval_rows=12, retrieval=10, vqa=10, grounding=10, hard=4, workers=1),
    # The demo (docs/reference.md, "The demo's budget"): ~1000 steps of batch 64 in 8 minutes see
    # each row ~3 times.
    "default": Scale(train_rows=4000, eval_rows=200, retrieval=100, vqa=40, grounding=24, hard=20, workers=2),
    # `make demo`: default's train rows (byte-identical files), eval candidates as MMEB draws them (other
    # rows' targets at random, no one-edit distractors). Default's 20 near-duplicates per query make
    # retrieval an exact-match test of every object's colour, shape and cell: what B3 is measured on,
    # beyond what a 0.85M model learns in the demo's ten minutes (README, "The demo").
    "demo": Scale(train_rows=4000, eval_rows=200, retrieval=100, vqa=40, grounding=24, hard=0, workers=2),
    # Packing benchmarks: MMEB-train's shapes (module docstring) in 5000 train rows, 60% with text-only
    # targets; images up to 320 merged tokens (Shapes(max_pixels=28 * 28 * 1280) for MMEB's 1280).
    "mmeb_shape": Scale(
        train_rows=500, eval_rows=50, retrieval=20, vqa=20, grounding=10, hard=4, workers=2,
        shapes=Shapes(), extra_subsets=("SynDialog",), subset_rows=(("SynCls", 1000), ("SynVQA", 1500)),
    ),  # fmt: skip
}

# --- Scenes and sides ---


@dataclass(frozen=True)
class Obj:
    """One shape in its cell; `size` is its bounding-box side, (dx, dy) its offset from the cell centre."""

    colour: str
    shape: str
    cell: int
    size: int
    dx: int
    dy: int

    @property
    def label(self) -> Label:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Objects sorted by cell, and an optional glyph string in a cell of its own."""

    objs: tuple[Obj, ...]
    glyph: str = ""
    glyph_cell: int = -1

    @cached_property
    def facts(self) -> tuple[Fact, ...]:
        return tuple((o.colour, o.shape, o.cell) for o in self.objs)

    def with_obj(self, i: int, **changes: object) -> Scene:
        """The scene with object i changed (keeping its size and offset: a minimal visual edit)."""
        objs = list(self.objs)
        objs[i] = replace(objs[i], **changes)
        return replace(self, objs=tuple(sorted(objs, key=lambda o: o.cell)))


@dataclass(frozen=True)
class Picture:
    """What one image file shows: a scene, or a crop (left, top, right, bottom, in the 84x84
    scene's coordinates) of it; on a `canvas` of another size (`mmeb_shape`) when one is given."""

    scene: Scene
    box: tuple[int, int, int, int] | None = None
    canvas: Canvas | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image written."""
        if self.box is not None:
            box = self.box if self.canvas is None else scaled_box(self.canvas, self.box, IMAGE_SIZE)
            return box[2] - box[0], box[3] - box[1]
        return (IMAGE_SIZE, IMAGE_SIZE) if self.canvas is None else (self.canvas.width, self.canvas.height)


@dataclass(frozen=True)
class Side:
    """A query or target before formatting. `facts` are the objects it shows or names (what the OOD
    and hard-negative guarantees are stated on); `kind` is a VQA answer's type."""

    instruction: str
    body: str = ""
    picture: Picture | None = None
    facts: tuple[Fact, ...] = ()
    kind: str = ""

    def text(self, instruction: str | None = None) -> str:
        """MMEB's text: `<|image_1|>` and a newline first when there is an image, then instruction and body."""
        words = " ".join(p for p in (self.instruction if instruction is None else instruction, self.body) if p)
        return f"{IMAGE_PLACEHOLDER}\n{words}" if self.picture is not None else words

    @property
    def identity(self) -> object:
        """What makes two candidates the same answer: the text, or the discrete content of the picture."""
        return self.body if self.picture is None else frozenset(self.facts)


@dataclass(frozen=True)
class Row:
    """One dataset row. `targets[0]` is the positive; then one hard negative (train) or the
    distractors (eval)."""

    query: Side
    targets: tuple[Side, ...]


@dataclass(frozen=True)
class Plan:
    """Everything a generation writes, before rendering: rows per train subset and eval dataset."""

    held_out: tuple[Label, ...]
    train: dict[str, list[Row]]
    eval: dict[str, list[Row]]


@dataclass(frozen=True)
class _Example:
    """A query with its positive, hard negatives (most useful first: `hard[0]` is the train
    negative) and the sides it lends its dataset as easy distractors."""

    query: Side
    positive: Side
    hard: tuple[Side, ...]
    pool: tuple[Side, ...]


@dataclass(frozen=True)
class _Rules:
    """Which labels a dataset may use: `allowed` (in-distribution) everywhere; OOD examples put a
    `held_out` label in the ground truth, and their distractors may use any label. `hard`: how many
    one-edit variants an example needs (train uses one; building all would dominate the run time)."""

    allowed: tuple[Label, ...]
    held_out: tuple[Label, ...]
    ood: bool
    hard: int

    @property
    def distractor_labels(self) -> frozenset[Label]:
        return frozenset(ALL_LABELS if self.ood else self.allowed)


def _rng(seed: int, *parts: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across processes and PYTHONHASHSEED.
    return random.Random("/".join(("vlm2vec-synthetic", str(seed), *parts)))


def held_out_labels(seed: int) -> tuple[Label, ...]:
    """The colour-shape pairs no train row shows or names: one per colour and one per shape."""
    shapes = list(SHAPES)
    _rng(seed, "held_out").shuffle(shapes)
    return tuple(zip(COLOURS, shapes, strict=True))


def _new_obj(rng: random.Random, label: Label, cell: int) -> Obj:
    size = rng.randint(14, 22)
    slack = (CELL - size) // 2 - 1  # the object stays inside its cell
    return Obj(label[0], label[1], cell, size, rng.randint(-slack, slack), rng.randint(-slack, slack))


def _scene(rng: random.Random, labels: Sequence[Label], glyph: str = "") -> Scene:
    cells = rng.sample(range(9), len(labels) + bool(glyph))
    objs = sorted((_new_obj(rng, label, cell) for label, cell in zip(labels, cells)), key=lambda o: o.cell)
    return Scene(tuple(objs), glyph, cells[-1] if glyph else -1)


def _one_off(label: Label, labels: Sequence[Label]) -> list[Label]:
    """Labels sharing exactly one of colour and shape with `label`, in `labels` order."""
    return [x for x in labels if (x[0] == label[0]) != (x[1] == label[1])]


def _variants(scene: Scene, ok: frozenset[Label], rng: random.Random, limit: int) -> list[Scene]:
    """Up to `limit` random scenes one edit away (recolour, reshape or move one object, swap two
    objects' colours) whose objects keep labels in `ok`."""
    edits: list[tuple[int, str, object]] = []
    occupied = {o.cell for o in scene.objs}
    for i, o in enumerate(scene.objs):
        edits += [(i, "colour", c) for c in COLOURS if c != o.colour and (c, o.shape) in ok]
        edits += [(i, "shape", s) for s in SHAPES if s != o.shape and (o.colour, s) in ok]
        edits += [(i, "cell", cell) for cell in range(9) if cell not in occupied]
    for i, j in combinations(range(len(scene.objs)), 2):
        a, b = scene.objs[i], scene.objs[j]
        if a.colour != b.colour and (b.colour, a.shape) in ok and (a.colour, b.shape) in ok:
            edits.append((i, "swap", j))
    rng.shuffle(edits)
    out = []
    for i, attr, value in edits[:limit]:
        if attr == "swap":
            j = value
            out.append(scene.with_obj(i, colour=scene.objs[j].colour).with_obj(j, colour=scene.objs[i].colour))
        else:
            out.append(scene.with_obj(i, **{attr: value}))
    return out


ARTICLES = {c: "an" if c[0] in "aeiou" else "a" for c in COLOURS}


def _caption(scene: Scene) -> str:
    parts = [f"{ARTICLES[o.colour]} {o.colour} {o.shape} at the {POSITIONS[o.cell]}" for o in scene.objs]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _crop_box(cell: int) -> tuple[int, int, int, int]:
    x, y = (cell % 3) * CELL, (cell // 3) * CELL
    m = CROP_MARGIN
    return (max(x - m, 0), max(y - m, 0), min(x + CELL + m, IMAGE_SIZE), min(y + CELL + m, IMAGE_SIZE))


@cache  # classification examples list every label
def _label_side(label: Label) -> Side:
    return Side("", f"{label[0]} {label[1]}", facts=((label[0], label[1], -1),))


def _image_target(scene: Scene) -> Side:
    return Side(IMAGE_T, picture=Picture(scene), facts=scene.facts)


def _caption_target(scene: Scene) -> Side:
    return Side("", _caption(scene), facts=scene.facts)


def _answer_side(kind: str, answer: str) -> Side:
    return Side("", answer, kind=kind)


def _glyph_variants(glyph: str) -> list[str]:
    return [glyph[:i] + ch + glyph[i + 1 :] for i in range(len(glyph)) for ch in GLYPH_CHARS if ch != glyph[i]]


ANSWERS: tuple[Side, ...] = tuple(
    [_answer_side("count", n) for n in NUMBERS]
    + [_answer_side("colour", c) for c in COLOURS]
    + [_answer_side("shape", s) for s in SHAPES]
    + [_answer_side("position", p) for p in POSITIONS]
    + [_answer_side("text", a + b) for a in GLYPH_CHARS for b in GLYPH_CHARS]
)
"""Every VQA answer: the easy-distractor pool of the VQA eval datasets."""

# --- Tasks: each draws one family of examples (`size` of them at most; eval asks for one) ---


def _cls_family(rng: random.Random, rules: _Rules, size: int) -> list[_Example]:
    """One object; the target is its label. The OOD dataset ranks all 36 labels, IND the 30 trained."""
    labels = ALL_LABELS if rules.ood else rules.allowed
    label = rng.choice(rules.held_out if rules.ood else rules.allowed)
    scene = _scene(rng, [label])
    near = _one_off(label, rules.allowed)
    rng.shuffle(near)
    rest = [x for x in labels if x != label and x not in near]
    query = Side(CLS_Q, picture=Picture(scene), facts=scene.facts)
    return [_Example(query, _label_side(label), tuple(map(_label_side, near + rest)), ())]


class _Question(NamedTuple):
    text: str
    kind: str
    answer: str
    alternatives: list[str]  # the other answers of the same kind: the hard negatives


def _pick(rng: random.Random, candidates: list[Obj], focus: Obj | None) -> Obj | None:
    if focus is not None:
        return focus if focus in candidates else None
    return rng.choice(candidates) if candidates else None


def _others(vocab: Sequence[str] | dict[str, object], answer: str) -> list[str]:
    return [x for x in vocab if x != answer]


def _questions(rng: random.Random, scene: Scene, focus: Obj | None) -> list[_Question]:
    """The questions `scene` answers unambiguously; about `focus` only when one is given (OOD)."""
    objs, out = scene.objs, []
    shapes, labels = [o.shape for o in objs], [o.label for o in objs]
    if o := _pick(rng, [o for o in objs if shapes.count(o.shape) == 1], focus):
        out.append(_Question(f"What colour is the {o.shape}?", "colour", o.colour, _others(COLOURS, o.colour)))
    if o := _pick(rng, list(objs), focus):
        out.append(_Question(f"What shape is at the {POSITIONS[o.cell]}?", "shape", o.shape, _others(SHAPES, o.shape)))
    if o := _pick(rng, [o for o in objs if labels.count(o.label) == 1], focus):
        where = POSITIONS[o.cell]
        out.append(_Question(f"Where is the {o.colour} {o.shape}?", "position", where, _others(POSITIONS, where)))
    if focus is None:
        colour = rng.choice([o.colour for o in objs]) if rng.random() < 0.8 else rng.choice(list(COLOURS))
        n = NUMBERS[sum(o.colour == colour for o in objs)]
        out.append(_Question(f"How many {colour} shapes are there?", "count", n, _others(NUMBERS, n)))
        shape = rng.choice(shapes) if rng.random() < 0.8 else rng.choice(SHAPES)
        n = NUMBERS[shapes.count(shape)]
        out.append(_Question(f"How many {PLURALS[shape]} are there?", "count", n, _others(NUMBERS, n)))
        if scene.glyph:
            glyph = scene.glyph
            out.append(_Question("What text is written in the image?", "text", glyph, _glyph_variants(glyph)))
    return out


def _vqa_family(rng: random.Random, rules: _Rules, size: int) -> list[_Example]:
    """Several questions about one scene (counts, colours, shapes, positions, glyph text). OOD: the
    scene holds a held-out object with a unique shape, and the question is about it."""
    if rules.ood:
        held = rng.choice(rules.held_out)
        partners = [x for x in rules.allowed if x[1] != held[1]]
        scene = _scene(rng, [held] + [rng.choice(partners) for _ in range(rng.randint(1, 3))])
        focus = next(o for o in scene.objs if o.label == held)
    else:
        glyph = "".join(rng.choices(GLYPH_CHARS, k=2)) if rng.random() < 0.5 else ""
        scene = _scene(rng, [rng.choice(rules.allowed) for _ in range(rng.randint(2, 4))], glyph)
        focus = None
    questions = _questions(rng, scene, focus)
    out = []
    for q in rng.sample(questions, min(size, len(questions))):
        hard = [_answer_side(q.kind, a) for a in q.alternatives]
        rng.shuffle(hard)
        query = Side(VQA_Q, q.text, Picture(scene), scene.facts)
        out.append(_Example(query, _answer_side(q.kind, q.answer), tuple(hard), ANSWERS))
    return out


def _caption_scenes(rng: random.Random, rules: _Rules, size: int) -> list[Scene]:
    """A 2-3 object scene and up to size-1 one-edit variants of it (a family of near-duplicates)."""
    labels = [rng.choice(rules.allowed) for _ in range(rng.randint(2, 3))]
    if rules.ood:
        labels[0] = rng.choice(rules.held_out)
    base = _scene(rng, labels)
    return [base] + _variants(base, frozenset(rules.allowed), rng, size - 1)


def _text_to_image(
    instruction: str, describe: Callable[[random.Random, Scene, _Rules], str]
) -> Callable[[random.Random, _Rules, int], list[_Example]]:
    """A family: a text describing a scene -> its image; hard negatives are the images one edit away."""

    def family(rng: random.Random, rules: _Rules, size: int) -> list[_Example]:
        out = []
        for scene in _caption_scenes(rng, rules, size):
            positive = _image_target(scene)
            hard = tuple(map(_image_target, _variants(scene, rules.distractor_labels, rng, rules.hard)))
            query = Side(instruction, describe(rng, scene, rules), facts=scene.facts)
            out.append(_Example(query, positive, hard, (positive,)))
        return out

    return family


_t2i_family = _text_to_image(T2I_Q, lambda rng, scene, rules: _caption(scene))
"""Caption -> image."""

_SMALL_TALK = (  # true on every canvas (a document's page has text and no plain background)
    "Q: are there any people? A: no, only shapes.",
    "Q: is there an animal? A: no.",
    "Q: do any of the shapes overlap? A: no, each one has a cell of its own.",
    "Q: is this a photograph? A: no, it is a flat drawing.",
    "Q: are the shapes outlined? A: no, each is filled with a single colour.",
    "Q: is the image in colour? A: yes.",
)


def _dialogue(rng: random.Random, scene: Scene, rules: _Rules) -> str:
    """VisDial-like rounds that together state every object's colour, shape and position (so only
    this scene fits them), among true small talk (absent labels and cells, counts): from a few rounds
    to a few dozen, long-tailed. Names no label outside `rules.allowed`."""
    objs = list(scene.objs)
    rng.shuffle(objs)
    labels = [o.label for o in objs]
    rounds: list[tuple[str, ...]] = []  # a follow-up question ("what colour is it?") stays after its round
    for o in objs:
        where, how = POSITIONS[o.cell], rng.randrange(3)
        if how == 0:
            rounds.append((f"Q: what is at the {where}? A: {ARTICLES[o.colour]} {o.colour} {o.shape}.",))
        elif how == 1 and labels.count(o.label) == 1:
            rounds.append((f"Q: where is the {o.colour} {o.shape}? A: at the {where}.",))
        else:
            rounds.append(
                (f"Q: is there anything at the {where}? A: yes, a {o.shape}.", f"Q: what colour is it? A: {o.colour}.")
            )
    cells = {o.cell for o in objs}
    talk = [f"Q: is there {ARTICLES[c]} {c} {s}? A: no." for c, s in rules.allowed if (c, s) not in labels]
    talk += [f"Q: is there anything at the {POSITIONS[c]}? A: no, it is empty." for c in range(9) if c not in cells]
    talk += [f"Q: how many {c} shapes are there? A: {NUMBERS[[o.colour for o in objs].count(c)]}." for c in COLOURS]
    talk += [f"Q: how many {PLURALS[s]} are there? A: {NUMBERS[[o.shape for o in objs].count(s)]}." for s in SHAPES]
    talk += _SMALL_TALK
    u = rng.random()
    n = rng.randint(0, 3) if u < 0.5 else rng.randint(4, 12) if u < 0.85 else rng.randint(13, 40)
    rounds += [(line,) for line in rng.sample(talk, min(n, len(talk)))]
    rng.shuffle(rounds)
    return " ".join([f"Q: how many shapes are there? A: {NUMBERS[len(objs)]}.", *(q for r in rounds for q in r)])


_dialog_family = _text_to_image(DIALOG_Q, _dialogue)
"""Dialogue -> image (SynDialog): long text-only queries."""


def _i2t_family(rng: random.Random, rules: _Rules, size: int) -> list[_Example]:
    """Image -> caption; hard negatives are the captions of the scenes one edit away."""
    out = []
    for scene in _caption_scenes(rng, rules, size):
        positive = _caption_target(scene)
        hard = tuple(map(_caption_target, _variants(scene, rules.distractor_labels, rng, rules.hard)))
        query = Side(I2T_Q, picture=Picture(scene), facts=scene.facts)
        out.append(_Example(query, positive, hard, (positive,)))
    return out


class _Edit(NamedTuple):
    op: str
    obj: int  # index into the reference scene's objects
    value: object
    text: str
    target: Scene


def _edits(scene: Scene, ok: frozenset[Label]) -> list[_Edit]:
    """Every edit of a scene whose shapes are distinct (so "the circle" names one object)."""
    shapes, occupied, out = {o.shape for o in scene.objs}, {o.cell for o in scene.objs}, []
    for i, o in enumerate(scene.objs):
        for c in COLOURS:
            if c != o.colour and (c, o.shape) in ok:
                out.append(_Edit("colour", i, c, f"make the {o.shape} {c}", scene.with_obj(i, colour=c)))
        for s in SHAPES:
            if s not in shapes and (o.colour, s) in ok:
                out.append(_Edit("shape", i, s, f"turn the {o.shape} into a {s}", scene.with_obj(i, shape=s)))
        for cell in range(9):
            if cell not in occupied:
                text = f"move the {o.shape} to the {POSITIONS[cell]}"
                out.append(_Edit("move", i, cell, text, scene.with_obj(i, cell=cell)))
    return out


def _edit_family(rng: random.Random, rules: _Rules, size: int) -> list[_Example]:
    """Reference image + modification text -> edited image (CIRR-like), several edits of one
    reference. Hard negatives: the unedited reference, the same edit with another value, the same
    edit of another object, then images one edit from the target."""
    allowed = frozenset(rules.allowed)
    shapes = rng.sample(SHAPES, rng.randint(2, 3))
    ref = _scene(rng, [(rng.choice([c for c in COLOURS if (c, s) in allowed]), s) for s in shapes])
    ref_side, edits, out = _image_target(ref), _edits(ref, allowed), []
    for e in rng.sample(edits, min(size, len(edits))):
        same_op = [f for f in edits if f.op == e.op and f != e]
        wrong_value = [_image_target(f.target) for f in same_op if f.obj == e.obj]
        wrong_object = [_image_target(f.target) for f in same_op if f.value == e.value]
        rng.shuffle(wrong_value)
        near = [ref_side, *wrong_value] if rng.random() < 0.5 else [*wrong_value, ref_side]
        variants = _variants(e.target, rules.distractor_labels, rng, rules.hard)
        hard = (*near, *wrong_object, *map(_image_target, variants))
        query = Side(EDIT_Q, e.text, Picture(ref), ref.facts)
        positive = _image_target(e.target)
        out.append(_Example(query, positive, hard, (positive, ref_side)))
    return out


def _ground_family(rng: random.Random, rules: _Rules, size: int) -> list[_Example]:
    """Scene + label or position -> the crop of that object. Every scene holds a confuser sharing the
    target's colour or shape; target and confuser are each other's hard negative."""
    target = rng.choice(rules.held_out if rules.ood else rules.allowed)
    confuser = rng.choice(_one_off(target, rules.allowed))
    labels = [target, confuser]
    if rng.random() < 0.5:
        labels.append(rng.choice([x for x in rules.allowed if x not in labels]))
    scene = _scene(rng, labels)
    crops = {
        o.label: Side(CROP_T, picture=Picture(scene, _crop_box(o.cell)), facts=((o.colour, o.shape, -1),))
        for o in scene.objs
    }
    out = []
    for label, partner in [(target, confuser), (confuser, target)][:size]:
        o = next(o for o in scene.objs if o.label == label)
        if rng.random() < 0.5:
            query = Side(GROUND_LABEL_Q, f"{o.colour} {o.shape}", Picture(scene), scene.facts)
        else:
            query = Side(GROUND_EXPR_Q, f"the object at the {POSITIONS[o.cell]}", Picture(scene), scene.facts)
        hard = (crops[partner], *(side for x, side in crops.items() if x not in (label, partner)))
        out.append(_Example(query, crops[label], hard, tuple(crops.values())))
    return out


_Family = Callable[[random.Random, _Rules, int], list[_Example]]

# Train subset -> (family generator, train family size).
_TASKS: dict[str, tuple[_Family, int]] = {
    "SynCls": (_cls_family, 1),
    "SynVQA": (_vqa_family, 4),
    "SynCaption_t2i": (_t2i_family, 4),
    "SynCaption_i2t": (_i2t_family, 4),
    "SynEdit": (_edit_family, 4),
    "SynGround": (_ground_family, 2),
}
_EXTRA_TASKS: dict[str, tuple[_Family, int]] = {"SynDialog": (_dialog_family, 4)}

# --- The plan ---


def _query_key(side: Side) -> tuple[str, str, Picture | None]:
    return (side.instruction, side.body, side.picture)


def _draw(rng: random.Random, family: _Family, rules: _Rules, size: int, count: int, taken: set) -> list[_Example]:
    """`count` examples whose queries are not in `taken` (which collects them)."""
    out: list[_Example] = []
    while len(out) < count:
        for ex in family(rng, rules, size):
            if (key := _query_key(ex.query)) not in taken:
                taken.add(key)
                out.append(ex)
    return out[:count]


def _candidates(rng: random.Random, ex: _Example, pool: list[Side], n: int, n_hard: int) -> tuple[Side, ...]:
    """The positive, then n-1 distinct distractors: up to `n_hard` hard ones, the rest drawn from
    the pool (other rows' targets), in shuffled order."""
    chosen = {ex.positive.identity: ex.positive}
    for side in ex.hard:
        if len(chosen) > min(n_hard, n - 1):
            break
        chosen.setdefault(side.identity, side)
    for side in [*rng.sample(pool, len(pool)), *ex.hard]:
        if len(chosen) >= n:
            break
        chosen.setdefault(side.identity, side)
    if len(chosen) < n:
        raise RuntimeError(f"only {len(chosen)} distinct candidates for {ex.query.text()!r}, {n} wanted")
    distractors = list(chosen.values())[1:]
    rng.shuffle(distractors)
    return (ex.positive, *distractors)


def _eval_rows(
    rng: random.Random, meta_task: str, family: _Family, rules: _Rules, scale: Scale, taken: set
) -> list[Row]:
    examples = _draw(rng, family, rules, 1, scale.eval_rows, taken)
    pool = list(dict.fromkeys(side for ex in examples for side in ex.pool))
    rows = []
    for ex in examples:
        if meta_task == "classification":  # every label of the dataset
            n = n_hard = 1 + len(ex.hard)
        else:
            n, n_hard = scale.candidates(meta_task), scale.hard
        if meta_task == "grounding":  # after the own scene's crops: other scenes' one-off objects
            one_off = set(_one_off(ex.positive.facts[0][:2], ALL_LABELS))
            near = [side for side in pool if side.facts[0][:2] in one_off]
            rng.shuffle(near)
            ex = replace(ex, hard=(*ex.hard, *near))
        rows.append(Row(ex.query, _candidates(rng, ex, pool, n, n_hard)))
    return rows


def build_plan(seed: int = 0, scale: str = "default") -> Plan:
    """Every row of a generation, without rendering: what `generate` writes, and what tests and
    notebooks inspect (attributes per side, held-out labels)."""
    sizes = SCALES[scale]
    held_out = held_out_labels(seed)
    allowed = tuple(x for x in ALL_LABELS if x not in held_out)
    train_rules = _Rules(allowed, held_out, ood=False, hard=1)
    ind, ood = _Rules(allowed, held_out, False, sizes.hard), _Rules(allowed, held_out, True, sizes.hard)
    train, evals = {}, {}
    tasks = {**_TASKS, **{name: _EXTRA_TASKS[name] for name in sizes.extra_subsets}}
    rows = dict(sizes.subset_rows)
    for name, (family, size) in tasks.items():
        taken: set = set()
        rng = _rng(seed, "train", name)
        examples = _draw(rng, family, train_rules, size, rows.get(name, sizes.train_rows), taken)
        rng.shuffle(examples)  # scatter the families: a random batch must not get them for free
        train[name] = [Row(ex.query, (ex.positive, ex.hard[0])) for ex in examples]
        evals[name] = _eval_rows(_rng(seed, "eval", name), _META_TASKS[name], family, ind, sizes, taken)
    for name in OOD_DATASETS:
        base = name.removesuffix("_OOD")
        evals[name] = _eval_rows(_rng(seed, "eval", name), TRAIN_SUBSETS[base], _TASKS[base][0], ood, sizes, set())
    if sizes.shapes is not None:
        for part, datasets in (("train", train), ("eval", evals)):
            for name, rows_of in datasets.items():
                meta_task = _EVAL_INFO[name][0]
                datasets[name] = _on_canvases(rows_of, _rng(seed, "canvas", part, name), sizes.shapes, meta_task)
    return Plan(held_out, train, evals)


def _on_canvases(rows: list[Row], rng: random.Random, shapes: Shapes, meta_task: str) -> list[Row]:
    """The rows with every picture on a canvas: one per scene, drawn in first-use order, so a crop
    is cut from the canvas its query shows."""
    canvases: dict[Scene, Canvas] = {}

    def place(side: Side) -> Side:
        if side.picture is None:
            return side
        scene = side.picture.scene
        if scene not in canvases:
            canvases[scene] = draw_canvas(rng, shapes, meta_task)
        return replace(side, picture=replace(side.picture, canvas=canvases[scene]))

    return [Row(place(row.query), tuple(map(place, row.targets))) for row in rows]


# --- Rendering ---


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a non-circle shape of radius r centred on (cx, cy)."""
    if shape == "square":
        s = r * 0.85  # about the circle's area
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        corners = [(0.0, -1.0), (0.224, -0.309), (0.951, -0.309), (0.363, 0.118), (0.588, 0.809),
                   (0.0, 0.382), (-0.588, 0.809), (-0.363, 0.118), (-0.951, -0.309), (-0.224, -0.309)]  # fmt: skip
        return [(cx + r * x, cy + r * y) for x, y in corners]
    t = r / 3  # cross
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t)]  # fmt: skip


def _paint(img: Image.Image, scene: Scene, left: int = 0, top: int = 0, k: float = 1) -> None:
    """Draw the scene's objects and glyph into `img`, scaled by k, its top left corner at (left, top)."""
    draw = ImageDraw.Draw(img)
    for o in scene.objs:
        cx = left + k * ((o.cell % 3) * CELL + CELL / 2 + o.dx)
        cy = top + k * ((o.cell // 3) * CELL + CELL / 2 + o.dy)
        r = k * o.size / 2
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[o.colour])
        else:
            draw.polygon(_outline(o.shape, cx, cy, r), fill=COLOURS[o.colour])
    if scene.glyph:
        w, h = text_size(scene.glyph)
        mask = big_text_mask(scene.glyph, round(2 * w * k), round(2 * h * k))  # legible at one token per cell
        x, y = (scene.glyph_cell % 3) * CELL, (scene.glyph_cell // 3) * CELL
        img.paste(INK, (left + round(k * (x + (CELL - 2 * w) // 2)), top + round(k * (y + (CELL - 2 * h) // 2))), mask)


def render(picture: Picture) -> Image.Image:
    """The RGB image of a picture (84x84 or its canvas, or the crop)."""
    canvas = picture.canvas
    if canvas is None:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        _paint(img, picture.scene)
        return img.crop(picture.box) if picture.box else img
    left, top, side = canvas.scene_box
    if canvas.kind == "document":
        img = Image.new("RGB", (canvas.width, canvas.height), PAGE)
        paint_page(img, canvas)
        img.paste(BACKGROUND, (left, top, left + side, top + side))
    else:
        img = Image.new("RGB", (canvas.width, canvas.height), BACKGROUND)
    _paint(img, picture.scene, left, top, side / IMAGE_SIZE)
    return img.crop(scaled_box(canvas, picture.box, IMAGE_SIZE)) if picture.box else img


def _render_files(jobs: list[tuple[str, Picture]]) -> int:
    """Render and write PNGs (JPEGs where the name says so): fixed settings, no metadata (byte-identical reruns)."""
    for path, picture in jobs:
        if path.endswith(".jpg"):
            render(picture).save(path, format="JPEG", quality=JPEG_QUALITY)
        else:
            render(picture).save(path, format="PNG", compress_level=6)
    return len(jobs)


def _render_all(jobs: list[tuple[str, Picture]], workers: int) -> None:
    chunks = [jobs[i : i + 500] for i in range(0, len(jobs), 500)]
    with tqdm(total=len(jobs), desc="rendering", unit="img", disable=None) as bar:
        if workers <= 1:
            for chunk in chunks:
                bar.update(_render_files(chunk))
            return
        # spawn, not fork: the caller may have started JAX's threads. An executor, not a Pool: a
        # worker that cannot start raises BrokenProcessPool instead of being respawned forever.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in pool.map(_render_files, chunks):
                bar.update(done)


# --- Writing ---

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
TRAIN_SCHEMA = pa.schema([(name, pa.string()) for name in TRAIN_COLUMNS])
EVAL_SCHEMA = pa.schema(
    [("qry_text", pa.string()), ("qry_img_path", pa.string()),
     ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))]
)  # fmt: skip


class _Images:
    """Image files of one dataset: each distinct picture gets one name, in first-use order; a
    JPEG's when it has at least `jpeg_min_pixels` pixels."""

    def __init__(self, root: Path, prefix: str, jpeg_min_pixels: int | None = None) -> None:
        self.root, self.prefix, self.jpeg_min_pixels = root, prefix, jpeg_min_pixels
        self.names: dict[Picture, str] = {}

    def path(self, side: Side) -> str:
        picture = side.picture
        if picture is None:
            return ""
        if picture not in self.names:
            width, height = picture.size
            jpeg = self.jpeg_min_pixels is not None and width * height >= self.jpeg_min_pixels
            self.names[picture] = f"{self.prefix}/{len(self.names):06d}.{'jpg' if jpeg else 'png'}"
        return self.names[picture]

    def jobs(self) -> list[tuple[str, Picture]]:
        return [(str(self.root / name), picture) for picture, name in self.names.items()]


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")


def _write_train(root: Path, name: str, rows: list[Row], seed: int, jpeg: int | None) -> _Images:
    images = _Images(root, f"images/{name}", jpeg)
    columns: dict[str, list[str]] = {field: [] for field in TRAIN_COLUMNS}
    diverse_qry = []
    rng = _rng(seed, "diverse", name)
    for row in rows:
        for text, path, side in zip(TRAIN_COLUMNS[::2], TRAIN_COLUMNS[1::2], (row.query, *row.targets), strict=True):
            columns[text].append(side.text())
            columns[path].append(images.path(side))
        diverse_qry.append(row.query.text(rng.choice(DIVERSE_INSTRUCTIONS[row.query.instruction])))
    table = pa.table(columns, schema=TRAIN_SCHEMA)
    _write_parquet(table, root / name / "original-00000-of-00001.parquet")
    diverse = table.set_column(0, "qry", pa.array(diverse_qry, pa.string()))
    _write_parquet(diverse, root / name / "diverse_instruction-00000-of-00001.parquet")
    return images


def _write_eval(root: Path, name: str, rows: list[Row], jpeg: int | None) -> _Images:
    images = _Images(root, f"images/{name}", jpeg)
    columns: dict[str, list] = {field: [] for field in EVAL_SCHEMA.names}
    for row in rows:
        columns["qry_text"].append(row.query.text())
        columns["qry_img_path"].append(images.path(row.query))
        columns["tgt_text"].append([side.text() for side in row.targets])
        columns["tgt_img_path"].append([images.path(side) for side in row.targets])
    _write_parquet(pa.table(columns, schema=EVAL_SCHEMA), root / name / "test-00000-of-00001.parquet")
    return images


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write(root: Path, plan: Plan, seed: int, scale: str) -> dict:
    """Write the whole benchmark under `root` (an empty directory); returns the manifest."""
    manifest: dict = {
        "seed": seed,
        "scale": scale,
        "generator_version": GENERATOR_VERSION,
        "held_out": [list(label) for label in plan.held_out],
        "train": {},
        "eval": {},
    }
    jobs = []
    shapes = SCALES[scale].shapes
    jpeg = shapes.jpeg_min_pixels if shapes is not None else None
    for name, rows in plan.train.items():
        images = _write_train(root / "train", name, rows, seed, jpeg)
        manifest["train"][name] = {"rows": len(rows), "images": len(images.names)}
        jobs += images.jobs()
    for name, rows in plan.eval.items():
        images = _write_eval(root / "eval", name, rows, jpeg)
        manifest["eval"][name] = {"rows": len(rows), "candidates": len(rows[0].targets), "images": len(images.names)}
        jobs += images.jobs()
    for folder in dict.fromkeys(os.path.dirname(path) for path, _ in jobs):
        os.makedirs(folder, exist_ok=True)
    _render_all(jobs, SCALES[scale].workers)
    _write_json(root / "train" / "datasets.json", {name: {"meta_task": _META_TASKS[name]} for name in plan.train})
    _write_json(
        root / "eval" / "datasets.json",
        {name: {"meta_task": _EVAL_INFO[name][0], "split": _EVAL_INFO[name][1]} for name in plan.eval},
    )
    _write_json(root / "MANIFEST.json", manifest)  # last: its presence means the generation completed
    return manifest


def generate(out: Path, *, seed: int = 0, scale: str = "default") -> dict:
    """Write the benchmark to `out` and return its manifest.

    An `out` whose MANIFEST.json has the same seed, scale and generator version is reused as it is
    (so `make demo` generates once). Any other non-empty `out` is refused, never overwritten. The
    files are written to a temporary sibling and renamed into place, so an interrupted run leaves
    no half-written benchmark behind, and processes generating into one `out` at once all end up
    with the copy renamed first."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
    out = Path(out)
    manifest_file = out / "MANIFEST.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        found = (manifest.get("seed"), manifest.get("scale"), manifest.get("generator_version"))
        if found == (seed, scale, GENERATOR_VERSION):
            return manifest
        raise FileExistsError(
            f"{out} holds another synthetic benchmark (seed, scale, version = {found}, wanted "
            f"{(seed, scale, GENERATOR_VERSION)}): pass another --out, or delete {out} to regenerate"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} is not empty and has no MANIFEST.json, so it is not a synthetic benchmark: "
            "refusing to write into it; pass an empty or new directory"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _write(tmp, build_plan(seed, scale), seed, scale)
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the rename
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not manifest_file.is_file():
            raise
        # Another process (a host of the same run, a concurrent run) renamed its copy into place
        # first: use theirs, or name the mismatch.
        return generate(out, seed=seed, scale=scale)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: generate (or reuse) the benchmark and print what it holds."""
    parser = argparse.ArgumentParser(
        prog="python -m vlm2vec_jax.data.synthetic",
        description="Write the synthetic MMEB-layout benchmark (train/, eval/, MANIFEST.json) to a directory.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (new, empty, or a previous run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=list(SCALES), default="default")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = generate(args.out, seed=args.seed, scale=args.scale)
    train = manifest["train"]
    evals = manifest["eval"]
    print(
        f"{args.out}: {sum(d['rows'] for d in train.values())} train rows in {len(train)} subsets, "
        f"{sum(d['rows'] for d in evals.values())} eval queries in {len(evals)} datasets "
        f"(seed {manifest['seed']}, scale {manifest['scale']}, {time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
