"""What happens to a bad row: stop with a message that says where and what to do, or skip and count.

Evaluation defaults to "error": a skipped query changes the benchmark, so it must be a decision.
Training defaults to "skip": one missing image among millions should not end a run, but every
skip is counted per dataset and reason, and the counts reach the metrics as
`data/skipped/<dataset>/<reason>` so a silently shrinking dataset shows up.

Bad rows: a missing image file, an image that does not decode, a side with neither text nor image,
and a side with more image placeholders than images (the tokenizer would refuse it later, mid-run).
Readers check the cheap ones (existence, emptiness, placeholders); decoding happens in the
pipeline, which calls `BadDataHandler.load_image`. A missing column is a broken file, not a bad
row: it is always an error, whatever the policy.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

from PIL import Image

from vlm2vec_jax.data.prompts import count_image_placeholders
from vlm2vec_jax.data.records import Side
from vlm2vec_jax.processing.image import ImageError, load_image

__all__ = [
    "CORRUPT_IMAGE",
    "EMPTY_SIDE",
    "MISSING_IMAGE",
    "PLACEHOLDER_MISMATCH",
    "BadDataError",
    "BadDataHandler",
    "BadDataPolicy",
    "BadDataReport",
    "require_columns",
]

BadDataPolicy = Literal["error", "skip"]

MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
EMPTY_SIDE = "empty_side"
PLACEHOLDER_MISMATCH = "placeholder_mismatch"

_METRIC_PREFIX = "data/skipped"


class BadDataError(ValueError):
    """A bad row under the "error" policy, or a file that lacks a column."""


def require_columns(file: str | os.PathLike, required: Iterable[str], found: Iterable[str]) -> None:
    """Raise `BadDataError` naming the file, the missing columns and the columns it has."""
    found = list(found)
    missing = [c for c in required if c not in found]
    if missing:
        raise BadDataError(
            f"{os.fspath(file)}: missing column(s) {missing}; columns found: {found}. "
            "Is this file in the expected layout (MMEB-train: qry, qry_image_path, pos_text, pos_image_path; "
            "MMEB-eval: qry_text, qry_img_path, tgt_text, tgt_img_path)?"
        )


@dataclass
class BadDataReport:
    """Skipped rows per (dataset, reason). Reports from workers or hosts merge by addition."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, dataset: str, reason: str, n: int = 1) -> None:
        """Count `n` skipped rows."""
        self.counts[(dataset, reason)] += n

    def merge(self, other: BadDataReport) -> BadDataReport:
        """Add `other`'s counts into this report; returns self."""
        self.counts.update(other.counts)
        return self

    @property
    def total(self) -> int:
        """All skipped rows."""
        return sum(self.counts.values())

    def metrics(self) -> dict[str, int]:
        """`{"data/skipped/<dataset>/<reason>": n}`, sorted, for the metrics writers."""
        return {f"{_METRIC_PREFIX}/{d}/{r}": n for (d, r), n in sorted(self.counts.items())}

    @classmethod
    def from_metrics(cls, metrics: dict[str, int]) -> BadDataReport:
        """The report `metrics()` describes (how a resumed run gets its counts back from a checkpoint)."""
        report = cls()
        for key, n in metrics.items():
            dataset, reason = key.removeprefix(f"{_METRIC_PREFIX}/").rsplit("/", 1)
            report.add(dataset, reason, int(n))
        return report


class BadDataHandler:
    """Applies one policy to bad rows and keeps the report of what it skipped."""

    def __init__(self, policy: BadDataPolicy = "error", report: BadDataReport | None = None) -> None:
        if policy not in get_args(BadDataPolicy):
            raise ValueError(f"bad_data policy must be one of {list(get_args(BadDataPolicy))}, got {policy!r}")
        self.policy = policy
        self.report = report if report is not None else BadDataReport()
        self._existing: set[str] = set()  # image paths already found, so shared images are checked once

    def reject(
        self, dataset: str, row: int, column: str, reason: str, problem: str, cause: BaseException | None = None
    ) -> None:
        """Raise (policy "error") or count (policy "skip") one bad row; the caller drops the row."""
        if self.policy == "skip":
            self.report.add(dataset, reason)
            return
        raise BadDataError(
            f"{dataset} row {row}, column {column!r}: {problem}. Fix or remove the row, or pass "
            f"bad_data='skip' to skip such rows (counted as {_METRIC_PREFIX}/{dataset}/{reason})"
        ) from cause

    def check_side(
        self,
        side: Side,
        *,
        dataset: str,
        row: int,
        text_column: str,
        image_column: str,
        check_images: bool = True,
    ) -> bool:
        """True when `side` (text before any prompt, image path resolved) is usable; else `reject`
        and False. Checks: not empty, no placeholder without an image (an image without one is
        fine: the Embedder's rule prepends it), and (optionally) that the image file exists."""
        if not side.text.strip() and side.image is None:
            problem = f"neither text nor image ({image_column!r} is empty too)"
            self.reject(dataset, row, text_column, EMPTY_SIDE, problem)
            return False
        placeholders, images = count_image_placeholders(side.text), int(side.image is not None)
        if placeholders > images:
            self.reject(
                dataset,
                row,
                text_column,
                PLACEHOLDER_MISMATCH,
                f"the text has {placeholders} image placeholder(s) but {image_column!r} gives {images} image(s) "
                f"({side.image or 'no path'}); the tokenizer needs an image for every placeholder",
            )
            return False
        if check_images and side.image is not None and side.image not in self._existing:
            if not os.path.exists(side.image):
                self.reject(dataset, row, image_column, MISSING_IMAGE, _missing_image_problem(side.image))
                return False
            self._existing.add(side.image)
        return True

    def load_image(self, path: str, *, dataset: str, row: int, column: str) -> Image.Image | None:
        """Decode `path` for the pipeline; None when the policy skips a missing or corrupt image."""
        try:
            return load_image(path)
        except ImageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                reason, problem = MISSING_IMAGE, _missing_image_problem(path)
            else:
                reason, problem = CORRUPT_IMAGE, f"cannot decode image file {path} ({e.__cause__ or e}); re-download it"
            self.reject(dataset, row, column, reason, problem, cause=e)
            return None


def _missing_image_problem(path: str) -> str:
    return (
        f"image file not found: {path}; image paths in the data are relative to image_root: check it "
        "points at the folder holding the images, or fetch the missing ones"
    )
