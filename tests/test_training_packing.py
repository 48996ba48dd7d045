"""Sequence packing: the host layout (data/packing.py) and the packed training step.

The step on packed chunks must equal the padded step on the same batch (loss, metrics, every
gradient leaf at relative 1e-6 in float32) with hard negatives, LoRA+DoRA dropout, a duplicate
target and a bad row, with and without GradCache, on 1 and 8 devices (every leaf within 5e-6)
(tests/scripts/packing_check.py in subprocesses). The same script injects one fault at a time
(a row's segments merged, 1-D positions instead of M-RoPE, the pooled index off by one, dropout
keyed by the row position) and each must move the gradients far beyond that tolerance.
"""

from __future__ import annotations


import jax
import numpy as np
import optax
import pytest

from hlo_collectives import assert_gradients_reduced_once_after_the_loops
from train_fixtures import contrastive_batch, perturbed_dora
from training_runs import script_results
from vlm2vec_jax.batch import MERGE_UNITS
from vlm2vec_jax.data.packing import PackBudget, PackingError, pack_record
from vlm2vec_jax.processing.image import ImageProcessorConfig
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint
from vlm2vec_jax.training.forward import make_embed_factory, make_vision_factory
from vlm2vec_jax.training.packed_gradcache import packed_chunk
from vlm2vec_jax.training.placement import device_batch, place
from vlm2vec_jax.training.sharding import batch_size_of, make_mesh
from vlm2vec_jax.training.state import abstract_train_state, init_train_state, param_shardings
from vlm2vec_jax.training.step import StepOptions, make_train_step
from vlm2vec_jax.training.throughput import StepFlops, matmul_flops

TOLERANCE = 1e-6
LEAF_TOLERANCE = 5e-6
ONE_DEVICE_CHUNKS = (0, 4)
EIGHT_DEVICE_CHUNKS = (0, 1)
QUERIES, HARD_NEGATIVES, LENGTH = 8, 1, 48


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", max_pixels=56 * 56 * 4)
    record = contrastive_batch(checkpoint, QUERIES, HARD_NEGATIVES, length=LENGTH)
    record["rows"] = np.arange(100, 100 + QUERIES)
    return record


def budget(shards: int, gc_chunks: int, **changes) -> PackBudget:
    default = PackBudget.covering(
        queries=QUERIES // shards, targets=QUERIES * (1 + HARD_NEGATIVES) // shards, query_len=LENGTH, target_len=LENGTH,
        patches_per_row=32, query_images=True, target_images=True, gc_chunks=gc_chunks,
    )
    return PackBudget(**{**default.__dict__, **changes})


def sequences(record: dict) -> dict[int, dict]:
    """Each real padded sequence by global example id: tokens, positions, image patches per token."""
    out = {}
    for side, offset in (("query", 0), ("target", QUERIES)):
        inputs = record[side]
        merged = inputs["pixel_values"].reshape(-1, MERGE_UNITS, inputs["pixel_values"].shape[-1])
        for row in range(inputs["input_ids"].shape[0]):
            tokens = np.flatnonzero(inputs["attention_mask"][row])
            index = inputs["image_token_index"][row, tokens]
            out[offset + row] = {
                "ids": inputs["input_ids"][row, tokens],
                "positions": inputs["position_ids"][:, row, tokens],
                "pixels": merged[index[index >= 0]],
            }
    return out


def unpacked(record: dict, budget: PackBudget) -> dict[int, dict]:
    """The sequences read back from the packed layout, through its segment ids and indices."""
    p = record["packed"]
    out = {}
    for shard in range(p["input_ids"].shape[0]):
        for c in range(p["num_chunks"][shard]):
            merged = p["pixel_values"][shard, c].reshape(-1, MERGE_UNITS, p["pixel_values"].shape[-1])
            flat = {k: p[k][shard, c].reshape(-1) for k in ("input_ids", "attention_mask", "image_token_index", "token_example", "token_position")}
            positions = p["position_ids"][shard, c].reshape(3, -1)
            for slot, example in enumerate(p["slot_example"][shard, c]):
                if example < 0:
                    continue
                last = p["pool_index"][shard, c, slot]
                row_start = last - last % budget.text_len
                segment = flat["attention_mask"][last]
                tokens = row_start + np.flatnonzero(flat["attention_mask"][row_start : last + 1] == segment)
                assert (flat["token_example"][tokens] == example).all()
                np.testing.assert_array_equal(flat["token_position"][tokens], np.arange(len(tokens)))
                index = flat["image_token_index"][tokens]
                assert example not in out, f"example {example} packed twice"
                out[int(example)] = {"ids": flat["input_ids"][tokens], "positions": positions[:, tokens], "pixels": merged[index[index >= 0]]}
    return out


