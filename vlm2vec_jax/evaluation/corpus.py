"""Caption-corpus retrieval, Flickr30K / COCO style (B3 Table 3): Recall@1/5/10 in both directions.

A corpus is one parquet file, one row per image:

    image_path   string          the image, relative to the image root (default: the file's folder)
    captions     list<string>    its captions (Flickr30K and COCO have five)

Each image and each caption is encoded once, as VLM2Vec's `eval_flickr.py` does, and serves both
directions: text -> image ranks every image for each caption (the gold is its image); image ->
text ranks every caption for each image (the golds are all its captions: a hit when any of them is
in the top k). R@k is the share of queries with a hit. Prompts default to VLM2Vec's Flickr
evaluation: the image side is "<|image_1|> Find an image caption describing the given image.", the
caption side the bare caption. Ties rank the lower index first (the original's descending argsort
leaves their order unspecified), and identical vectors score bit-identically (`unique_rows`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm2vec_jax.data.bad_data import BadDataError
from vlm2vec_jax.data.mmeb_train import read_parquet_columns
from vlm2vec_jax.data.prompts import to_backbone_text
from vlm2vec_jax.data.records import Side
from vlm2vec_jax.embedder import Embedder
from vlm2vec_jax.evaluation.encoding import SideEncoder
from vlm2vec_jax.evaluation.scoring import QUERY_CHUNK, unique_rows
from vlm2vec_jax.evaluation.sides import SideTable

__all__ = [
    "CORPUS_COLUMNS",
    "RECALL_KS",
    "CaptionCorpus",
    "CorpusPrompts",
    "CorpusScore",
    "best_gold_ranks",
    "evaluate_corpus",
    "read_caption_corpus",
]

IMAGE_COLUMN, CAPTIONS_COLUMN = CORPUS_COLUMNS = ("image_path", "captions")
RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class CaptionCorpus:
    """Images (absolute paths) and, row by row, their captions."""

    name: str
    images: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class CorpusPrompts:
    """The text of an image side, and the template of a caption side (`{caption}` is the caption)."""

    image: str = "<|image_1|> Find an image caption describing the given image."
    caption: str = "{caption}"


@dataclass(frozen=True)
class CorpusScore:
    """Recall@k (fractions) for text -> image and image -> text."""

    corpus: str
    text_to_image: dict[int, float]
    image_to_text: dict[int, float]
    num_images: int
    num_captions: int
    num_encoded: int

    def to_json(self) -> dict:
        """`<corpus>_score.json`."""
        return {
            "t2i": {f"R@{k}": v for k, v in self.text_to_image.items()},
            "i2t": {f"R@{k}": v for k, v in self.image_to_text.items()},
            "num_images": self.num_images,
            "num_captions": self.num_captions,
        }


def read_caption_corpus(
    file: str | os.PathLike, *, image_root: str | os.PathLike | None = None, name: str | None = None
) -> CaptionCorpus:
    """The corpus in `file` (schema in the module docstring); `name` defaults to the file's stem."""
    file = Path(file)
    root = Path(image_root) if image_root is not None else file.parent
    data = read_parquet_columns([os.fspath(file)], CORPUS_COLUMNS)
    images, captions = [], []
    for row, (path, texts) in enumerate(zip(data[IMAGE_COLUMN], data[CAPTIONS_COLUMN])):
        where = f"{file} row {row}, column"
        if not isinstance(path, str) or not path:
            raise BadDataError(f"{where} {IMAGE_COLUMN!r}: expected an image path, got {path!r}")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise BadDataError(f"{where} {CAPTIONS_COLUMN!r}: expected a non-empty list of captions, got {texts!r}")
        images.append(os.fspath(root / path))
        captions.append(tuple(texts))
    if not images:
        raise BadDataError(f"{file}: the corpus has no rows")
    return CaptionCorpus(name or file.stem, tuple(images), tuple(captions))


def best_gold_ranks(
    queries: np.ndarray, candidates: np.ndarray, pair_query: np.ndarray, pair_gold: np.ndarray
) -> np.ndarray:
    """For each query (row of `queries`), the best 0-based rank of its golds among all `candidates`
    ranked by dot product, ties to the lower index. Golds are given as pairs: candidate
    `pair_gold[i]` is a gold of query `pair_query[i]`; every query needs at least one."""
    table, inverse = unique_rows(candidates)
    best = np.full(len(queries), len(candidates), np.int64)
    order = np.argsort(pair_query, kind="stable")
    pair_query, pair_gold = pair_query[order], pair_gold[order]
    columns = np.arange(len(candidates))
    for start in range(0, len(queries), QUERY_CHUNK):
        lo, hi = np.searchsorted(pair_query, [start, start + QUERY_CHUNK])
        q, g = pair_query[lo:hi], pair_gold[lo:hi]
        scores = (queries[start : start + QUERY_CHUNK] @ table.T)[:, inverse]  # equal vectors, equal scores
        per_pair = scores[q - start]
        gold = per_pair[np.arange(len(g)), g][:, None]
        ranks = (per_pair > gold).sum(1) + ((per_pair == gold) & (columns < g[:, None])).sum(1)
        np.minimum.at(best, q, ranks)
    if np.any(best == len(candidates)):
        raise ValueError("every query needs at least one gold candidate")
    return best


def _recalls(ranks: np.ndarray) -> dict[int, float]:
    return {k: float(np.mean(ranks < k)) for k in RECALL_KS}


def evaluate_corpus(
    embedder: Embedder,
    corpus: CaptionCorpus,
    *,
    prompts: CorpusPrompts = CorpusPrompts(),
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    dim: int | None = None,
) -> CorpusScore:
    """Recall@1/5/10 of `embedder` on `corpus`, both directions (see the module docstring), at the
    Matryoshka width `dim` (None: full)."""
    table = SideTable()
    image_text = to_backbone_text(prompts.image)
    images = np.array([table.add(Side(image_text, path), row, IMAGE_COLUMN) for row, path in enumerate(corpus.images)])
    caption_rows = [(row, text) for row, texts in enumerate(corpus.captions) for text in texts]
    caption_sides = [Side(to_backbone_text(prompts.caption.format(caption=text))) for _, text in caption_rows]
    captions = np.array([table.add(side, row, CAPTIONS_COLUMN) for side, (row, _) in zip(caption_sides, caption_rows)])
    encoder = SideEncoder(embedder, batch_size=batch_size, cache_dir=cache_dir, show_progress=show_progress, dim=dim)
    vectors, encoded = encoder(table, corpus.name)
    owner = np.array([row for row, _ in caption_rows])  # the image row of each caption
    caption_ids = np.arange(len(caption_rows))
    text_to_image = best_gold_ranks(vectors[captions], vectors[images], caption_ids, owner)
    image_to_text = best_gold_ranks(vectors[images], vectors[captions], owner, caption_ids)
    return CorpusScore(
        corpus.name, _recalls(text_to_image), _recalls(image_to_text), len(corpus.images), len(caption_rows), encoded
    )
