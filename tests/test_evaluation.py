"""MMEB evaluation with the real tiny checkpoint on the real synthetic benchmark ("small"):
Precision@1 against a direct numpy computation, ties, dedup, the embedding cache, bad images and
the summary's averages.

The reference computation shares nothing with the evaluation package: it encodes with
`Embedder.encode` and ranks each row with one `np.dot` per candidate.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlm2vec_jax import Embedder
from vlm2vec_jax.cli_config import run_cli
from vlm2vec_jax.data.bad_data import BadDataError
from vlm2vec_jax.data.mmeb_eval import read_mmeb_eval
from vlm2vec_jax.data.records import EvalQuery, Side
from vlm2vec_jax.data.registry import DatasetInfo, eval_datasets
from vlm2vec_jax.data.synthetic import generate
from vlm2vec_jax.eval import main as eval_main
from vlm2vec_jax.evaluation import DatasetScore, evaluate, summarize, write_report
from vlm2vec_jax.evaluation.fingerprint import describe_model, model_fingerprint
from vlm2vec_jax.evaluation.scoring import predict
from vlm2vec_jax.models.hf_import import load_pretrained

# ml_collections loads config files with the deprecated importlib `load_module`
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
BATCH = 16
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "eval_mmeb.py")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evalbench") / "bench"
    generate(out, seed=0, scale="small")
    return out / "eval"


@pytest.fixture(scope="module")
def queries(bench: Path) -> dict[str, list[EvalQuery]]:
    return read_mmeb_eval(bench)


@pytest.fixture(scope="module")
def embedder(tiny_ckpt: Path) -> Embedder:
    return Embedder.from_pretrained(tiny_ckpt)


def item(side: Side) -> str | dict:
    return {"text": side.text, "image": side.image} if side.image else side.text


@pytest.fixture(scope="module")
def reference(embedder: Embedder, queries) -> dict[str, np.ndarray]:
    """Per dataset, each row's predicted candidate: Embedder.encode + one np.dot per candidate."""
    out = {}
    for name, rows in queries.items():
        sides = list(dict.fromkeys(s for q in rows for s in (q.query, *q.candidates)))
        vectors = dict(zip(sides, embedder.encode([item(s) for s in sides], batch_size=BATCH)))
        out[name] = np.array(
            [np.argmax([float(np.dot(vectors[c], vectors[q.query])) for c in q.candidates]) for q in rows]
        )
    return out


@pytest.fixture(scope="module")
def scores(embedder: Embedder, queries) -> dict[str, DatasetScore]:
    return evaluate(embedder, queries, batch_size=BATCH, show_progress=False)


def test_predictions_equal_a_direct_numpy_computation(scores, reference):
    assert list(scores) == list(reference)
    for name, score in scores.items():
        np.testing.assert_array_equal(score.predictions, reference[name], err_msg=name)
        assert score.num_correct == int((reference[name] == 0).sum())
        assert score.num_pred == len(reference[name])
    # the tiny random model gets some right and many wrong: the comparison is not trivially all-zero
    assert 0 < sum(s.num_correct for s in scores.values()) < sum(s.num_pred for s in scores.values())