@pytest.mark.parametrize("shards,gc_chunks", [(1, 0), (1, 2), (2, 2)])
def test_packing_keeps_every_sequence_whole(batch: dict, shards: int, gc_chunks: int) -> None:
    b = budget(shards, gc_chunks)
    packed = pack_record(batch, b, shards=shards, first_query=0, first_target=0, global_queries=QUERIES)
    assert "query" not in packed and packed["rows"] is batch["rows"]
    expected, got = sequences(batch), unpacked(packed, b)
    assert sorted(got) == sorted(expected)
    for example, seq in expected.items():
        for key in ("ids", "positions", "pixels"):
            np.testing.assert_array_equal(got[example][key], seq[key], err_msg=f"example {example} {key}")
    # Packing saves rows: the padded layout spends one text row per sequence.
    used_rows = sum(int((packed["packed"]["attention_mask"][s, c] > 0).any(axis=-1).sum())
                    for s in range(shards) for c in range(packed["packed"]["num_chunks"][s]))
    assert used_rows < len(expected) / 2


def test_examples_of_a_shard_stay_on_its_device(batch: dict) -> None:
    packed = pack_record(batch, budget(2, 2), shards=2, first_query=0, first_target=0, global_queries=QUERIES)
    per_q, per_t = QUERIES // 2, QUERIES * (1 + HARD_NEGATIVES) // 2
    for shard in range(2):
        ids = packed["packed"]["slot_example"][shard]
        ids = ids[ids >= 0]
        queries, targets = ids[ids < QUERIES], ids[ids >= QUERIES] - QUERIES
        assert set(queries) == set(range(shard * per_q, (shard + 1) * per_q))
        assert set(targets) == set(range(shard * per_t, (shard + 1) * per_t))


def test_empty_slots_take_no_room(batch: dict) -> None:
    record = {**batch, "target": {k: v.copy() for k, v in batch["target"].items()}}
    record["target"]["attention_mask"][3] = 0
    packed = pack_record(record, budget(1, 2), shards=1, first_query=0, first_target=0, global_queries=QUERIES)
    assert QUERIES + 3 not in packed["packed"]["slot_example"]


def test_a_sequence_over_the_row_budget_names_its_row_and_key(batch: dict) -> None:
    with pytest.raises(PackingError, match=r"planned training row 10\d has \d+ tokens, over train.pack_text_len=8"):
        pack_record(batch, budget(1, 2, text_len=8), shards=1, first_query=0, first_target=0, global_queries=QUERIES)


def test_a_batch_over_capacity_names_the_key_to_raise(batch: dict) -> None:
    with pytest.raises(PackingError, match="more than train.pack_chunks=1 packed chunks"):
        pack_record(batch, budget(1, 2, text_rows=1, chunks=1), shards=1, first_query=0, first_target=0, global_queries=QUERIES)


