"""GradCache and the contrastive loss.

The full jitted training step (GradCache scans, shard_map, ZeRO-2 reduce-scatter, LoRA+DoRA with
dropout on) must give the gradient of plain full-batch autodiff, for any chunking and on 1 or 8
devices (tests/scripts/gradcache_check.py, run in subprocesses so XLA_FLAGS can set the device
count), and on 8 devices its compiled program must reduce the gradients once, after the chunk loops
(tests/hlo_collectives.py). `infonce` is checked against a direct NumPy computation.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

from hlo_collectives import assert_gradients_reduced_once_after_the_loops
from training_runs import script_results
from vlm2vec_jax.training.loss import infonce, matryoshka_infonce, parse_matryoshka_dims

# Chunk sizes (queries per device per chunk) over the 16-query batch: 0 = no caching, 4 = four
# strided chunks of four rows. Each costs a compilation of the step (~15 s here), so 1, 2, 8 and
# 16 are left out on one device: one-row chunks and one chunk of several rows are covered on 8
# devices (chunks 1 and 2), through the same shard_map step.
ONE_DEVICE_CHUNKS = (0, 4)
# 8 devices: 2 queries per device, so chunk 1 = two chunks per device, 2 = one.
EIGHT_DEVICE_CHUNKS = (0, 1, 2)
TOLERANCE = 1e-6  # |error| / |gradient| over all leaves
# Per leaf, of its largest gradient entry: float32 sums in another order reach ~1e-6 on the smallest
# leaves (seen: 1.07e-6 on a DoRA magnitude), as in tests/test_training_packing.py.
LEAF_TOLERANCE = 5e-6


@pytest.fixture(scope="module")
def gradcache_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Both device counts at once (two processes, mostly single-threaded compilation)."""
    chunks = {1: ONE_DEVICE_CHUNKS, 8: EIGHT_DEVICE_CHUNKS}
    return script_results("gradcache_check.py", chunks, tmp_path_factory.mktemp("gradcache"), timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("devices,chunks", [(1, ONE_DEVICE_CHUNKS), (8, EIGHT_DEVICE_CHUNKS)])
def test_gradcache_step_matches_full_batch_autodiff(gradcache_results: dict, devices: int, chunks: tuple) -> None:
    result = gradcache_results[devices]
    assert result["devices"] == devices
    assert set(result["errors"]) == {str(c) for c in chunks}
    for chunk, r in result["errors"].items():
        assert r["global"] < TOLERANCE, f"{devices} device(s), gc chunk {chunk}: relative gradient error {r['global']}"
        # And leaf by leaf (tests/tree_compare.py), the worst one named: a wrong small leaf would be O(1).
        assert r["leaf_error"] < LEAF_TOLERANCE, (
            f"{devices} device(s), gc chunk {chunk}: relative gradient error {r['leaf_error']} at {r['leaf']}"
        )
    # The reference has dropout on: had the step dropped it (or drawn other masks), the error would
    # be of this size, so the check above does see dropout.
    assert result["dropout_effect"] > 1e-2


@pytest.mark.slow
def test_gradients_are_reduce_scattered_once_per_step_never_per_chunk(gradcache_results: dict) -> None:
    """The compiled 8-device step (shard_map, ZeRO-2): the chunk scans hold no all-reduce or
    reduce-scatter, and each gradient leaf is reduce-scattered (or, if too small to split, all-reduced)
    once after them. Without the step's `pcast` of the parameters to device-varying, shard_map would
    psum every parameter use inside the scans: this fails then."""
    # The parser sees this XLA's loops and reductions: a psum in a fori_loop, a psum_scatter after.
    canary = gradcache_results[8]["canary"]
    assert [op for op, *_ in canary["in_loop"]] == ["all-reduce"], canary
    assert [op for op, _ in canary["outside"]] == ["reduce-scatter"], canary
    reductions = gradcache_results[8]["reductions"]
    assert set(reductions) == {str(c) for c in EIGHT_DEVICE_CHUNKS}
    for chunk, summary in reductions.items():
        assert_gradients_reduced_once_after_the_loops(summary, f"8 devices, gc chunk {chunk}")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference(q, t, query_valid, target_valid, temperature):
    """InfoNCE as VLM2Vec states it, in float64: query i's positive is target i * n."""
    n = t.shape[0] // q.shape[0]
    logits = q.astype(np.float64) @ t.astype(np.float64).T / temperature
    logits[:, ~target_valid] = -np.inf
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    labels = np.arange(q.shape[0]) * n
    picked = log_probs[np.arange(q.shape[0]), labels]
    loss = -picked[query_valid].mean()
    accuracy = (logits.argmax(1) == labels)[query_valid].mean()
    return loss, accuracy


def test_infonce_matches_numpy_with_hard_negatives_and_masks() -> None:
    rng = np.random.default_rng(0)
    queries, per_query, dim, temperature = 4, 3, 16, 0.05  # n = 1 positive + 2 hard negatives
    q = _unit(rng.normal(size=(queries, dim)))
    t = _unit(rng.normal(size=(queries * per_query, dim)))
    for i in range(queries):  # every positive close to its query
        t[i * per_query] = _unit(q[i] + 0.1 * rng.normal(size=dim))
    t[2] = q[0]  # query 0's hard negative beats its positive, but is masked: query 0 still counts correct
    t[10] = q[3]  # query 3's hard negative beats its positive: query 3 is wrong
    t[4] = q[1]  # query 1 would be wrong, but query 1 is masked (bad data): it must not count
    query_valid = np.array([True, False, True, True])
    target_valid = np.ones(queries * per_query, bool)
    target_valid[2] = False
    target_valid[7] = False  # a hard negative of query 2

    loss, metrics = infonce(
        jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(query_valid), jnp.asarray(target_valid), temperature
    )
    expected_loss, expected_accuracy = _reference(q, t, query_valid, target_valid, temperature)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    assert expected_accuracy == pytest.approx(2 / 3)  # queries 0 and 2 right, 3 wrong, 1 not counted
    assert float(metrics["accuracy"]) == pytest.approx(expected_accuracy)
    assert float(metrics["valid_queries"]) == 3.0

    # The masks matter: unmasking the strong negative of query 0 raises the loss and lowers accuracy.
    unmasked = np.ones_like(target_valid)
    loss_all, metrics_all = infonce(
        jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(query_valid), jnp.asarray(unmasked), temperature
    )
    expected_all, accuracy_all = _reference(q, t, query_valid, unmasked, temperature)
    np.testing.assert_allclose(float(loss_all), expected_all, rtol=1e-5)
    assert float(loss_all) > float(loss) + 0.5
    assert accuracy_all == pytest.approx(1 / 3)
    assert float(metrics_all["accuracy"]) == pytest.approx(accuracy_all)

    # An invalid query adds nothing: its embedding can be anything (even NaN) without effect.
    q_bad = q.copy()
    q_bad[1] = np.nan
    loss_bad, metrics_bad = infonce(
        jnp.asarray(q_bad, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(query_valid), jnp.asarray(target_valid), temperature
    )
    np.testing.assert_allclose(float(loss_bad), float(loss), rtol=1e-6)
    assert float(metrics_bad["accuracy"]) == pytest.approx(2 / 3)


def test_infonce_one_target_per_query_is_in_batch_softmax() -> None:
    """n = 1: the classic in-batch-negatives loss, mean -log softmax of the diagonal."""
    rng = np.random.default_rng(1)
    q, t = _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(5, 8)))
    valid = np.ones(5, bool)
    loss, metrics = infonce(jnp.asarray(q), jnp.asarray(t), jnp.asarray(valid), jnp.asarray(valid), 0.1)
    logits = q @ t.T / 0.1
    diag = np.diag(logits) - np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(float(loss), -diag.mean(), rtol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == np.arange(5)))


