"""MMEB-eval reader: `<root>/<Dataset>/test-*.parquet` -> `EvalQuery` records per dataset.

Columns `qry_text`, `qry_img_path`, `tgt_text` (list), `tgt_img_path` (list, "" = no image); the
ground truth is candidate 0. Image paths are relative to an image root. B3's positive prompts,
when on, prefix every candidate of the datasets that have one (`prompts.positive_prompt`).

Bad data defaults to "error": a skipped query changes the benchmark, so skipping must be asked
for. A row whose candidate lists differ in length, or are empty, is a broken file and always an
error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

from vlm2vec_jax.data.bad_data import BadDataError, BadDataHandler, BadDataPolicy, BadDataReport
from vlm2vec_jax.data.mmeb_train import SideReader, read_parquet_columns, require_split_files, select_datasets
from vlm2vec_jax.data.prompts import positive_prompt, with_prompt
from vlm2vec_jax.data.records import EvalQuery, Side
from vlm2vec_jax.data.registry import eval_dataset_info

__all__ = ["EVAL_COLUMNS", "read_mmeb_eval"]

EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


def read_mmeb_eval(
    root: str | os.PathLike,
    datasets: Sequence[str] | Literal["all"] = "all",
    *,
    split: str = "test",
    image_root: str | os.PathLike | None = None,
    positive_prompts: bool = True,
    bad_data: BadDataPolicy = "error",
    check_images: bool = True,
    max_rows: int | None = None,
    report: BadDataReport | None = None,
) -> dict[str, list[EvalQuery]]:
    """Queries per dataset, datasets in the order given ("all": every folder with `split` files,
    sorted), queries in file order (`EvalQuery.row`). `max_rows`: the first N rows of each dataset
    (quick runs). `check_images`: `os.path.exists` on every image now. Rows skipped under
    `bad_data="skip"` are counted into `report` when one is passed."""
    root = os.path.abspath(os.fspath(root))
    image_root = os.path.abspath(os.fspath(image_root)) if image_root is not None else root
    read_side = SideReader(image_root, BadDataHandler(bad_data, report), check_images)
    return {
        name: _read(root, name, split, positive_prompts, read_side, max_rows)
        for name in select_datasets(root, split, datasets)
    }


def _read(
    root: str, name: str, split: str, positive_prompts: bool, read_side: SideReader, max_rows: int | None
) -> list[EvalQuery]:
    prompt = positive_prompt(eval_dataset_info(name, root)) if positive_prompts else ""
    data = read_parquet_columns(require_split_files(root, name, split), EVAL_COLUMNS, max_rows)
    # Rows share most candidates (1000 queries x 1000 candidates from one pool): check and build
    # each distinct (text, path) once and share the object.
    known: dict[tuple[str | None, str | None], Side] = {}
    queries = []
    for row, (qry_text, qry_img, tgt_texts, tgt_imgs) in enumerate(zip(*(data[c] for c in EVAL_COLUMNS))):
        if not isinstance(tgt_texts, list) or not isinstance(tgt_imgs, list) or len(tgt_texts) != len(tgt_imgs):
            raise BadDataError(
                f"{name} row {row}: tgt_text and tgt_img_path must be lists of equal length, got "
                f"{_describe(tgt_texts)} and {_describe(tgt_imgs)}; the file is broken: re-download it"
            )
        if not tgt_texts:
            raise BadDataError(
                f"{name} row {row}: no candidates (tgt_text is empty); the file is broken: re-download it"
            )
        query = read_side(name, row, qry_text, qry_img, "qry_text", "qry_img_path")
        if query is None:
            continue
        candidates = []
        for text, img in zip(tgt_texts, tgt_imgs):
            candidate = known.get((text, img))
            if candidate is None:
                candidate = read_side(name, row, text, img, "tgt_text", "tgt_img_path")
                if candidate is None:
                    break
                candidate = known[(text, img)] = with_prompt(candidate, prompt)
            candidates.append(candidate)
        else:
            queries.append(EvalQuery(dataset=name, row=row, query=query, candidates=tuple(candidates)))
    return queries


def _describe(value: object) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
