"""MMEB evaluation: Precision@1 per dataset (MMEB protocol), caption-corpus Recall@k, summaries.

    from vlm2vec_jax.evaluation import evaluate, summarize, write_report
    scores = evaluate(embedder, read_mmeb_eval(root), batch_size=16, cache_dir="out/cache")
    summary = summarize(scores, eval_datasets(root))
    write_report("out", summary); print(summary.markdown())

Encoding runs data-parallel over every device of every host (`parallel.py`), each distinct side
once (`sides.py`), with an on-disk cache keyed by the model's fingerprint (`cache.py`).
"""

from vlm2vec_jax.evaluation.cache import EmbeddingCache
from vlm2vec_jax.evaluation.corpus import (
    CaptionCorpus,
    CorpusPrompts,
    CorpusScore,
    evaluate_corpus,
    read_caption_corpus,
)
from vlm2vec_jax.evaluation.evaluate import evaluate
from vlm2vec_jax.evaluation.parallel import DataParallelEmbedder
from vlm2vec_jax.evaluation.report import report_markdown, write_report
from vlm2vec_jax.evaluation.scoring import DatasetScore
from vlm2vec_jax.evaluation.summary import Summary, summarize

__all__ = [
    "CaptionCorpus",
    "CorpusPrompts",
    "CorpusScore",
    "DataParallelEmbedder",
    "DatasetScore",
    "EmbeddingCache",
    "Summary",
    "evaluate",
    "evaluate_corpus",
    "read_caption_corpus",
    "report_markdown",
    "summarize",
    "write_report",
]
