"""Tensor parallelism by logical axes: every parameter names its axes, `LOGICAL_AXIS_RULES` puts
heads and MLP columns on 'tensor', and the fused projections are laid out so that split keeps
each device's attention groups and MLP columns whole. The proof is the compiled program: on a
2-way tensor mesh the forward of each backbone needs one all-reduce after each row-parallel
projection and nothing else (no gathers, no permutes), and equals the one-device forward."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from training_runs import xla_flags
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.logical_axes import axes_of
from vlm2vec_jax.training.sharding import param_spec
from vlm2vec_jax.training.state import param_shardings

SCRIPT = Path(__file__).parent / "scripts" / "tensor_parallel_check.py"


def run_check(checkpoint: Path, rules: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2)}
    done = subprocess.run([sys.executable, str(SCRIPT), str(checkpoint), rules], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_split_by_heads_needs_only_the_megatron_all_reduces(backbone_ckpt):
    result = run_check(backbone_ckpt, "model")
    specs = result["specs"]
    # q|k|v split by key/value head, o_proj by query head, gate|up and down by MLP column; the
    # vision tower's fused qkv by head too
    assert specs["language_model/layers/qkv_proj/kernel"] == [None, None, "tensor", None, None]
    assert specs["language_model/layers/o_proj/kernel"] == [None, "tensor", None, None]
    assert specs["language_model/layers/gate_up_proj/kernel"] == [None, None, None, "tensor"]
    assert specs["language_model/layers/down_proj/kernel"] == [None, "tensor", None]
    assert specs["visual/blocks/qkv/kernel"] == [None, None, None, "tensor", None]
    # 5 = after attention and MLP in the (scanned, once compiled) vision block and decoder layer,
    # and after the merger's MLP
    assert result["collectives"] == {"all-reduce": 5}, result["collectives"]
    assert result["max_diff"] < 1e-5 * result["scale"], result


def test_a_split_through_the_slot_axis_is_seen(tiny_ckpt):
    """The fault the layout prevents, injected: fused projections split along their slot axis
    (q heads on one device, k and v on the other; gate on one, up on the other, as a contiguous
    column split of [q|k|v] and [gate|up] did). Still correct, but the program now moves
    activations between devices, and the check above would fail on it."""
    result = run_check(tiny_ckpt, "slot")
    assert result["specs"]["language_model/layers/qkv_proj/kernel"] == [None, None, None, "tensor", None]
    assert set(result["collectives"]) - {"all-reduce"}, result["collectives"]
    assert result["max_diff"] < 1e-5 * result["scale"], result


def _mesh(fsdp: int, tensor: int) -> jax.sharding.AbstractMesh:
    return jax.sharding.AbstractMesh((1, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_param_spec_follows_the_axes_not_the_names():
    qkv = ("layers", "embed", "kv_heads", "fused", "head_dim")
    assert param_spec(qkv, (2, 64, 2, 4, 16), _mesh(1, 2)) == P(None, None, "tensor", None, None)
    # 4-way tensor parallelism over 2 key/value heads cannot keep groups whole: the leaf stays whole
    assert param_spec(qkv, (2, 64, 2, 4, 16), _mesh(1, 4)) == P(None, None, None, None, None)
    # fsdp takes the largest other even axis, never the scanned layer axis however large
    assert param_spec(qkv, (64, 32, 2, 4, 16), _mesh(2, 2)) == P(None, "fsdp", "tensor", None, None)
    assert param_spec(("vocab", "embed"), (100, 64), _mesh(2, 2)) == P("fsdp", None)


def test_every_variable_carries_its_axes_and_the_stack_adds_layers(backbone_ckpt):
    model = load_pretrained(backbone_ckpt)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        axes = axes_of(variable)
        assert axes is not None and len(axes) == variable.get_value().ndim, (path, axes)
        stacked = "layers" in path or "blocks" in path or "deepstack_mergers" in path
        assert (axes[0] == "layers") == stacked, (path, axes)


def test_a_variable_without_axes_is_a_clear_error():
    state = nnx.State({"w": nnx.Param(np.zeros((4, 4), np.float32))})
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="w carries no logical axes"):
        param_shardings(state, mesh)
