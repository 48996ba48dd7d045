"""Vectors of a side table: from the embedding cache where it has them, else encoded data-parallel.

This is also where bad images surface during evaluation. A missing file is found before anything
is encoded (every image is stat-ed: its cache key needs the size and mtime anyway). A file that
does not decode fails inside the encoder, which knows only an item index; the images of the
failed call are then decoded in order until the culprit is found, and the error names dataset,
row, column and path (as `data.bad_data` messages do). Evaluation never skips such a side: a
skipped query changes the benchmark (the MMEB reader's `bad_data="skip"` drops rows with missing
images before they get here, and says how many).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlm2vec_jax.data.bad_data import BadDataError
from vlm2vec_jax.data.records import Side
from vlm2vec_jax.embedder import Embedder, Item
from vlm2vec_jax.evaluation.cache import EmbeddingCache, ImageStamp, item_key
from vlm2vec_jax.evaluation.parallel import DataParallelEmbedder
from vlm2vec_jax.evaluation.sides import SideTable
from vlm2vec_jax.models.pooling import check_matryoshka_dim, truncate_and_normalize
from vlm2vec_jax.processing.image import ImageError, load_image

__all__ = ["SideEncoder", "side_item"]


def side_item(side: Side) -> Item:
    """The Embedder item of a side (the Embedder puts the image placeholder first when missing)."""
    return {"text": side.text, "image": side.image} if side.image is not None else side.text


class SideEncoder:
    """Encodes side tables with one model: cached vectors reused, the rest encoded over all devices.

    `cache_dir`: root of the embedding cache (None: no cache). With several processes the cache
    directory must be shared by every host (only process 0 writes it) so they agree on what to encode.
    `dim`: score Matryoshka prefixes of that width (renormalised); the cache keeps full-width
    vectors, so every width reuses one encoding.
    """

    def __init__(
        self, embedder: Embedder, *, batch_size: int, cache_dir: str | os.PathLike | None = None,
        show_progress: bool = True, dim: int | None = None,
    ) -> None:
        check_matryoshka_dim(dim, embedder.dim)
        self.dim = dim
        self.embedder = DataParallelEmbedder(embedder)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.cache = EmbeddingCache.for_embedder(cache_dir, embedder) if cache_dir is not None else None

    def __call__(self, table: SideTable, dataset: str) -> tuple[np.ndarray, int]:
        """((len(table), D or dim) float32 vectors in table order, number of sides the model encoded)."""
        stamps = [_image_stamp(table, i, dataset) for i in range(len(table))]
        vectors = np.empty((len(table), self.embedder.dim), np.float32)
        keys, found = [], np.zeros(len(table), bool)
        if self.cache is not None:
            keys = [item_key(side, stamp) for side, stamp in zip(table.sides, stamps)]
            found = self.cache.lookup(keys, vectors)
        todo = np.flatnonzero(~found)
        _require_same_on_every_host(len(todo), dataset)
        if todo.size:
            items = [side_item(table.sides[i]) for i in todo]
            try:
                vectors[todo] = self.embedder.encode(
                    items, batch_size=self.batch_size, show_progress=self.show_progress
                )
            except ValueError as err:
                _raise_bad_image(table, todo, dataset, err)
                err.add_note(f"while encoding the sides of {dataset}")
                raise
            if self.cache is not None and jax.process_index() == 0:
                self.cache.put([keys[i] for i in todo], vectors[todo])
        if self.dim is not None:
            vectors = np.asarray(truncate_and_normalize(vectors, self.dim))
        return vectors, int(todo.size)


def _where(table: SideTable, index: int, dataset: str) -> str:
    use = table.first_use[index]
    return f"{dataset} row {use.row}, column {use.column!r}"


def _image_stamp(table: SideTable, index: int, dataset: str) -> ImageStamp | None:
    path = table.sides[index].image
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError as e:
        raise BadDataError(
            f"{_where(table, index, dataset)}: image file not found: {path} ({e.strerror}); image paths are "
            "relative to the image root: check it points at the folder holding the images"
        ) from None
    return stat.st_size, stat.st_mtime_ns


def _raise_bad_image(table: SideTable, indices: np.ndarray, dataset: str, err: ValueError) -> None:
    """Raise a BadDataError naming the first image among `indices` that does not load, if any."""
    for i in indices:
        path = table.sides[i].image
        if path is None:
            continue
        try:
            load_image(path).close()
        except ImageError as bad:
            raise BadDataError(
                f"{_where(table, i, dataset)}: cannot decode image file {path} ({bad.__cause__ or bad}); "
                "re-download it or remove the row"
            ) from err


def _require_same_on_every_host(count: int, dataset: str) -> None:
    """Every host must encode the same items (the encode ends in a collective gather)."""
    if jax.process_count() == 1:
        return
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([count])))
    if np.any(counts != counts.flat[0]):
        raise ValueError(
            f"{dataset}: hosts disagree on how many sides to encode ({counts.ravel().tolist()}): the embedding "
            "cache directory must be one directory shared by every host, or no cache be used"
        )