def test_cli_precision_at_1_equals_numpy(tiny_ckpt, bench, reference, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--config", CONFIG, f"--config.model={tiny_ckpt}", f"--config.data.root={bench}",
            f"--config.out={out}", "--config.progress=False", f"--config.batch_size={BATCH}"]
    assert run_cli(eval_main, argv, command="vlm2vec_jax.eval", example_config=CONFIG) == 0
    for name, predictions in reference.items():
        saved = json.loads((out / f"{name}_score.json").read_text())
        correct = int((predictions == 0).sum())
        assert saved == {"acc": correct / len(predictions), "num_correct": correct, "num_pred": len(predictions)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["num_datasets"] == len(reference)
    assert summary["overall"]["acc"] == pytest.approx(np.mean([np.mean(p == 0) for p in reference.values()]))
    assert json.loads((out / "config.json").read_text())["model"] == str(tiny_ckpt)
    printed = capsys.readouterr().out
    assert "| Model | Ret. | Cla. | VQA | Gro. | ID | OOD | Avg. |" in printed
    assert printed == (out / "summary.md").read_text()


def test_matryoshka_width_scores_renormalised_prefixes_from_one_cached_encoding(embedder, queries, tmp_path):
    """`dim` scores each side's first `dim` entries renormalised (`Embedder.encode(dim=)`), against
    one np.dot per candidate; the cache keeps full-width vectors, so another width encodes nothing."""
    rows = {"SynCls": queries["SynCls"]}
    full = evaluate(embedder, rows, batch_size=BATCH, show_progress=False, cache_dir=tmp_path)
    short = evaluate(embedder, rows, batch_size=BATCH, show_progress=False, cache_dir=tmp_path, dim=8)["SynCls"]
    assert short.num_encoded == 0 < full["SynCls"].num_encoded
    sides = list(dict.fromkeys(s for q in rows["SynCls"] for s in (q.query, *q.candidates)))
    vectors = dict(zip(sides, embedder.encode([item(s) for s in sides], batch_size=BATCH, dim=8)))
    expected = [np.argmax([float(np.dot(vectors[c], vectors[q.query])) for c in q.candidates]) for q in rows["SynCls"]]
    np.testing.assert_array_equal(short.predictions, expected)
    assert not np.array_equal(short.predictions, full["SynCls"].predictions)  # the width matters here
    with pytest.raises(ValueError, match=f"dim={embedder.dim + 1}: a Matryoshka dimension must be in 1..{embedder.dim}"):
        evaluate(embedder, rows, batch_size=BATCH, show_progress=False, dim=embedder.dim + 1)


def test_ties_go_to_the_lowest_index(embedder):
    red, blue = Side("a red circle"), Side("a blue square")
    rows = [
        EvalQuery("Ties", 0, red, (red, blue, red)),  # truth tied with a later duplicate: correct
        EvalQuery("Ties", 1, red, (blue, red, red)),  # best tied at 1 and 2: predicts 1, wrong
        EvalQuery("Ties", 2, blue, (blue, blue)),
    ]
    (score,) = evaluate(embedder, {"Ties": rows}, batch_size=BATCH, show_progress=False).values()
    np.testing.assert_array_equal(score.predictions, [0, 1, 0])
    assert (score.num_correct, score.num_pred, score.num_items, score.num_encoded) == (2, 3, 2, 2)


def test_bitwise_equal_vectors_of_distinct_sides_tie_exactly():
    # A model blind to pixels maps two images with one text to one vector: ranks must tie exactly,
    # wherever the two rows sit in the matrix product.
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[7] = vectors[3] = vectors[0]  # query 0's twin candidates
    candidates = np.array([[5, 3, 7, 9], [7, 3, 0, -1]])
    predictions = predict(vectors, np.array([0, 0]), candidates)
    np.testing.assert_array_equal(predictions, [1, 0])


def test_each_distinct_side_is_encoded_once(scores, queries):
    for name, rows in queries.items():
        distinct = {s for q in rows for s in (q.query, *q.candidates)}
        total = sum(1 + len(q.candidates) for q in rows)
        assert scores[name].num_items == scores[name].num_encoded == len(distinct) < total


def test_cache_hits_on_rerun_and_misses_for_changed_weights(tiny_ckpt, embedder, queries, scores, tmp_path):
    cache = tmp_path / "cache"
    first = evaluate(embedder, queries, batch_size=BATCH, cache_dir=cache, show_progress=False)
    distinct = {s for rows in queries.values() for q in rows for s in (q.query, *q.candidates)}
    assert sum(s.num_encoded for s in first.values()) == len(distinct)  # shared across datasets too
    reloaded = Embedder.from_pretrained(tiny_ckpt)
    rerun = evaluate(reloaded, queries, batch_size=BATCH, cache_dir=cache, show_progress=False)
    assert all(s.num_encoded == 0 for s in rerun.values())
    for name in queries:
        np.testing.assert_array_equal(rerun[name].predictions, scores[name].predictions)

    # the same files, one weight changed in memory: nothing from the old model may be reused
    model = load_pretrained(tiny_ckpt)
    model.language_model.norm.weight[...] = model.language_model.norm.weight[...] * 1.5
    changed = Embedder(model, embedder.text, embedder.image_config)
    again = evaluate(changed, queries, batch_size=BATCH, cache_dir=cache, show_progress=False)
    assert sum(s.num_encoded for s in again.values()) == len(distinct)
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


def test_a_rewritten_image_is_encoded_again(embedder, queries, tmp_path):
    rows = queries["SynEdit"]
    cache = tmp_path / "cache"
    evaluate(embedder, {"SynEdit": rows}, batch_size=BATCH, cache_dir=cache, show_progress=False)
    path = rows[0].query.image
    users = {s for q in rows for s in (q.query, *q.candidates) if s.image == path}
    stat = os.stat(path)
    try:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        score = evaluate(embedder, {"SynEdit": rows}, batch_size=BATCH, cache_dir=cache, show_progress=False)["SynEdit"]
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert score.num_encoded == len(users) >= 1


def test_fingerprint_covers_settings_that_change_vectors(tiny_ckpt, embedder):
    base = model_fingerprint(describe_model(embedder))
    assert model_fingerprint(describe_model(Embedder.from_pretrained(tiny_ckpt))) == base
    assert model_fingerprint(describe_model(Embedder.from_pretrained(tiny_ckpt, padding_side="left"))) == base
    chat = {"prompt_format": "qwen3_vl_embedding"}
    for options in ({"position_rule": "legacy"}, {"max_len": 64}, {"max_pixels": 56 * 56 * 4}, {"dtype": "bfloat16"}, chat,
                    {**chat, "instruction": "Find the caption."}):
        assert model_fingerprint(describe_model(Embedder.from_pretrained(tiny_ckpt, **options))) != base, options
    chat_fingerprint = model_fingerprint(describe_model(Embedder.from_pretrained(tiny_ckpt, **chat)))
    assert chat_fingerprint != model_fingerprint(describe_model(Embedder.from_pretrained(tiny_ckpt, **chat, instruction="Other.")))


@pytest.fixture
def bench_copy(bench: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "eval"
    shutil.copytree(bench, copy)
    return copy


def _first_use(rows: list[EvalQuery], path: str) -> tuple[int, str]:
    for q in rows:
        if q.query.image == path:
            return q.row, "qry_img_path"
        if any(c.image == path for c in q.candidates):
            return q.row, "tgt_img_path"
    raise AssertionError(path)


def test_missing_image_names_dataset_row_and_path(embedder, bench_copy):
    rows = read_mmeb_eval(bench_copy, ["SynCaption_t2i"])["SynCaption_t2i"]
    path = rows[3].candidates[2].image
    row, column = _first_use(rows, path)
    os.remove(path)
    with pytest.raises(BadDataError) as err:
        evaluate(embedder, {"SynCaption_t2i": rows}, batch_size=BATCH, show_progress=False)
    assert f"SynCaption_t2i row {row}, column '{column}'" in str(err.value)
    assert f"not found: {path}" in str(err.value)


def test_corrupt_image_names_dataset_row_and_path(embedder, bench_copy):
    rows = read_mmeb_eval(bench_copy, ["SynGround"])["SynGround"]
    path = rows[5].candidates[1].image
    row, column = _first_use(rows, path)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BadDataError) as err:
        evaluate(embedder, {"SynGround": rows}, batch_size=BATCH, show_progress=False)
    assert f"SynGround row {row}, column '{column}': cannot decode image file {path}" in str(err.value)


def test_cli_reports_a_missing_image_in_one_line(tiny_ckpt, bench_copy, tmp_path, capsys):
    rows = read_mmeb_eval(bench_copy, ["SynVQA"])["SynVQA"]
    os.remove(rows[2].query.image)
    argv = ["eval", "--config", CONFIG, f"--config.model={tiny_ckpt}", f"--config.data.root={bench_copy}",
            "--config.datasets=SynVQA,SynCls", f"--config.out={tmp_path / 'out'}", "--config.progress=False"]
    assert run_cli(eval_main, argv, command="vlm2vec_jax.eval", example_config=CONFIG) == 1
    err = capsys.readouterr().err.strip()
    assert "SynVQA row 2" in err and rows[2].query.image in err and "\n" not in err


def score(name: str, correct: int, total: int = 10) -> DatasetScore:
    return DatasetScore(name, correct, total, 0, 0, np.zeros(total, np.int64))


def test_summary_averages_over_datasets_as_b3_table_1(tmp_path):
    infos = {
        "A": DatasetInfo("A", "classification", "IND"),
        "B": DatasetInfo("B", "classification", "OOD"),
        "C": DatasetInfo("C", "retrieval", "IND"),
        "D": DatasetInfo("D", "vqa", "IND"),
    }
    summary = summarize({"D": score("D", 9), "C": score("C", 5, 20), "B": score("B", 2), "A": score("A", 4)}, infos)
    groups = {g: s.acc for g, s in summary.groups.items()}
    # unweighted means of dataset accuracies, not pooled counts (C has twice the queries)
    assert groups == pytest.approx(
        {"classification": 0.3, "vqa": 0.9, "retrieval": 0.25, "grounding": None, "IND": (0.4 + 0.25 + 0.9) / 3,
         "OOD": 0.2, "overall": (0.4 + 0.2 + 0.25 + 0.9) / 4}
    )
    assert list(summary.scores) == ["A", "B", "D", "C"]  # meta-task order, IND before OOD
    write_report(tmp_path, summary, model="tiny")
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[:4] == [
        "| Model | Ret. | Cla. | VQA | Gro. | ID | OOD | Avg. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| #Datasets | 1 | 2 | 1 | 0 | 3 | 1 | 4 |",
        "| tiny | 25.0 | 30.0 | 90.0 | - | 51.7 | 20.0 | 43.8 |",
    ]
    assert json.loads((tmp_path / "A_score.json").read_text()) == {"acc": 0.4, "num_correct": 4, "num_pred": 10}


def test_summary_needs_meta_task_and_split():
    with pytest.raises(ValueError, match="SynCls"):
        summarize({"SynCls": score("SynCls", 1)}, eval_datasets())  # no datasets.json root given
