"""TFDS datasets prepared on disk -> the same `TrainPair` / `EvalQuery` records as MMEB.

Reading goes through `tfds.data_source(..., download=False)` on array_record files: no TensorFlow
and no network. Small adapters say what a dataset's features mean: `ImageClassification` (an image
and a ClassLabel: the class names are the targets) and `ImageCaption` (an image and a caption:
retrieval pairs in either direction).

Images: `Side.image` is a path, so each image is written once, as the encoded bytes TFDS stored
(`SkipDecoding`: no decode, no re-encode), to `<cache_dir>/<name>/<version>/<split>/<row>.<ext>`.
Everything downstream (the pipeline's decoding and bad-data handling, evaluation's dedupe by
(text, image), B3 mining over rows) then works on TFDS data unchanged, and records stay small
and cheap to send to data workers. The cost is one pass and a copy of the images on disk; a file
already there with the same size is not rewritten.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vlm2vec_jax.data.bad_data import BadDataHandler, BadDataPolicy
from vlm2vec_jax.data.mmeb_train import TrainSet
from vlm2vec_jax.data.prompts import (
    CLASS_LABEL_PROMPT,
    IMAGE_CAPTION_PROMPT,
    IMAGE_TOKEN,
    count_image_placeholders,
    with_prompt,
)
from vlm2vec_jax.data.records import EvalQuery, Side, TrainPair

__all__ = [
    "CLASSIFICATION_QUERY",
    "I2T_QUERY",
    "T2I_QUERY",
    "T2I_TARGET",
    "ImageCaption",
    "ImageClassification",
    "read_tfds_eval",
    "read_tfds_train",
]

# MMEB's instructions for the matching tasks (ImageNet-1K, MSCOCO_t2i, MSCOCO_i2t), backbone tokens.
CLASSIFICATION_QUERY = f"{IMAGE_TOKEN}\nRepresent the given image for classification"
T2I_QUERY = "Find me an everyday image that matches the given caption: {caption}"
T2I_TARGET = f"{IMAGE_TOKEN}\nRepresent the given image."
I2T_QUERY = f"{IMAGE_TOKEN}\nFind an image caption describing the given everyday image."


@dataclass(frozen=True)
class ImageClassification:
    """Features `image_key` (Image) and `label_key` (ClassLabel). Query: the image with
    `query_text`; target: the class name (`label_names` overrides TFDS's, e.g. WordNet ids)."""

    image_key: str = "image"
    label_key: str = "label"
    query_text: str = CLASSIFICATION_QUERY
    label_names: tuple[str, ...] | None = None

    @property
    def text_key(self) -> str:
        """The feature the target text comes from (named in bad-data messages)."""
        return self.label_key

    @property
    def positive_prompt(self) -> str:
        """B3's classification prompt."""
        return CLASS_LABEL_PROMPT

    def default_name(self, info: Any) -> str:
        """Dataset name for the records: the TFDS name."""
        return info.name

    def class_names(self, info: Any) -> list[str]:
        """Target texts by label id."""
        names = list(self.label_names or info.features[self.label_key].names)
        if not all(n.strip() for n in names):
            raise ValueError(f"{info.name}: empty class name in {names}; pass label_names")
        return names

    def pair_maker(self, info: Any) -> Callable[[Mapping[str, Any], str], tuple[Side, Side]]:
        """(example, image path) -> (query, target), for this dataset's classes."""
        _check_query_template(self.query_text)
        names = self.class_names(info)
        return lambda example, image: (Side(self.query_text, image), Side(names[example[self.label_key]]))


@dataclass(frozen=True)
class ImageCaption:
    """Features `image_key` (Image) and `caption_key` (Text, or a sequence of them: the first is
    used; "/" walks nested features, e.g. "captions/text"). "t2i": caption -> image, "i2t": image ->
    caption (with B3's caption prompt on the target, as MSCOCO_i2t)."""

    image_key: str = "image"
    caption_key: str = "caption"
    direction: Literal["t2i", "i2t"] = "t2i"

    @property
    def text_key(self) -> str:
        """The feature the caption comes from (named in bad-data messages)."""
        return self.caption_key

    @property
    def positive_prompt(self) -> str:
        """B3 prompts caption targets (i2t) only."""
        return IMAGE_CAPTION_PROMPT if self.direction == "i2t" else ""

    def default_name(self, info: Any) -> str:
        """Dataset name for the records: TFDS name plus direction, as MSCOCO_t2i / MSCOCO_i2t."""
        return f"{info.name}_{self.direction}"

    def caption(self, example: Mapping[str, Any]) -> str:
        """The example's (first) caption as str."""
        value: Any = example
        for part in self.caption_key.split("/"):
            value = value[part]
        if not isinstance(value, (str, bytes)):
            value = value[0] if len(value) else ""
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def pair_maker(self, info: Any) -> Callable[[Mapping[str, Any], str], tuple[Side, Side]]:
        """(example, image path) -> (query, target) in this adapter's direction."""
        if self.direction == "t2i":
            return lambda example, image: (
                Side(T2I_QUERY.format(caption=self.caption(example))),
                Side(T2I_TARGET, image),
            )
        return lambda example, image: (Side(I2T_QUERY, image), Side(self.caption(example)))


def _check_query_template(text: str) -> None:
    if count_image_placeholders(text) != 1:
        raise ValueError(f"the image query text must hold exactly one {IMAGE_TOKEN}, got {text!r}")


class _PreparedSplit:
    """A prepared TFDS split read without decoding images; each image written once to the cache."""

    _FORMATS = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"))

    def __init__(
        self,
        name: str,
        data_dir: str | os.PathLike,
        split: str,
        image_key: str,
        cache_dir: str | os.PathLike,
        max_rows: int | None,
    ) -> None:
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError(
                "reading TFDS datasets needs `pip install tensorflow-datasets` (TensorFlow itself is not needed)"
            ) from e
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.source = tfds.data_source(
            name,
            data_dir=os.fspath(data_dir),
            split=split,
            download=False,  # never the network: the dataset must be prepared already
            decoders={image_key: tfds.decode.SkipDecoding()},
        )
        self.info = self.source.dataset_info
        self.image_key = image_key
        self.num_rows = len(self.source) if max_rows is None else min(max_rows, len(self.source))
        safe_split = re.sub(r"[^\w.-]+", "_", split)
        cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.folder = os.path.join(cache_dir, self.info.name, str(self.info.version), safe_split)
        os.makedirs(self.folder, exist_ok=True)

    def __iter__(self) -> Iterator[tuple[int, Mapping[str, Any], str]]:
        """(row, example, image path) for the first `num_rows` rows in split order."""
        for row in range(self.num_rows):
            example = self.source[row]
            yield row, example, self._write_image(row, example[self.image_key])

    def _write_image(self, row: int, data: bytes) -> str:
        ext = next((e for magic, e in self._FORMATS if data.startswith(magic)), ".img")
        path = os.path.join(self.folder, f"{row:08d}{ext}")
        if not (os.path.exists(path) and os.path.getsize(path) == len(data)):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        return path


def read_tfds_train(
    name: str,
    adapter: ImageClassification | ImageCaption,
    *,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    split: str = "train",
    max_rows: int | None = None,
    positive_prompts: bool = True,
    bad_data: BadDataPolicy = "skip",
    dataset_name: str | None = None,
) -> TrainSet:
    """Training pairs of a prepared TFDS split as a one-subset `TrainSet` named `dataset_name`
    (default: the adapter's), rows in split order; `max_rows`: the first N rows."""
    prepared = _PreparedSplit(name, data_dir, split, adapter.image_key, cache_dir, max_rows)
    make_pair = adapter.pair_maker(prepared.info)
    prompt = adapter.positive_prompt if positive_prompts else ""
    dataset = dataset_name or adapter.default_name(prepared.info)
    handler = BadDataHandler(bad_data)
    pairs = []
    for row, example, image in prepared:
        query, target = make_pair(example, image)
        if handler.check_side(
            target, dataset=dataset, row=row, text_column=adapter.text_key, image_column=adapter.image_key,
            check_images=False,
        ):
            pairs.append(TrainPair(dataset, row, query, with_prompt(target, prompt)))
    return TrainSet({dataset: pairs}, handler.report)


def read_tfds_eval(
    name: str,
    adapter: ImageClassification,
    *,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    split: str = "test",
    max_rows: int | None = None,
    positive_prompts: bool = True,
    dataset_name: str | None = None,
) -> list[EvalQuery]:
    """Classification queries of a prepared TFDS split, as MMEB builds them: each image ranked
    against every class name, the true class first (candidate 0), the others in label order."""
    prepared = _PreparedSplit(name, data_dir, split, adapter.image_key, cache_dir, max_rows)
    make_pair = adapter.pair_maker(prepared.info)
    prompt = adapter.positive_prompt if positive_prompts else ""
    dataset = dataset_name or adapter.default_name(prepared.info)
    labels = [with_prompt(Side(n), prompt) for n in adapter.class_names(prepared.info)]
    queries = []
    for row, example, image in prepared:
        query, _ = make_pair(example, image)
        gold = int(example[adapter.label_key])
        queries.append(EvalQuery(dataset, row, query, (labels[gold], *labels[:gold], *labels[gold + 1 :])))
    return queries
