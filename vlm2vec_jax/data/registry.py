"""Which datasets exist and what they are: MMEB's 36 evaluation datasets and 20 training subsets.

Readers need a dataset's meta-task (it picks B3's positive prompt) and reports need its IND/OOD
split (MMEB averages them separately). Both come from MMEB's tables (docs/reference.md, "MMEB
datasets and splits"), merged with a `datasets.json` at a data root, so local benchmarks (the
built-in synthetic one) describe themselves without code changes:

    {"<name>": {"meta_task": "classification" | "vqa" | "retrieval" | "grounding",
                "split": "IND" | "OOD"}}

Eval roots must give `split`; train roots give `meta_task` only. A file entry wins over a built-in
entry of the same name: the data on disk knows best what it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "DATASETS_JSON",
    "EVAL_DATASETS",
    "EVAL_SPLITS",
    "META_TASKS",
    "TRAIN_SUBSETS",
    "DatasetInfo",
    "UnknownDatasetError",
    "eval_dataset_info",
    "eval_datasets",
    "train_subset_info",
    "train_subsets",
]

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
EVAL_SPLITS = ("IND", "OOD")
DATASETS_JSON = "datasets.json"


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's name, meta-task and, for evaluation datasets, IND (seen in training) or OOD."""

    name: str
    meta_task: str
    split: str | None = None


class UnknownDatasetError(ValueError):
    """A dataset name that neither MMEB's tables nor the root's datasets.json describe."""


def _table(meta_task: str, split: str | None, names: Iterable[str]) -> dict[str, DatasetInfo]:
    return {name: DatasetInfo(name, meta_task, split) for name in names}


EVAL_DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        **_table("classification", "IND", ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"]),
        **_table("classification", "OOD", ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"]),
        **_table("vqa", "IND", ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"]),
        **_table("vqa", "OOD", ["ScienceQA", "VizWiz", "GQA", "TextVQA"]),
        **_table(
            "retrieval",
            "IND",
            ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA"],
        ),
        **_table("retrieval", "OOD", ["FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"]),
        **_table("grounding", "IND", ["MSCOCO"]),
        **_table("grounding", "OOD", ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]),
    }
)
"""MMEB-eval's 36 datasets by folder name, in the paper's table order."""

TRAIN_SUBSETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        **_table(
            "classification", None, ["ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"]
        ),
        **_table("vqa", None, ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"]),
        **_table(
            "retrieval",
            None,
            ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA"],
        ),
        **_table("grounding", None, ["MSCOCO"]),
    }
)
"""MMEB-train's 20 subsets by folder name (underscores where eval uses hyphens, e.g. ImageNet_1K)."""


def _read_datasets_json(root: str | os.PathLike, require_split: bool) -> dict[str, DatasetInfo]:
    """Entries of `<root>/datasets.json` (none when the file is absent), validated."""
    file = os.path.join(os.fspath(root), DATASETS_JSON)
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}; fix or delete the file") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object {{name: {{meta_task, split}}}}, got {type(raw).__name__}")
    infos = {}
    for name, entry in raw.items():
        where = f"{file}, entry {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be an object with `meta_task`, got {entry!r}")
        meta_task, split = entry.get("meta_task"), entry.get("split")
        if meta_task not in META_TASKS:
            raise ValueError(f"{where}: meta_task must be one of {list(META_TASKS)}, got {meta_task!r}")
        if split is None and require_split:
            raise ValueError(f"{where}: an evaluation dataset needs `split`: one of {list(EVAL_SPLITS)}")
        if split is not None and split not in EVAL_SPLITS:
            raise ValueError(f"{where}: split must be one of {list(EVAL_SPLITS)}, got {split!r}")
        infos[name] = DatasetInfo(name, meta_task, split)
    return infos


def eval_datasets(root: str | os.PathLike | None = None) -> dict[str, DatasetInfo]:
    """MMEB-eval's 36 datasets merged with `<root>/datasets.json` (file entries win)."""
    return {**EVAL_DATASETS, **(_read_datasets_json(root, require_split=True) if root is not None else {})}


def train_subsets(root: str | os.PathLike | None = None) -> dict[str, DatasetInfo]:
    """MMEB-train's 20 subsets merged with `<root>/datasets.json` (file entries win)."""
    return {**TRAIN_SUBSETS, **(_read_datasets_json(root, require_split=False) if root is not None else {})}


def _lookup(name: str, known: Mapping[str, DatasetInfo], what: str, root: str | os.PathLike | None) -> DatasetInfo:
    try:
        return known[name]
    except KeyError:
        where = f" or {os.path.join(os.fspath(root), DATASETS_JSON)}" if root is not None else ""
        raise UnknownDatasetError(
            f"unknown {what} {name!r}: not in MMEB's table{where}. Known: {', '.join(known)}. "
            f"Check the spelling, or describe the dataset in {DATASETS_JSON} at the data root"
        ) from None


def eval_dataset_info(name: str, root: str | os.PathLike | None = None) -> DatasetInfo:
    """Meta-task and IND/OOD of an evaluation dataset; unknown names raise `UnknownDatasetError`."""
    return _lookup(name, eval_datasets(root), "evaluation dataset", root)


def train_subset_info(name: str, root: str | os.PathLike | None = None) -> DatasetInfo:
    """Meta-task of a training subset; unknown names raise `UnknownDatasetError`."""
    return _lookup(name, train_subsets(root), "training subset", root)