def test_a_frozen_tower_runs_once_per_packed_chunk(tiny_ckpt_qwen3_vl) -> None:
    """With the vision tower frozen, packed GradCache's second pass reads the image features and
    DeepStack levels its first pass kept (Qwen3-VL has both; Qwen2-VL's features alone are checked
    by packing_check's packed-against-padded step): the step's matmul FLOPs per chunk trip fall by
    exactly one forward of the tower over a chunk, and its gradients equal the step that runs it
    twice."""
    checkpoint = tiny_ckpt_qwen3_vl
    record = contrastive_batch(checkpoint, QUERIES, HARD_NEGATIVES, length=LENGTH)
    record["rows"] = np.arange(QUERIES)
    image_config = ImageProcessorConfig.from_pretrained_dir(checkpoint)
    graphdef, params, frozen = perturbed_dora(checkpoint)
    mesh = make_mesh(-1, 1, 1)
    shards = batch_size_of(mesh)
    b = budget(shards, 2, vision_patches=record["query"]["patch_segment_ids"].shape[1])
    packed = pack_record(record, b, shards=shards, first_query=0, first_target=0, global_queries=QUERIES)
    sgd = optax.sgd(1.0)
    abstract = abstract_train_state(params, sgd, mesh)
    make_vision = make_vision_factory(graphdef, image_config=image_config)
    inputs = (abstract, place(frozen, param_shardings(frozen, mesh)), device_batch(packed, mesh), jax.random.key(0))

    def step(vision):
        return make_train_step(
            make_embed_factory(graphdef, dropout=True, image_config=image_config), sgd, optax.constant_schedule(1.0),
            StepOptions(0.05, QUERIES // shards // 2), mesh, abstract, param_shardings(frozen, mesh), packed, vision,
        ).trace(*inputs)

    traced = {"twice": step(None), "once": step(make_vision)}
    per_trip = {name: StepFlops.of(t.jaxpr.jaxpr).per_trip for name, t in traced.items()}
    tower = jax.make_jaxpr(lambda p, arrays: make_vision(frozen)(p, packed_chunk(arrays, 0)))(params, packed["packed"])
    tower_flops = matmul_flops(tower.jaxpr)
    assert tower_flops > 0
    assert per_trip["twice"] - per_trip["once"] == pytest.approx(tower_flops, rel=1e-9)

    grads = {}
    for name, t in traced.items():
        state = init_train_state(place(params, jax.tree.map(lambda a: a.sharding, abstract.params)), sgd, abstract)
        after, _ = t.lower().compile()(state, *inputs[1:])
        grads[name] = jax.tree.map(lambda before, new: np.asarray(before) - np.asarray(new), params, after.params)
    for once, twice in zip(jax.tree.leaves(grads["once"]), jax.tree.leaves(grads["twice"])):
        np.testing.assert_allclose(once, twice, rtol=0, atol=1e-6 * max(float(np.abs(twice).max()), 1e-30))


@pytest.fixture(scope="module")
def step_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    chunks = {1: ONE_DEVICE_CHUNKS, 8: EIGHT_DEVICE_CHUNKS}
    return script_results("packing_check.py", chunks, tmp_path_factory.mktemp("packing"), timeout=1500)


@pytest.mark.slow
@pytest.mark.parametrize("devices,chunks", [(1, ONE_DEVICE_CHUNKS), (8, EIGHT_DEVICE_CHUNKS)])
def test_packed_step_equals_the_padded_step(step_results: dict, devices: int, chunks: tuple) -> None:
    result = step_results[devices]
    assert result["devices"] == devices and set(result["chunks"]) == {str(c) for c in chunks}
    for chunk, r in result["chunks"].items():
        assert r["gradient"] < TOLERANCE, f"{devices} device(s), gc chunk {chunk}: gradient error {r['gradient']}"
        # Per leaf, float32 sums in another order reach ~1e-6 on the smallest leaves; a wrong leaf is O(1).
        assert r["worst_leaf"] < LEAF_TOLERANCE, f"{devices} device(s), gc chunk {chunk}: a leaf is off by {r['worst_leaf']}"
        for name, error in r["metrics"].items():
            assert error < TOLERANCE, f"{devices} device(s), gc chunk {chunk}: {name} differs by {error}"
        assert max(r["num_chunks"]) <= r["capacity"]
    for fault, error in result["faults"].items():
        assert error > 1e-3, f"injected fault {fault!r} went unseen (gradient error {error})"


@pytest.mark.slow
def test_packed_gradients_are_reduce_scattered_once_per_step_never_per_chunk(step_results: dict) -> None:
    """The compiled 8-device packed step: its chunk loops (fori_loops of a traced trip count) hold no
    all-reduce or reduce-scatter (the embedding buffer is summed between the passes), and each
    gradient leaf is reduced once after them (tests/hlo_collectives.py)."""
    for chunk, r in step_results[8]["chunks"].items():
        assert_gradients_reduced_once_after_the_loops(r["reductions"], f"packed, 8 devices, gc chunk {chunk}")


@pytest.mark.slow
def test_a_run_sized_by_a_profile_trains_packed(tmp_path, tmp_path_factory) -> None:
    """`data.profile` sizes the trainer's packed chunks as it sizes the dry run's: a profile of the
    run's own training set (the profile command's API) gives rows as long as its longest sequence,
    not `model.max_len`, and every step's batch fits them."""
    from training_runs import environment, metrics, run_ok, shared_dirs, tail, train_command
    from vlm2vec_jax.cli_config import parse_config
    from vlm2vec_jax.data.profile import load_profile, profile_train_set, write_profile
    from vlm2vec_jax.data.profiles import resolve_profile

    shared = shared_dirs(tmp_path_factory)
    max_len = 96  # well above the small scale's longest sequence: rows are 16-token aligned
    extra = {"train__gc_chunk_size": 2, "train__steps": 3, "checkpoint__every": 0, "model__max_len": max_len}
    command = train_command(tmp_path / "run", shared, **extra)
    config = parse_config(["train", *command[command.index("--config") :]], usage="train")
    path = write_profile(profile_train_set(config), tmp_path / "profile.json")
    longest = max(int(load_profile(path).lengths(side).max()) for side in ("query", "target"))
    assert longest + 16 <= max_len  # else the profile could not shorten the rows
    log = tmp_path / "run.log"
    run_ok([*command, f"--config.data.profile={path}"], environment(shared), log)
    text = tail(log, 100_000)
    assert f"packing (from data.profile={path})" in text, text[-3000:]
    row = int(text.split("text rows x ")[1].split(" tokens")[0])
    assert longest <= row < max_len
    assert [line["step"] for line in metrics(tmp_path / "run")] == [1, 2, 3]
    assert all(line["packed_chunks"] >= 1 for line in metrics(tmp_path / "run"))
    # data.profile=train: the trainer profiles its own training set, the same profile as the file's
    own, written = resolve_profile("train", config), load_profile(path)
    assert (own.subsets, own.total) == (written.subsets, written.total)