def test_duplicate_targets_are_not_negatives_of_the_query_they_copy() -> None:
    """A repeated label in a batch: with content keys, query i's loss leaves out every other target
    equal to its positive (not a negative) and keeps everything else; without keys it is VLM2Vec's."""
    rng = np.random.default_rng(2)
    queries, dim, temperature = 6, 16, 0.05
    q = _unit(rng.normal(size=(queries, dim)))
    t = _unit(q + 0.3 * rng.normal(size=(queries, dim)))
    t[3] = t[0]  # query 3's positive is the same label as query 0's
    keys = np.array([10, 11, 12, 10, 14, 15], np.int32)
    valid = np.ones(queries, bool)
    args = (jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(valid), jnp.asarray(valid), temperature)
    loss, metrics = infonce(*args, jnp.asarray(keys))

    logits = q.astype(np.float64) @ t.astype(np.float64).T / temperature
    per_query = []
    for i in range(queries):
        keep = (keys != keys[i]) | (np.arange(queries) == i)
        row = logits[i, keep]
        per_query.append(np.log(np.exp(row - row.max()).sum()) + row.max() - logits[i, i])
    np.testing.assert_allclose(float(loss), np.mean(per_query), rtol=1e-5)
    # Queries 0 and 3 tie with their copy when it is a negative: both count correct only with keys.
    assert float(metrics["accuracy"]) == pytest.approx(float(np.mean(logits.argmax(1) == np.arange(queries))) + 1 / queries)
    plain_loss, _ = infonce(*args)
    assert float(plain_loss) > float(loss) + 0.05
    # Unique keys change nothing.
    unique_loss, _ = infonce(*args, jnp.arange(queries, dtype=jnp.int32))
    np.testing.assert_allclose(float(unique_loss), float(plain_loss), rtol=1e-6)


def test_matryoshka_loss_adds_infonce_on_each_renormalised_prefix() -> None:
    """Qwen3-VL-Embedding's Matryoshka training: the full width's InfoNCE plus each prefix's,
    against the float64 reference on prefixes renormalised by hand; metrics stay the full width's."""
    rng = np.random.default_rng(2)
    q, t = _unit(rng.normal(size=(6, 32))), _unit(rng.normal(size=(12, 32)))
    t[::2] = _unit(q + 0.5 * rng.normal(size=q.shape))
    valid, target_valid = np.ones(6, bool), np.ones(12, bool)
    args = (jnp.asarray(q, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(valid), jnp.asarray(target_valid), 0.05)
    loss, metrics = matryoshka_infonce(*args, dims=parse_matryoshka_dims("16, 4,8"))
    expected = sum(_reference(_unit(q[:, :d]), _unit(t[:, :d]), valid, target_valid, 0.05)[0] for d in (4, 8, 16, 32))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(_reference(q, t, valid, target_valid, 0.05)[1])
    np.testing.assert_allclose(float(matryoshka_infonce(*args)[0]), float(infonce(*args)[0]), rtol=0)
    with pytest.raises(ValueError, match="train.matryoshka_dims: 32 is not below the embedding width 32"):
        matryoshka_infonce(*args, dims=(32,))
    with pytest.raises(ValueError, match="train.matryoshka_dims='64,x': give comma-separated integers"):
        parse_matryoshka_dims("64,x")
