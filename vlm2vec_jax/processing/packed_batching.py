"""Packed inference batches: several sequences per text row, so a batch costs what its tokens cost.

`Batcher` gives every sequence a row of the batch's longest length; on MMEB-shaped streams (short
captions and labels beside image queries of hundreds of tokens) most of those slots are padding
even after length sorting. `PackedBatcher` lays the same sequences out first-fit in decreasing
length into text rows of one bucketed length:

- each sequence is a segment of its row (ids 1, 2, ... in ``attention_mask``, 0 = padding) with
  its own M-RoPE positions, so the decoder attends causally within a segment only
  (`models/attention.py`);
- ``pool_positions`` int32 (rows, Q): the column of each segment's last token, Q slots per row
  (empty slots name column 0, their vectors are dropped); `VisionLanguageModel.embed` returns (rows * Q, D);
- images are packed whole into vision rows by the `Batcher` (first-fit, largest first, told apart
  by ``patch_segment_ids``), and ``image_token_index`` still points at their merged tokens. The
  vision rows follow the images a batch holds; only the text budget bounds them, so a packed
  batch, holding more items than an unpacked one, may have several times its vision rows.

The packed batch is the text side of a right-padded `Batcher` batch moved into segments: the
tokens, positions, image indices and vision arrays are that batch's own, which is why a packed
vector equals a padded one (and why nothing here depends on the pixel dtype).

Shapes: the row length is the bucket (`BucketSpec.text_lengths`) of the longest sequence, and at
least `min_length`, so short sequences share rows; rows and Q are powers of two (rows a multiple of
`rows_multiple`, at most `max_rows`); vision rows and patches per row are the `Batcher`'s buckets.
`groups` cuts a length-sorted stream into batches of at most `max_rows` rows, each as many rows as
its sequences fill (no padding rows beyond the last one's): the token budget of a batch is its
rows x its row length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from vlm2vec_jax.batch import VISION_KEYS
from vlm2vec_jax.processing.batching import Batcher, Example, pick_bucket

__all__ = ["PackedBatch", "PackedBatcher", "first_fit"]


class PackedBatch(NamedTuple):
    """A packed batch and, for each of its examples (in the order given), the index of its vector
    in the model's (rows * Q, D) output."""

    inputs: dict[str, np.ndarray]  # `ModelInputs` plus pool_positions
    slots: np.ndarray


