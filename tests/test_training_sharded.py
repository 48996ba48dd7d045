"""The same training run on 8 simulated devices gives what it gives on one: per-step losses and final
parameters, for pure data parallelism with GradCache (shard_map, ZeRO-2 reduce-scatter) and for a
mesh that shards the parameters too (data 2 x fsdp 2 x tensor 2, XLA's partitioner), with packed
sequences (the default with GradCache) and fixed shapes. The 8-device
checkpoints are restored onto one device (orbax reshards), which is itself part of the check."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from training_runs import assert_same_training, final_losses, flat_numpy, metrics, restore_latest, run_config, shared_runs

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    names = ("baseline_1dev", "dp8_gc1", "fixed_dp8_gc1", "fsdp2_tp2", "packed_fsdp2_tp2")
    return dict(zip(names, shared_runs(tmp_path_factory, *names)))


@pytest.fixture(scope="module")
def baseline_state(runs):
    return restore_latest(runs["baseline_1dev"])


def _per_step(workdir, key: str) -> np.ndarray:
    return np.array([line[key] for line in metrics(workdir) if key in line])


def _sharding_record(workdir) -> dict[str, dict]:
    """Leaf path ('params.language_model...') -> the sharding its array had when the run saved its
    latest checkpoint, from the record orbax keeps beside the arrays."""
    latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    record = json.loads((workdir / "checkpoints" / str(latest) / "state" / "_sharding").read_text())
    return {base64.b64decode(k).decode().removesuffix(".value"): json.loads(v) for k, v in record.items()}


def _saved_layout(workdir) -> dict[str, list]:
    """Leaf path -> the PartitionSpec its array had in the latest checkpoint."""
    return {k: v["partition_spec"] for k, v in _sharding_record(workdir).items()}


def _saved_mesh_shape(workdir) -> tuple[int, ...]:
    """The (data, fsdp, tensor) device mesh every array of the latest checkpoint was saved from."""
    shapes = {tuple(v["shape"]) for v in _sharding_record(workdir).values()}
    assert len(shapes) == 1, shapes
    return shapes.pop()


MESHES = {"baseline_1dev": (1, 1, 1), "dp8_gc1": (8, 1, 1), "fixed_dp8_gc1": (8, 1, 1), "fsdp2_tp2": (2, 2, 2), "packed_fsdp2_tp2": (2, 2, 2)}


# GradCache on, train.packing at its default -> the padded step's chunks per device shard (8 queries
# over 8 and over 4 shards, chunks of 1); a packed step may fill up to twice as many.
PACKED_RUNS = {"dp8_gc1": 1, "packed_fsdp2_tp2": 2}


@pytest.mark.parametrize("name", ["dp8_gc1", "fixed_dp8_gc1", "fsdp2_tp2", "packed_fsdp2_tp2"])
def test_eight_devices_match_one_device(runs, baseline_state, name: str) -> None:
    workdir = runs[name]
    # The run did use its 8 devices (the mesh its state lived on), and every step still trained on
    # the whole global batch (the valid queries the loss counted, summed over the devices).
    assert _saved_mesh_shape(workdir) == MESHES[name] and _saved_mesh_shape(runs["baseline_1dev"]) == MESHES["baseline_1dev"]
    np.testing.assert_array_equal(_per_step(workdir, "valid_queries"), _per_step(runs["baseline_1dev"], "valid_queries"))
    assert run_config(workdir).train.batch_size == _per_step(workdir, "valid_queries").max()
    # Which step ran: a packed one logs the chunks its devices filled (fewer than its capacity here:
    # short synthetic sequences), a fixed-shape one does not.
    chunks = _per_step(workdir, "packed_chunks")
    if name in PACKED_RUNS:
        assert len(chunks) == len(metrics(workdir)) and 1 <= chunks.min() and chunks.max() <= 2 * PACKED_RUNS[name]
    else:
        assert len(chunks) == 0
    expected, got = final_losses(runs["baseline_1dev"]), final_losses(workdir)
    np.testing.assert_allclose(got, expected, rtol=LOSS_RTOL)
    assert len(set(np.round(expected, 3))) > 3  # the losses do move: the comparison is not of constants
    # The gradient's size too (Adam would hide a gradient scaled by the device count).
    np.testing.assert_allclose(_per_step(workdir, "grad_norm"), _per_step(runs["baseline_1dev"], "grad_norm"), rtol=1e-4)

    step, state, _ = restore_latest(workdir)
    base_step, base, _ = baseline_state
    assert step == base_step == int(state.step)
    a, b = flat_numpy(base.params), flat_numpy(state.params)
    assert a.keys() == b.keys()
    # Per leaf, against how far the 8 steps moved it (not an absolute tolerance of the size of the
    # movement itself); the attention key biases, whose gradient is rounding noise, more loosely.
    assert_same_training(b, a, workdir, what=f"{name} parameters against 1 device")


def test_the_runs_really_use_their_layouts(runs) -> None:
    """What the comparison above covers: ZeRO-2 (parameters replicated, optimizer moments split
    over the batch axes) and, on the (2, 2, 2) mesh, parameters split over fsdp and tensor."""
    dp = _saved_layout(runs["dp8_gc1"])
    params = {k: v for k, v in dp.items() if k.startswith("params.")}
    assert params and all(all(axis is None for axis in spec) for spec in params.values()), params
    assert any(["data", "fsdp"] in spec for k, spec in dp.items() if k.startswith("opt_state.")), dp

    sharded = _saved_layout(runs["fsdp2_tp2"])
    layers = "params.language_model.layers"
    # (layers, embed, kv_heads, q|k|v slot, head_dim): column-parallel by key/value head
    assert sharded[f"{layers}.qkv_proj.kernel"] == [None, "fsdp", "tensor", None, None]
    # (layers, heads, head_dim, embed): row-parallel by query head
    assert sharded[f"{layers}.o_proj.kernel"] == [None, "tensor", None, "fsdp"]
    assert sharded["params.language_model.embed_tokens.embedding"] == ["fsdp", None]
