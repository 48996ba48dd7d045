"""The files an evaluation leaves in its output directory.

    <out>/<dataset>_score.json   VLM2Vec's score file: {"acc", "num_correct", "num_pred"}, acc a fraction
    <out>/<corpus>_score.json    {"t2i": {"R@1", "R@5", "R@10"}, "i2t": {...}, "num_images", "num_captions"}
    <out>/summary.json           every dataset with meta-task and split, the group means, the corpora
    <out>/summary.md             B3 Table 1's layout, per-dataset rows, and a corpus table
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from vlm2vec_jax.evaluation.corpus import RECALL_KS, CorpusScore
from vlm2vec_jax.evaluation.summary import Summary

__all__ = ["report_markdown", "write_report"]

SCORE_SUFFIX = "_score.json"


def report_markdown(summary: Summary, corpus_scores: Sequence[CorpusScore] = (), *, model: str = "model") -> str:
    """The summary table, then (when there are corpora) Recall@k per corpus and direction, in %."""
    text = summary.markdown(model)
    if corpus_scores:
        headers = [f"{direction} R@{k}" for direction in ("t2i", "i2t") for k in RECALL_KS]
        lines = ["", "| Corpus | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
        for c in corpus_scores:
            values = [*c.text_to_image.values(), *c.image_to_text.values()]
            lines.append(f"| {c.corpus} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
        text += "\n".join(lines) + "\n"
    return text


def write_report(
    out: str | os.PathLike, summary: Summary, corpus_scores: Sequence[CorpusScore] = (), *, model: str = "model"
) -> list[Path]:
    """Write the files listed in the module docstring; returns their paths."""
    out = Path(out)
    clash = set(summary.scores) & {c.corpus for c in corpus_scores}
    if clash:
        raise ValueError(
            f"corpus and dataset names collide ({sorted(clash)}): their score files would overwrite each other"
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def dump(name: str, obj: object, indent: int = 4) -> None:
        path = out / name
        path.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8")
        written.append(path)

    for name, score in summary.scores.items():
        dump(f"{name}{SCORE_SUFFIX}", score.to_json())
    for corpus in corpus_scores:
        dump(f"{corpus.corpus}{SCORE_SUFFIX}", corpus.to_json())
    dump("summary.json", {**summary.to_json(), "corpora": {c.corpus: c.to_json() for c in corpus_scores}}, indent=2)
    markdown = out / "summary.md"
    markdown.write_text(report_markdown(summary, corpus_scores, model=model), encoding="utf-8")
    return [*written, markdown]
