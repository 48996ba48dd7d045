"""The in-process MMEB evaluation: an Embedder and records in, one score per dataset out.

The trainer calls it on its current weights (`Embedder(model, text, image_config)`, nothing
written to disk); the CLI calls it on a checkpoint, with the embedding cache on. Per dataset:
distinct sides (`sides.py`), their vectors (cache, else encoded over every device and host:
`encoding.py`), then Precision@1 (`scoring.py`). The records come from `read_mmeb_eval`, which also
applies B3's positive prompts to the candidates when asked: `evaluate` uses the text as given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from tqdm.auto import tqdm

from vlm2vec_jax.data.records import EvalQuery
from vlm2vec_jax.embedder import Embedder
from vlm2vec_jax.evaluation.encoding import SideEncoder
from vlm2vec_jax.evaluation.scoring import DatasetScore, predict
from vlm2vec_jax.evaluation.sides import index_queries

__all__ = ["evaluate"]


def evaluate(
    embedder: Embedder,
    queries: Mapping[str, Sequence[EvalQuery]],
    *,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    dim: int | None = None,
) -> dict[str, DatasetScore]:
    """Precision@1 of `embedder` on each dataset of `queries` (name -> rows), in the order given.

    `dim`: score the vectors' first `dim` entries, renormalised (Matryoshka); None: the full width.
    `cache_dir`: root of the embedding cache (see `cache.py`); None encodes everything. Every host
    of a multi-process run must call this with the same queries. Errors: a missing or undecodable
    image raises `BadDataError` naming dataset, row, column and path."""
    encoder = SideEncoder(embedder, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress, dim=dim)
    scores = {}
    for name, rows in tqdm(queries.items(), desc="datasets", unit="dataset", disable=not show_progress):
        data = index_queries(name, rows)
        vectors, encoded = encoder(data.table, name)
        predictions = predict(vectors, data.queries, data.candidates)
        scores[name] = DatasetScore(
            dataset=name,
            num_correct=int((predictions == 0).sum()),
            num_pred=len(predictions),
            num_items=len(data.table),
            num_encoded=encoded,
            predictions=predictions,
        )
    return scores
