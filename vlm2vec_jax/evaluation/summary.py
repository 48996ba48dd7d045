"""The MMEB summary: per dataset, per meta-task, IND, OOD and overall, laid out as B3's Table 1.

Every aggregate is an unweighted mean over datasets of their Precision@1 (MMEB's convention; B3's
Table 1 is consistent with it: e.g. B3++ Qwen2-2B's 36-dataset average 68.1 equals the meta-task
columns weighted by their dataset counts 12/10/10/4, and equally the IND/OOD columns by 20/16).
A group with no evaluated dataset is None ("-" in the table). JSON keeps fractions, as the score
files do; the markdown shows percentages with one decimal, as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vlm2vec_jax.data.registry import EVAL_SPLITS, META_TASKS, DatasetInfo
from vlm2vec_jax.evaluation.scoring import DatasetScore

__all__ = ["OVERALL", "TABLE_COLUMNS", "GroupScore", "Summary", "summarize"]

OVERALL = "overall"
# (group, header) in B3 Table 1's column order.
TABLE_COLUMNS = (
    ("retrieval", "Ret."),
    ("classification", "Cla."),
    ("vqa", "VQA"),
    ("grounding", "Gro."),
    ("IND", "ID"),
    ("OOD", "OOD"),
    (OVERALL, "Avg."),
)


@dataclass(frozen=True)
class GroupScore:
    """The mean Precision@1 (fraction) over a group's datasets; None when it has none."""

    acc: float | None
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class Summary:
    """Dataset scores with their meta-task and split, and the group means (meta-tasks, IND, OOD,
    overall). Datasets are ordered by meta-task, then IND before OOD, then as evaluated."""

    scores: dict[str, DatasetScore]
    infos: dict[str, DatasetInfo]
    groups: dict[str, GroupScore]

    def to_json(self) -> dict:
        """`summary.json`: per dataset acc/num_correct/num_pred/meta_task/split, then the groups."""
        return {
            "datasets": {
                name: {**score.to_json(), "meta_task": self.infos[name].meta_task, "split": self.infos[name].split}
                for name, score in self.scores.items()
            },
            **{group: {"acc": g.acc, "num_datasets": len(g.datasets)} for group, g in self.groups.items()},
        }

    def markdown(self, model: str = "model") -> str:
        """B3 Table 1's layout (a dataset-count row, then the model's row), then one row per dataset."""
        headers = [header for _, header in TABLE_COLUMNS]
        lines = [
            _row(["Model", *headers]),
            _row(["---"] * (len(headers) + 1)),
            _row(["#Datasets", *(str(len(self.groups[g].datasets)) for g, _ in TABLE_COLUMNS)]),
            _row([model, *(_percent(self.groups[g].acc) for g, _ in TABLE_COLUMNS)]),
            "",
            _row(["Dataset", "Meta-task", "Split", "P@1", "Correct"]),
            _row(["---"] * 5),
        ]
        for name, score in self.scores.items():
            info, correct = self.infos[name], f"{score.num_correct}/{score.num_pred}"
            lines.append(_row([name, info.meta_task, info.split or "", _percent(score.acc), correct]))
        return "\n".join(lines) + "\n"


def summarize(scores: Mapping[str, DatasetScore], infos: Mapping[str, DatasetInfo]) -> Summary:
    """Group `scores` by the meta-task and split `infos` gives each dataset (e.g.
    `registry.eval_datasets(root)`); a dataset without an entry, or without a split, is an error."""
    missing = [name for name in scores if name not in infos or infos[name].split is None]
    if missing:
        raise ValueError(
            f"no meta-task and IND/OOD split known for {missing}: add them to the data root's datasets.json "
            '({"name": {"meta_task": ..., "split": "IND" | "OOD"}})'
        )
    order = sorted(
        enumerate(scores),
        key=lambda item: (META_TASKS.index(infos[item[1]].meta_task), EVAL_SPLITS.index(infos[item[1]].split), item[0]),
    )
    names = [name for _, name in order]
    members = {
        group: [n for n in names if group in (infos[n].meta_task, infos[n].split)]
        for group in (*META_TASKS, *EVAL_SPLITS)
    }
    members[OVERALL] = names
    groups = {
        group: GroupScore(sum(scores[n].acc for n in ns) / len(ns) if ns else None, tuple(ns))
        for group, ns in members.items()
    }
    return Summary({n: scores[n] for n in names}, {n: infos[n] for n in names}, groups)


def _percent(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
