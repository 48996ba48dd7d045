"""MMEB-train reader: parquet subsets on disk -> a `TrainSet` of `TrainPair` records.

Layout (as the hub ships it): `<root>/<Subset>/<split>-*.parquet`, or `<root>/<Subset>/<split>/*.parquet`,
split "original" or "diverse_instruction". Columns `qry`, `qry_image_path`, `pos_text`,
`pos_image_path`, optionally `neg_text`, `neg_image_path` (a string, or a list in B3's mined files).
Image paths are relative to an image root; "" means no image.

Global order, which B3 batch files index: subsets in the order given ("all": folder names sorted),
within a subset files sorted by name and rows in file order, minus skipped rows. `TrainPair.row`
is the row's index in its subset's file order (stable whatever is skipped); `TrainSet.locate` and
`TrainSet.index_of` convert between the two, and `TrainSet.fingerprint` identifies the order so a
batch file mined on a different read can be refused.

The per-subset cap takes the first N file rows before skipping, as VLM2Vec's `split[:N]` does.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import pyarrow.parquet as pq

from vlm2vec_jax.data.bad_data import BadDataError, BadDataHandler, BadDataPolicy, BadDataReport, require_columns
from vlm2vec_jax.data.prompts import positive_prompt, to_backbone_text, with_prompt
from vlm2vec_jax.data.records import Side, TrainPair
from vlm2vec_jax.data.registry import train_subset_info

__all__ = [
    "SideReader",
    "TrainSet",
    "datasets_with_split",
    "find_split_files",
    "read_mmeb_train",
    "read_parquet_columns",
    "require_split_files",
    "select_datasets",
]

_QUERY = ("qry", "qry_image_path")
_POSITIVE = ("pos_text", "pos_image_path")
_NEGATIVE = ("neg_text", "neg_image_path")


class TrainSet(Sequence[TrainPair]):
    """Training pairs of several subsets in one global order (see the module docstring)."""

    def __init__(self, subsets: Mapping[str, Sequence[TrainPair]], report: BadDataReport | None = None) -> None:
        """`subsets`: name -> pairs in row order (rows strictly increasing); `report`: what was skipped."""
        self.names = tuple(subsets)
        self.report = report if report is not None else BadDataReport()
        self._pairs: list[TrainPair] = []
        self._rows: dict[str, np.ndarray] = {}
        offsets = [0]
        for name, pairs in subsets.items():
            rows = np.fromiter((p.row for p in pairs), dtype=np.int64, count=len(pairs))
            if np.any(np.diff(rows) <= 0):
                raise ValueError(f"subset {name!r}: rows must be strictly increasing (file order)")
            self._rows[name] = rows
            self._pairs.extend(pairs)
            offsets.append(len(self._pairs))
        self.offsets = tuple(offsets)

    def __len__(self) -> int:
        return len(self._pairs)

    @overload
    def __getitem__(self, index: int) -> TrainPair: ...
    @overload
    def __getitem__(self, index: slice) -> list[TrainPair]: ...
    def __getitem__(self, index: int | slice) -> TrainPair | list[TrainPair]:
        return self._pairs[index]

    def __iter__(self) -> Iterator[TrainPair]:
        return iter(self._pairs)

    def subset_range(self, name: str) -> range:
        """Global indices of subset `name`."""
        i = self._subset_position(name)
        return range(self.offsets[i], self.offsets[i + 1])

    def locate(self, index: int) -> tuple[str, int]:
        """Global index -> (subset, row in the subset's file order)."""
        if not 0 <= index < len(self):
            raise IndexError(f"global index {index} out of range for {len(self)} pairs")
        i = bisect.bisect_right(self.offsets, index) - 1
        return self.names[i], self._pairs[index].row

    def index_of(self, subset: str, row: int) -> int:
        """(subset, file row) -> global index; KeyError when that row was skipped or capped."""
        i = self._subset_position(subset)
        rows = self._rows[subset]
        j = int(np.searchsorted(rows, row))
        if j == rows.size or rows[j] != row:
            raise KeyError(f"{subset} row {row} is not in this TrainSet (skipped as bad data, or past the cap)")
        return self.offsets[i] + j

    @property
    def fingerprint(self) -> str:
        """Hash of the global order (subset names and rows): equal iff indices mean the same pairs."""
        h = hashlib.sha256()
        for name in self.names:
            h.update(name.encode() + b"\0")
            h.update(self._rows[name].tobytes() + b"\0")
        return h.hexdigest()[:16]

    def _subset_position(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no subset {name!r} in this TrainSet; it has {list(self.names)}") from None


def find_split_files(root: str | os.PathLike, dataset: str, split: str) -> list[str]:
    """The parquet files of one split of one dataset folder, sorted; [] when there are none."""
    folder = os.path.join(os.fspath(root), dataset)
    flat = sorted(glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(split)}-*.parquet")))
    nested = sorted(glob.glob(os.path.join(glob.escape(folder), glob.escape(split), "*.parquet")))
    if flat and nested:
        raise ValueError(
            f"{folder} holds split {split!r} twice ({split}-*.parquet and {split}/*.parquet); keep one layout"
        )
    return flat or nested


def datasets_with_split(root: str | os.PathLike, split: str) -> list[str]:
    """Folder names under `root` that hold parquet files of `split`, sorted."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root} does not exist")
    return sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and find_split_files(root, d, split)
    )


def select_datasets(root: str, split: str, names: Sequence[str] | Literal["all"]) -> list[str]:
    """`names` as a list ("all": every folder holding `split` files, sorted); duplicates are an error."""
    chosen = datasets_with_split(root, split) if names == "all" else list(names)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"datasets listed twice: {sorted(n for n in set(chosen) if chosen.count(n) > 1)}")
    return chosen


def require_split_files(root: str, dataset: str, split: str) -> list[str]:
    """`find_split_files`, but none found is an error listing the folders that have the split."""
    files = find_split_files(root, dataset, split)
    if not files:
        raise FileNotFoundError(
            f"no {split!r} parquet files for {dataset!r} under {root} (looked for {dataset}/{split}-*.parquet "
            f"and {dataset}/{split}/*.parquet); folders with that split: {datasets_with_split(root, split)}"
        )
    return files


def read_parquet_columns(files: Sequence[str], columns: Sequence[str], limit: int | None = None) -> dict[str, list]:
    """Columns of `files` concatenated in order, as Python lists, first `limit` rows at most.
    Every file must have every column (else `BadDataError` naming file and columns)."""
    if limit is not None and limit < 1:
        raise ValueError(f"a row cap must be >= 1 or None, got {limit}")
    out: dict[str, list] = {c: [] for c in columns}
    remaining = limit
    for file in files:
        parquet = pq.ParquetFile(file)
        require_columns(file, columns, parquet.schema_arrow.names)
        for batch in parquet.iter_batches(columns=list(columns)):
            if remaining is not None:
                batch = batch.slice(0, remaining)
                remaining -= batch.num_rows
            for c in columns:
                out[c].extend(batch.column(c).to_pylist())
            if remaining == 0:
                return out
    return out


@dataclass(frozen=True)
class SideReader:
    """Turns one (text, image path) cell pair of a parquet row into a checked `Side`."""

    image_root: str
    handler: BadDataHandler
    check_images: bool = True

    def __call__(
        self, dataset: str, row: int, text: str | None, path: str | None, text_column: str, image_column: str
    ) -> Side | None:
        """The side (placeholders mapped, path joined to `image_root`, "" -> no image), or None
        when the handler skips the row."""
        side = Side(to_backbone_text(text), os.path.join(self.image_root, path) if path else None)
        ok = self.handler.check_side(
            side, dataset=dataset, row=row, text_column=text_column, image_column=image_column,
            check_images=self.check_images,
        )
        return side if ok else None


def _negative_items(texts: str | list | None, paths: str | list | None) -> list[tuple[str | None, str | None]]:
    """(text, path) pairs of a row's negatives: MMEB stores one as strings, B3 several as lists.
    Pairs with neither text nor path mean "no negative"."""
    if not isinstance(texts, list) and not isinstance(paths, list):
        texts, paths = [texts], [paths]
    texts, paths = texts or [], paths or []
    if len(texts) != len(paths):
        raise ValueError(f"{len(texts)} negative texts but {len(paths)} negative image paths")
    return [(t, p) for t, p in zip(texts, paths) if t or p]


def read_mmeb_train(
    root: str | os.PathLike,
    subsets: Sequence[str] | Literal["all"] = "all",
    *,
    split: str = "original",
    image_root: str | os.PathLike | None = None,
    max_rows_per_subset: int | None = None,
    hard_negatives: bool = False,
    positive_prompts: bool = True,
    bad_data: BadDataPolicy | BadDataHandler = "skip",
    check_images: bool = True,
) -> TrainSet:
    """Read MMEB-train subsets into one `TrainSet`.

    `subsets`: names in the order wanted, or "all" (every folder with `split` files, sorted).
    `split`: MMEB's "original" or "diverse_instruction" (any name in the layout is accepted).
    `hard_negatives`: fill `TrainPair.negatives` from `neg_text`/`neg_image_path` where present.
    `positive_prompts`: B3's target prefixes on positives and negatives (off for plain VLM2Vec).
    `bad_data`: "skip" (count in `TrainSet.report`), "error", or a handler of the caller's (one
    that names what it skips, say). `check_images`: `os.path.exists`
    on every image now (decoding is the pipeline's job).
    """
    root = os.path.abspath(os.fspath(root))
    names = select_datasets(root, split, subsets)
    handler = bad_data if isinstance(bad_data, BadDataHandler) else BadDataHandler(bad_data)
    image_root = os.path.abspath(os.fspath(image_root)) if image_root is not None else root
    read_side = SideReader(image_root, handler, check_images)
    pairs = {
        name: _read_subset(root, name, split, max_rows_per_subset, hard_negatives, positive_prompts, read_side)
        for name in names
    }
    return TrainSet(pairs, handler.report)


def _read_subset(
    root: str,
    name: str,
    split: str,
    limit: int | None,
    hard_negatives: bool,
    positive_prompts: bool,
    read_side: SideReader,
) -> list[TrainPair]:
    prompt = positive_prompt(train_subset_info(name, root)) if positive_prompts else ""
    files = require_split_files(root, name, split)
    columns = [*_QUERY, *_POSITIVE]
    if hard_negatives and any(c in pq.read_schema(files[0]).names for c in _NEGATIVE):
        columns += _NEGATIVE  # both or neither: a lone neg column is reported as missing its partner
    data = read_parquet_columns(files, columns, limit)
    pairs = []
    for row, values in enumerate(zip(*(data[c] for c in columns))):
        query = read_side(name, row, values[0], values[1], *_QUERY)
        positive = read_side(name, row, values[2], values[3], *_POSITIVE) if query is not None else None
        if positive is None:
            continue
        negatives = []
        if len(values) > 4:
            try:
                items = _negative_items(values[4], values[5])
            except ValueError as e:
                raise BadDataError(f"{name} row {row}, columns {list(_NEGATIVE)}: {e}") from None
            negatives = [read_side(name, row, t, p, *_NEGATIVE) for t, p in items]
            if None in negatives:
                continue
        pairs.append(
            TrainPair(
                dataset=name,
                row=row,
                query=query,
                positive=with_prompt(positive, prompt),
                negatives=tuple(with_prompt(n, prompt) for n in negatives),
            )
        )
    return pairs
