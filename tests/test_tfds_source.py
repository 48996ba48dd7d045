"""TFDS adapters on a tiny dataset this test prepares itself (array_record, as `data_source` reads).

Images are handed to TFDS already PNG-encoded, which prepares without TensorFlow (numpy arrays
would be encoded with TensorFlow); reading never needs it. So the only test dependency is
`tensorflow-datasets`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlm2vec_jax.data.bad_data import BadDataError
from vlm2vec_jax.data.prompts import CLASS_LABEL_PROMPT, IMAGE_CAPTION_PROMPT
from vlm2vec_jax.data.records import Side
from vlm2vec_jax.data.tfds_source import (
    CLASSIFICATION_QUERY,
    I2T_QUERY,
    T2I_TARGET,
    ImageCaption,
    ImageClassification,
    read_tfds_eval,
    read_tfds_train,
)
from vlm2vec_jax.processing.image import load_image

tfds = pytest.importorskip(
    "tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install tensorflow-datasets)"
)

NAMES = ["red_square", "green_square", "blue_square"]
COLORS = [(220, 0, 0), (0, 220, 0), (0, 0, 220)]
N_TRAIN, N_TEST = 7, 4


def _pixels(i: int) -> np.ndarray:
    """Example i's image: its class colour, height 8 + i so every image differs."""
    img = np.zeros((8 + i, 10, 3), np.uint8)
    img[:] = COLORS[i % 3]
    return img


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tfds")

    class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Shapes with a class label, a caption and a list of captions (the last train caption empty)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                        "label": tfds.features.ClassLabel(names=NAMES),
                        "caption": tfds.features.Text(),
                        "captions": tfds.features.Sequence(tfds.features.Text()),
                    }
                ),
            )

        def _split_generators(self, dl_manager: Any) -> dict:
            return {"train": self._generate_examples(0, N_TRAIN), "test": self._generate_examples(N_TRAIN, N_TEST)}

        def _generate_examples(self, start: int, n: int) -> Any:
            for i in range(start, start + n):
                caption = "" if i == N_TRAIN - 1 else f"a {NAMES[i % 3].replace('_', ' ')} number {i}"
                yield i, {
                    "image": io.BytesIO(_png(_pixels(i))),
                    "label": i % 3,
                    "caption": caption,
                    "captions": [f"first {i}", f"second {i}"],
                }

    TinyShapes(data_dir=str(root)).download_and_prepare(file_format="array_record")
    return root


@pytest.fixture(scope="module")
def decoded(data_dir: Path) -> dict[str, Any]:
    """What plain TFDS decodes, split by split, to compare the records against (TFDS shuffles rows)."""
    return {s: tfds.data_source("tiny_shapes", data_dir=str(data_dir), split=s) for s in ("train", "test")}


def test_classification_pairs(data_dir: Path, decoded: dict[str, Any], tmp_path: Path) -> None:
    ts = read_tfds_train("tiny_shapes", ImageClassification(), data_dir=data_dir, cache_dir=tmp_path)
    assert ts.names == ("tiny_shapes",) and len(ts) == N_TRAIN
    for pair in ts:
        example = decoded["train"][pair.row]
        assert pair.query.text == CLASSIFICATION_QUERY
        assert pair.positive == Side(CLASS_LABEL_PROMPT + NAMES[example["label"]])
        assert pair.query.image.startswith(str(tmp_path)) and os.path.isfile(pair.query.image)
        np.testing.assert_array_equal(np.asarray(load_image(pair.query.image)), example["image"])

    mtime = os.path.getmtime(ts[0].query.image)
    again = read_tfds_train(
        "tiny_shapes", ImageClassification(label_names=("R", "G", "B")), data_dir=data_dir, cache_dir=tmp_path,
        max_rows=3, positive_prompts=False, dataset_name="shapes",
    )
    assert os.path.getmtime(again[0].query.image) == mtime  # the cached image is not rewritten
    assert [p.dataset for p in again] == ["shapes"] * 3
    assert [p.positive.text for p in again] == ["RGB"[decoded["train"][r]["label"]] for r in range(3)]


def test_classification_eval_ranks_every_class_gold_first(
    data_dir: Path, decoded: dict[str, Any], tmp_path: Path
) -> None:
    queries = read_tfds_eval("tiny_shapes", ImageClassification(), data_dir=data_dir, cache_dir=tmp_path)
    assert [q.row for q in queries] == list(range(N_TEST))
    for q in queries:
        gold = decoded["test"][q.row]["label"]
        assert q.candidates[0] == Side(CLASS_LABEL_PROMPT + NAMES[gold])
        assert sorted(c.text for c in q.candidates) == sorted(CLASS_LABEL_PROMPT + n for n in NAMES)
        np.testing.assert_array_equal(np.asarray(load_image(q.query.image)), decoded["test"][q.row]["image"])


def test_caption_pairs_both_directions(data_dir: Path, decoded: dict[str, Any], tmp_path: Path) -> None:
    t2i = read_tfds_train("tiny_shapes", ImageCaption(), data_dir=data_dir, cache_dir=tmp_path, split="test")
    assert t2i.names == ("tiny_shapes_t2i",)
    pair = t2i[0]
    caption = decoded["test"][0]["caption"].decode()
    assert pair.query == Side(f"Find me an everyday image that matches the given caption: {caption}")
    assert pair.positive.text == T2I_TARGET and os.path.isfile(pair.positive.image)

    i2t = read_tfds_train(
        "tiny_shapes", ImageCaption(caption_key="captions", direction="i2t"), data_dir=data_dir, cache_dir=tmp_path,
        split="test",
    )
    assert i2t.names == ("tiny_shapes_i2t",)
    first, second = (c.decode() for c in decoded["test"][0]["captions"])
    assert first.startswith("first") and second.startswith("second")
    assert i2t[0].query == Side(I2T_QUERY, pair.positive.image)
    assert i2t[0].positive == Side(IMAGE_CAPTION_PROMPT + first)  # the first of a caption sequence


def test_empty_captions_follow_the_bad_data_policy(data_dir: Path, tmp_path: Path) -> None:
    ts = read_tfds_train("tiny_shapes", ImageCaption(direction="i2t"), data_dir=data_dir, cache_dir=tmp_path)
    assert len(ts) == N_TRAIN - 1
    assert ts.report.metrics() == {"data/skipped/tiny_shapes_i2t/empty_side": 1}
    with pytest.raises(BadDataError, match=r"tiny_shapes_i2t row \d+, column 'caption': neither text nor image"):
        read_tfds_train(
            "tiny_shapes", ImageCaption(direction="i2t"), data_dir=data_dir, cache_dir=tmp_path, bad_data="error"
        )


def test_query_text_must_hold_one_image_placeholder(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one <\\|image_pad\\|>"):
        read_tfds_eval(
            "tiny_shapes", ImageClassification(query_text="Classify this."), data_dir=data_dir, cache_dir=tmp_path
        )