def first_fit(sizes: Sequence[int], capacity: int, max_rows: int | None = None) -> np.ndarray:
    """The row of each size, first fit in the order given (rows of `capacity`, opened as needed);
    -1 for a size that fits none of `max_rows` rows."""
    fill: list[int] = []
    rows = np.full(len(sizes), -1, np.int64)
    for k, size in enumerate(sizes):
        row = next((i for i, used in enumerate(fill) if used + size <= capacity), len(fill))
        if row == len(fill):
            if max_rows is not None and row == max_rows:
                continue
            fill.append(0)
        fill[row] += size
        rows[k] = row
    return rows


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class PackedBatcher:
    """Builds packed `ModelInputs` (module docstring) with a right-padded `batcher`'s layout."""

    batcher: Batcher
    max_rows: int
    # Rows at least this long, so short sequences share them: on the dense attention path a longer
    # row costs attention (L^2) while every token saves its padding in the matmuls.
    min_length: int = 256
    # Text rows are a multiple of this: the device count of a data-parallel mesh, so rows split.
    rows_multiple: int = 1

    def __post_init__(self) -> None:
        if self.batcher.padding_side != "right" or self.batcher.buckets.batch_size is not None:
            raise ValueError("PackedBatcher needs a right-padded Batcher without a fixed batch size")
        if self.max_rows < 1 or self.max_rows % self.rows_multiple:
            raise ValueError(f"max_rows {self.max_rows} must be a positive multiple of rows_multiple {self.rows_multiple}")

    def row_length(self, longest: int) -> int:
        """The bucketed row length of a batch whose longest sequence has `longest` tokens."""
        buckets = self.batcher.buckets.text_lengths
        return pick_bucket(max(longest, min(self.min_length, buckets[-1])), buckets, "sequence length")

    def groups(self, lengths: Sequence[int]) -> Iterator[np.ndarray]:
        """Indices of the sequences of each batch, first-fit decreasing: a batch opens with the
        longest sequence left and takes every later one that fits its rows, as many rows as the
        largest row count a batch is built with (`row_counts`) that the sequences fill; the
        sequences of any rows past that wait for the next batch. Rows are then never padding:
        10 filled rows become a batch of 8 and the rest, re-packed with later sequences (and rows
        as long as their own longest), rather than a batch of 16 rows of which 6 are empty."""
        lengths = np.asarray(lengths)
        counts = self.row_counts()
        left = np.argsort(-lengths, kind="stable")
        while left.size:
            rows = first_fit(lengths[left], self.row_length(int(lengths[left[0]])), self.max_rows)
            used = int(rows.max()) + 1
            keep = max([n for n in counts if n <= used], default=counts[0])
            taken = (rows >= 0) & (rows < keep)
            yield left[taken]
            left = left[~taken]

    def row_counts(self) -> list[int]:
        """The text row counts batches are built with (powers of two, rounded up to a multiple of
        `rows_multiple`, at most `max_rows`), smallest first."""
        m = self.rows_multiple
        return sorted({min(self.max_rows, -(-_power_of_two(r) // m) * m) for r in range(1, self.max_rows + 1)})

    def __call__(self, examples: Sequence[Example]) -> PackedBatch:
        """Pack `examples` (any order; placed longest first) into one batch."""
        # The Batcher packs images first-fit in the order given: largest first packs them tighter.
        by_patches = np.argsort([-sum(img.patches.shape[0] for img in e.images) for e in examples], kind="stable")
        padded = self.batcher([examples[k] for k in by_patches])
        lengths = padded["attention_mask"].sum(axis=1)
        length = self.row_length(int(lengths.max()))
        order = np.argsort(-lengths, kind="stable")
        placed = first_fit(lengths[order], length)
        if placed.max() >= self.max_rows:
            raise ValueError(f"{len(examples)} sequences need {placed.max() + 1} rows of {length} tokens, over {self.max_rows}")
        row = np.empty_like(placed)
        row[order] = placed
        rows = next(n for n in self.row_counts() if n > row.max())
        segment, start = np.zeros(len(row), np.int64), np.zeros(len(row), np.int64)  # 0-based segment, first column
        count, fill = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
        for k in order:
            segment[k], start[k] = count[row[k]], fill[row[k]]
            count[row[k]] += 1
            fill[row[k]] += lengths[k]
        slots_per_row = _power_of_two(int(count.max()))

        inputs = {
            "input_ids": np.full((rows, length), self.batcher.pad_token_id, np.int32),
            "attention_mask": np.zeros((rows, length), np.int32),
            "position_ids": np.zeros((3, rows, length), np.int32),
            "image_token_index": np.full((rows, length), -1, np.int32),
            "pool_positions": np.zeros((rows, slots_per_row), np.int32),
            **{key: padded[key] for key in VISION_KEYS},
        }
        for k, n in enumerate(lengths):
            cols = slice(start[k], start[k] + n)
            inputs["input_ids"][row[k], cols] = padded["input_ids"][k, :n]
            inputs["image_token_index"][row[k], cols] = padded["image_token_index"][k, :n]
            inputs["attention_mask"][row[k], cols] = segment[k] + 1
            inputs["position_ids"][:, row[k], cols] = padded["position_ids"][:, k, :n]
            inputs["pool_positions"][row[k], segment[k]] = start[k] + n - 1
        slots = np.empty(len(row), np.int64)
        slots[by_patches] = row * slots_per_row + segment
        return PackedBatch(inputs, slots)
