"""`--config.dry_run=True` through the real CLI: the VLM2Vec 2B recipe compiles for 8 simulated
devices from abstract shapes, and what it reports is checked against numbers derived by hand (the
parameter split, the step's matmul FLOPs, per-device memory with and without FSDP). Both compiles
run at once, one process each: ~2.5 minutes on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training_runs import REPO
from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig
from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config

RECIPE = REPO / "configs/qwen2vl_2b_vlm2vec.py"
GIB = 2.0**30
TIMEOUT = 900


def dry_run_command(workdir: Path, config: Path = RECIPE, **overrides: object) -> list[str]:
    values = {"dry_run": True, "workdir": workdir, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [sys.executable, "-m", "vlm2vec_jax.train", "--config", str(config), *(f"--config.{k}={v}" for k, v in values.items())]


def finish(process: subprocess.Popen, workdir: Path) -> dict:
    out, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, out
    return json.loads((workdir / "dry_run.json").read_text())


def dora_parameters(g: Qwen2VLConfig, rank: int) -> int:
    """DoRA on q/k/v/o/gate/up/down: A (in x r) and B (r x out) per target, plus out magnitudes."""
    t = g.text
    h, kv, inter = t.hidden_size, t.num_kv_heads * t.head_dim, t.intermediate_size
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    return t.num_layers * sum(rank * (fan_in + fan_out) + fan_out for fan_in, fan_out in shapes)


def step_flops(g: Qwen2VLConfig, *, sequences: int, length: int, patches: int, rank: int) -> float:
    """Matmul FLOPs of one GradCache step of the recipe (DoRA with dropout, remat, vision frozen).

    Decoder, per sequence: a forward is F = L T (2 W + R + 2 T h): the fused linears W once for
    base(x) and once more because DoRA with dropout multiplies the dropped input by the base
    kernel again, the rank-r adapters R, and attention's two T x T products over all heads (h).
    GradCache runs it in pass 1, again in pass 2, and remat recomputes it in the backward; the
    backward itself propagates only activations (frozen kernels get no gradient): B = L T (2 W +
    2 R + 4 T h). The vision tower has nothing to train behind it: two forwards (one per pass), no
    backward. The loss matrix is negligible."""
    t, v = g.text, g.vision
    h, kv, inter, layers = t.hidden_size, t.num_kv_heads * t.head_dim, t.intermediate_size, t.num_layers
    linears = h * (h + 2 * kv) + h * h + 2 * h * inter + inter * h
    adapters = rank * (2 * (h + h) + 2 * (h + kv) + 2 * (h + inter) + (inter + h))
    forward = layers * length * (2 * linears + adapters + 2 * length * h)
    backward = layers * length * (2 * linears + 2 * adapters + 4 * length * h)
    d = v.embed_dim
    merged = d * v.merge_units
    vision = (
        patches * v.patch_dim * d
        + v.depth * (patches * (4 * d * d + 2 * d * v.mlp_dim) + 2 * patches * patches * d)
        + patches // v.merge_units * (merged * merged + merged * h)
    )
    return 2.0 * sequences * (3 * forward + backward + 2 * vision)


@pytest.mark.slow
def test_dry_run_of_the_2b_recipe_on_8_devices(tmp_path: Path) -> None:
    """Data parallel (the recipe, `model.geometry=2b`) and 8-way FSDP compile side by side (one
    process each); the FSDP run takes the geometry from a model directory holding nothing but the
    2B's config.json (no weights, no tokenizer: a dry run reads nothing else)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(qwen2vl_2b_config().to_hf_dict()))
    runs = {"dp": tmp_path / "dp", "fsdp": tmp_path / "fsdp"}
    commands = {
        "dp": dry_run_command(runs["dp"]),
        "fsdp": dry_run_command(runs["fsdp"], mesh__fsdp=8, mesh__data=1, model__init=model_dir),
    }
    processes = {k: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k, command in commands.items()}
    dp, fsdp = (finish(processes[k], runs[k]) for k in ("dp", "fsdp"))

    geometry = qwen2vl_2b_config()
    c = dp["config"]
    assert c["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and fsdp["config"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert (c["batch_size"], c["targets"], c["gc_chunk_size"], c["gc_chunks_per_device"]) == (1024, 1024, 8, 16)
    assert c["patches_per_image"] == 5120  # VLM2Vec's 1280 x 28 x 28 pixel cap: 1280 merged tokens
    # Qwen2-VL-2B has 2.21B parameters (tied embeddings), frozen in bf16; DoRA r 8 trains the rest.
    assert dp["parameters"]["frozen"] == pytest.approx(2.209e9, rel=1e-3)
    assert dp["parameters"]["frozen_gib"] == pytest.approx(dp["parameters"]["frozen"] * 2 / GIB, rel=1e-3)
    assert dp["parameters"]["trained"] == dora_parameters(geometry, rank=8)
    assert fsdp["parameters"] == dp["parameters"]

    expected = step_flops(geometry, sequences=c["batch_size"] + c["targets"], length=c["max_len"], patches=c["patches_per_image"], rank=8)
    assert dp["flops_per_step"] == pytest.approx(expected, rel=0.1)
    assert fsdp["flops_per_step"] == pytest.approx(dp["flops_per_step"], rel=0.01)  # same model FLOPs, other layout
    topology = dp["topology"]
    assert dp["projected_step_seconds"] == pytest.approx(
        dp["flops_per_step"] / (topology["devices"] * topology["peak_tflops"] * 1e12 * topology["mfu"])
    )

    # memory_analysis is per device: this device's batch rows, the frozen bf16 weights (whole when
    # replicated, 1/8 under FSDP), float32 adapters (likewise) and their two AdamW moments (ZeRO-2: 1/8).
    rows = (c["batch_size"] + c["targets"]) // 8
    batch = rows * 4 * (6 * c["max_len"] + c["patches_per_image"] * (geometry.vision.patch_dim + 3)) / GIB
    frozen, trained = dp["parameters"]["frozen_gib"], dp["parameters"]["trained_gib"]
    m_dp, m_fsdp = dp["memory_per_device"], fsdp["memory_per_device"]
    assert m_dp["arguments_gib"] == pytest.approx(batch + frozen + trained * (1 + 2 / 8), rel=0.01)
    assert m_fsdp["arguments_gib"] == pytest.approx(batch + (frozen + trained * 3) / 8, rel=0.01)
    assert m_fsdp["total_gib"] < m_dp["total_gib"]
    for report in (dp, fsdp):
        m = report["memory_per_device"]
        assert m["total_gib"] == pytest.approx(m["arguments_gib"] + m["outputs_gib"] - m["aliased_gib"] + m["temp_gib"])
        assert report["fits"] == (m["total_gib"] <= report["topology"]["device_memory_gib"])


def test_dry_run_without_a_geometry_says_what_to_set(tmp_path: Path) -> None:
    result = subprocess.run(
        dry_run_command(tmp_path, config=REPO / "configs/demo.py"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 1
    assert "model.geometry" in result.stderr and "'2b'" in result.stderr, result.stderr
