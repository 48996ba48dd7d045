"""Caption-corpus retrieval (Flickr30K / COCO style): Recall@k against a brute-force ranking, both
directions, with the real tiny checkpoint; the parquet schema and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm2vec_jax import Embedder
from vlm2vec_jax.data.bad_data import BadDataError
from vlm2vec_jax.evaluation import CorpusPrompts, evaluate_corpus, read_caption_corpus
from vlm2vec_jax.evaluation.corpus import best_gold_ranks
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

WORDS = "red green blue circle square star dog cat park street table window bus bird sea road".split()


def brute_force_recall(queries: np.ndarray, candidates: np.ndarray, golds: list[set[int]], k: int) -> float:
    """Rank all candidates by one np.dot each, stable (lower index first on ties); hit if a gold is in the top k."""
    hits = 0
    for q, gold in zip(queries, golds):
        scores = np.array([float(np.dot(c, q)) for c in candidates])
        order = np.argsort(-scores, kind="stable")
        hits += bool(set(order[:k].tolist()) & gold)
    return hits / len(queries)


def test_best_gold_ranks_equal_a_stable_sort_with_ties():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(50, 8)).astype(np.float32)
    candidates[[9, 30]] = candidates[4]  # exact ties
    queries = rng.normal(size=(300, 8)).astype(np.float32)  # more than one query chunk
    queries[:20] = candidates[4] + 0.01 * rng.normal(size=(20, 8))  # ...near the top of the ranking
    golds = [set(rng.choice(50, size=rng.integers(1, 4), replace=False).tolist()) for _ in queries]
    queries[1] = queries[0]
    golds[0], golds[1] = {30}, {9, 30}  # 4, 9, 30 tie: 9 ranks right after 4, 30 right after 9
    pair_query = np.array([q for q, gold in enumerate(golds) for _ in gold])
    pair_gold = np.array([g for gold in golds for g in gold])
    ranks = best_gold_ranks(queries, candidates, pair_query, pair_gold)
    for k in (1, 5, 10):
        assert np.mean(ranks < k) == brute_force_recall(queries, candidates, golds, k)
    assert ranks[0] == ranks[1] + 1
    with pytest.raises(ValueError, match="at least one gold"):
        best_gold_ranks(queries[:2], candidates, np.array([0]), np.array([1]))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "img").mkdir()
    rng = np.random.default_rng(1)
    paths, captions = [], []
    for i in range(12):
        height, width = rng.integers(40, 90, size=2)
        Image.fromarray(tiny_image(int(height), int(width), seed=i)).save(root / "img" / f"{i}.png")
        paths.append(f"img/{i}.png")
        captions.append([" ".join(rng.choice(WORDS, size=5)) for _ in range(int(rng.integers(1, 4)))])
    captions[7].append(captions[2][0])  # one caption shared by two images: tied candidates
    table = pa.table({"image_path": paths, "captions": pa.array(captions, pa.list_(pa.string()))})
    pq.write_table(table, root / "tiny_flickr.parquet")
    return root / "tiny_flickr.parquet"


def test_recall_equals_brute_force(tiny_ckpt, corpus_file, tmp_path):
    embedder = Embedder.from_pretrained(tiny_ckpt)
    corpus = read_caption_corpus(corpus_file)
    prompts = CorpusPrompts()
    score = evaluate_corpus(embedder, corpus, prompts=prompts, batch_size=8, show_progress=False)

    image_items = [{"image": path, "text": prompts.image} for path in corpus.images]
    captions = [(row, text) for row, texts in enumerate(corpus.captions) for text in texts]
    images = embedder.encode(image_items, batch_size=8)
    texts = embedder.encode([text for _, text in captions], batch_size=8)
    t2i_golds = [{row} for row, _ in captions]
    i2t_golds = [{j for j, (row, _) in enumerate(captions) if row == i} for i in range(len(images))]
    for k in (1, 5, 10):
        assert score.text_to_image[k] == brute_force_recall(texts, images, t2i_golds, k)
        assert score.image_to_text[k] == brute_force_recall(images, texts, i2t_golds, k)
    assert (score.num_images, score.num_captions) == (12, len(captions))
    assert score.num_encoded == 12 + len({text for _, text in captions})  # the shared caption once
    assert score.to_json()["t2i"] == {f"R@{k}": score.text_to_image[k] for k in (1, 5, 10)}


def test_corpus_schema_errors_name_file_row_and_column(tmp_path):
    file = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image_path": ["a.png"], "caption": ["x"]}), file)
    with pytest.raises(BadDataError, match=r"bad.parquet: missing column\(s\) \['captions'\]"):
        read_caption_corpus(file)
    pq.write_table(pa.table({"image_path": ["a.png", "b.png"], "captions": [["x"], []]}), file)
    with pytest.raises(BadDataError, match=r"bad.parquet row 1, column 'captions'"):
        read_caption_corpus(file)


def test_missing_corpus_image_names_corpus_row_and_path(tiny_ckpt, corpus_file, tmp_path):
    corpus = read_caption_corpus(corpus_file, image_root=tmp_path)  # images are not under tmp_path
    expected = rf"tiny_flickr row 0, column 'image_path': image file not found: {tmp_path}/img/0.png"
    with pytest.raises(BadDataError, match=expected):
        evaluate_corpus(Embedder.from_pretrained(tiny_ckpt), corpus, show_progress=False)
