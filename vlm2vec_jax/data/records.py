"""The record schema every data source produces (MMEB parquet, TFDS, the synthetic benchmark).

A side is what the embedder encodes: prompt text (placeholders as `<|image_pad|>`) and an optional
image path already resolved against the image root. Readers never open images: decoding happens in
the pipeline workers, where a bad image is handled by the bad-data policy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Side:
    """One query or target: text (may be empty when there is an image) and an absolute image path."""

    text: str
    image: str | None = None


@dataclass(frozen=True, slots=True)
class TrainPair:
    """One training row: a query, its positive target, and optional explicit hard negatives.
    `row` is the row's index in its dataset (stable across runs, used by B3 batch files)."""

    dataset: str
    row: int
    query: Side
    positive: Side
    negatives: tuple[Side, ...] = ()


@dataclass(frozen=True, slots=True)
class EvalQuery:
    """One evaluation row: a query ranked against its own candidates; the ground truth is candidate 0."""

    dataset: str
    row: int
    query: Side
    candidates: tuple[Side, ...]
