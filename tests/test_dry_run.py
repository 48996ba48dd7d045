"""`--config.dry_run=True` through the real CLI: the VLM2Vec 2B recipe compiles for 8 simulated
devices from abstract shapes, and what it reports is checked against numbers derived by hand (the
parameter split, the step's matmul FLOPs, per-device memory with and without FSDP). Both compiles
run at once, one process each: ~2.5 minutes on 2 cores. On a profile (`data.profile`), a tiny
geometry's fixed and packed steps are compiled and their FLOPs checked against the analytic formula
and against trip counts packed here."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training_runs import REPO, finish, start, tail
from vlm2vec_jax.data.packing import PackBudget, pack_record
from vlm2vec_jax.data.profile_batches import draw_batches, shard_chunks
from vlm2vec_jax.data.profiles import resolve_profile
from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config
from vlm2vec_jax.processing.batching import ShapeSignature
from vlm2vec_jax.processing.image import raw_patch_dim
from vlm2vec_jax.training.dry_run import abstract_inputs, abstract_packed_batch, image_processor
from vlm2vec_jax.training.model_flops import FlopsModel
from vlm2vec_jax.training.sharding import batch_size_of, make_mesh

RECIPE = REPO / "configs/qwen2vl_2b_vlm2vec.py"
GIB = 2.0**30
TIMEOUT = 900


def recipe_config(path: Path = RECIPE):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def dry_run_command(workdir: Path, config: Path = RECIPE, **overrides: object) -> list[str]:
    values = {"dry_run": True, "workdir": workdir, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [sys.executable, "-m", "vlm2vec_jax.train", "--config", str(config), *(f"--config.{k}={v}" for k, v in values.items())]


def start_dry_run(command: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    """Start `command` with its output into the file `log` (training_runs.start)."""
    return start(command, dict(os.environ), log), log


def finish_dry_run(started: tuple[subprocess.Popen, Path], workdir: Path) -> dict:
    process, log = started
    code = finish(process, log, TIMEOUT)
    assert code == 0, f"exit code {code}:\n{tail(log)}"
    return json.loads((workdir / "dry_run.json").read_text())


def dora_parameters(g: Qwen2VLConfig, rank: int) -> int:
    """DoRA on q/k/v/o/gate/up/down: A (in x r) and B (r x out) per target, plus out magnitudes."""
    t = g.text
    h, kv, inter = t.hidden_size, t.num_kv_heads * t.head_dim, t.intermediate_size
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    return t.num_layers * sum(rank * (fan_in + fan_out) + fan_out for fan_in, fan_out in shapes)


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
    processes = {k: start_dry_run(command, tmp_path / f"{k}.log") for k, command in commands.items()}
    dp, fsdp = (finish_dry_run(processes[k], runs[k]) for k in ("dp", "fsdp"))

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

    # The analytic count (vlm2vec_jax/training/model_flops.py): every sequence padded to max_len with a 5120-patch image.
    expected = FlopsModel(geometry, rank=8, vision_passes=2).padded_step(
        sequences=c["batch_size"] + c["targets"], length=c["max_len"], patches=c["patches_per_image"]
    )
    assert dp["flops_per_step"] == pytest.approx(expected, rel=0.1)
    assert fsdp["flops_per_step"] == pytest.approx(dp["flops_per_step"], rel=0.01)  # same model FLOPs, other layout
    topology = dp["topology"]
    assert dp["projected_step_seconds"] == pytest.approx(
        dp["flops_per_step"] / (topology["devices"] * topology["peak_tflops"] * 1e12 * topology["mfu"])
    )

    # memory_analysis is per device: this device's batch rows, the frozen bf16 weights (whole when
    # replicated, 1/8 under FSDP), float32 adapters (likewise) and their two AdamW moments (ZeRO-2: 1/8).
    rows = (c["batch_size"] + c["targets"]) // 8
    # int32 ids, masks, image index and 3 rope rows per token; int32 positions and segment per patch;
    # uint8 pixels, one frame of C x P x P bytes per patch
    pixel_bytes = geometry.vision.in_channels * geometry.vision.patch_size**2
    batch = rows * (4 * (6 * c["max_len"] + 3 * c["patches_per_image"]) + c["patches_per_image"] * pixel_bytes) / GIB
    frozen, trained = dp["parameters"]["frozen_gib"], dp["parameters"]["trained_gib"]
    m_dp, m_fsdp = dp["memory_per_device"], fsdp["memory_per_device"]
    assert m_dp["arguments_gib"] == pytest.approx(batch + frozen + trained * (1 + 2 / 8), rel=0.01)
    assert m_fsdp["arguments_gib"] == pytest.approx(batch + (frozen + trained * 3) / 8, rel=0.01)
    assert m_fsdp["total_gib"] < m_dp["total_gib"]
    for report in (dp, fsdp):
        m = report["memory_per_device"]
        assert m["total_gib"] == pytest.approx(m["arguments_gib"] + m["outputs_gib"] - m["aliased_gib"] + m["temp_gib"])
        assert report["fits"] == (m["total_gib"] <= report["topology"]["device_memory_gib"])


@pytest.mark.slow
def test_dry_run_of_the_qwen3vl_2b_b3_recipe(tmp_path: Path) -> None:
    """configs/qwen3vl_2b_b3.py (`model.geometry=qwen3vl-2b`) compiles for 8 devices; its frozen
    parameters are those of transformers' Qwen3-VL model of the geometry's config.json (counted on
    the meta device, no weights) and its FLOPs the analytic formula's."""
    import torch
    from transformers import Qwen3VLConfig as HFQwen3VLConfig, Qwen3VLModel

    from vlm2vec_jax.models.qwen3_vl.geometries import qwen3vl_2b_config

    geometry = qwen3vl_2b_config()
    with torch.device("meta"):
        hf_parameters = sum(p.numel() for p in Qwen3VLModel(HFQwen3VLConfig(**geometry.to_hf_dict())).parameters())
    report = finish_dry_run(start_dry_run(dry_run_command(tmp_path / "run", REPO / "configs/qwen3vl_2b_b3.py"), tmp_path / "log"), tmp_path / "run")
    c = report["config"]
    assert c["patches_per_image"] == 5120  # 1280 x 32 x 32 pixels of 16-px patches: 1280 merged tokens
    assert report["parameters"]["frozen"] == hf_parameters
    assert report["parameters"]["trained"] == dora_parameters(geometry, rank=8)
    expected = FlopsModel(geometry, rank=8, vision_passes=2).padded_step(
        sequences=c["batch_size"] + c["targets"], length=c["max_len"], patches=c["patches_per_image"]
    )
    assert report["flops_per_step"] == pytest.approx(expected, rel=0.1)


def test_dry_run_without_a_geometry_says_what_to_set(tmp_path: Path) -> None:
    result = subprocess.run(
        dry_run_command(tmp_path, config=REPO / "configs/demo.py"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 1
    assert "model.geometry" in result.stderr and "'2b'" in result.stderr, result.stderr


# A small Qwen2-VL geometry (written as a config.json for model.init): compiles in seconds, with the
# recipe's everything else (DoRA, GradCache, remat, bf16, max_len 1536, 1280-token images).
TINY = Qwen2VLConfig(
    vision=VisionConfig(depth=2, embed_dim=128, num_heads=2, out_hidden_size=128),
    text=TextConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                    mrope_section=(8, 12, 12)),
)
TINY_BATCH = 64  # 8 queries + 8 targets per device: one padded GradCache chunk of 8


@pytest.fixture(scope="module")
def tiny_geometry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_geometry")
    (out / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    return out


@pytest.mark.slow
def test_packed_dry_run_on_the_builtin_profile(tmp_path: Path, tiny_geometry: Path) -> None:
    """The fixed-shape and the packed step on `data.profile=mmeb_shape` (one process each, at
    once): both count the same useful FLOPs on the same drawn batches; the packed step executes
    its fixed part plus a chunk's FLOPs per trip, at the trips its batches need as packed here,
    and wastes less than the fixed shapes."""
    runs = {k: tmp_path / k for k in ("fixed", "packed")}
    common = dict(model__init=tiny_geometry, train__batch_size=TINY_BATCH, data__profile="mmeb_shape")
    commands = {k: dry_run_command(runs[k], train__packing=k == "packed", **common) for k in runs}
    processes = {k: start_dry_run(command, tmp_path / f"{k}.log") for k, command in commands.items()}
    fixed, packed = (finish_dry_run(processes[k], runs[k]) for k in ("fixed", "packed"))
    assert (fixed["layout"], packed["layout"]) == ("fixed shapes", "packed")
    flops = FlopsModel(TINY, rank=8)  # the recipe's: DoRA r 8 with dropout, GradCache, remat
    # Fixed shapes: no chunk loop to count, and the formula's padded step (its tower runs in both passes).
    assert fixed["flops_per_trip"] == 0 and fixed["flops_executed"] == fixed["flops_fixed"]
    fixed_step = dataclasses.replace(flops, vision_passes=2).padded_step(sequences=2 * TINY_BATCH, length=1536, patches=5120)
    assert fixed["flops_executed"] == pytest.approx(fixed_step, rel=0.05)

    # The trips, packed here from the same draws with the trainer's pack_record; shard_map counts
    # a chunk loop once per device, so the mean over the 8 devices (one shard each).
    profile = resolve_profile("mmeb_shape")
    budget = PackBudget(**packed["packing"])
    batches = draw_batches(profile, queries=TINY_BATCH, hard_negatives=0, one_task=True, seed=0, max_len=1536, target_max_len=1536)
    assert {b.subset for b in batches} == set(profile.subsets) == set(packed["profile"]["per_subset"])
    trips = sum(b.weight * shard_chunks(b, budget, 8).mean() for b in batches)
    assert packed["flops_executed"] == pytest.approx(packed["flops_fixed"] + packed["flops_per_trip"] * trips, rel=1e-9)
    # A trip runs every row of the 8 devices' chunks in full, as if each row were one sequence whose
    # last layer computes every slot of the chunk; the tower once (its features kept for pass 2).
    chunk = budget.text_rows * flops.decoder(budget.text_len, pooled=budget.slots) + budget.vision_rows * flops.vision(budget.vision_patches)
    assert packed["flops_per_trip"] == pytest.approx(8 * chunk, rel=0.05)
    assert budget.text_len <= 1536 and budget.vision_patches <= 5120

    useful = sum(b.weight * flops.sequences(b.tokens, b.patches) for b in batches)
    for report in (fixed, packed):
        assert report["flops_useful"] == pytest.approx(useful, rel=1e-9)
        assert report["flops_ratio"] == pytest.approx(report["flops_executed"] / report["flops_useful"])
        t = report["topology"]
        assert report["step_seconds"] == pytest.approx(report["flops_executed"] / (t["devices"] * t["peak_tflops"] * 1e12 * t["mfu"]))
        assert report["recipe_hours"] == pytest.approx(2000 * report["step_seconds"] / 3600)
        assert report["memory_per_device"]["total_gib"] > 0
    print(f"\ntiny geometry, batch {TINY_BATCH}: executed / useful {fixed['flops_ratio']:.2f} fixed, {packed['flops_ratio']:.2f} packed")
    assert packed["flops_ratio"] < fixed["flops_ratio"] / 2


def test_a_bad_profile_is_an_error_naming_data_profile(tmp_path: Path) -> None:
    not_a_profile = tmp_path / "rows.json"
    not_a_profile.write_text(json.dumps({"rows": []}))
    for value, says in ((str(tmp_path / "missing.json"), "no such file"), (str(not_a_profile), "not a version-1")):
        with pytest.raises(ValueError, match="data.profile") as err:
            resolve_profile(value)
        assert says in str(err.value)
    result = subprocess.run(  # through the CLI: one line, before anything is compiled
        dry_run_command(tmp_path, data__profile=tmp_path / "missing.json"), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 1 and "data.profile" in result.stderr and "mmeb_shape" in result.stderr, result.stderr


def test_the_abstract_packed_batch_is_pack_records_layout() -> None:
    """What the dry run compiles for is what the trainer feeds: `pack_record`'s arrays, stacked
    over the mesh's device shards, with the pipeline's pixel dtype and patch size."""
    config = recipe_config()
    image = image_processor(config, qwen2vl_2b_config())
    mesh = make_mesh(-1, 1, 1)
    shards = batch_size_of(mesh)
    config.train.batch_size = 2 * shards
    budget = PackBudget(text_len=32, text_rows=2, vision_patches=16, vision_rows=2, slots=4, chunks=3)
    abstract = abstract_packed_batch(config, budget, image, mesh)
    pixels = abstract_inputs(1, ShapeSignature(1, 1, 1, 4), raw_patch_dim(image))["pixel_values"]
    record = {side: {k: np.zeros((3, 2, 8) if k == "position_ids" else (2, 8), np.int32) for k in
                     ("input_ids", "attention_mask", "position_ids", "image_token_index")} for side in ("query", "target")}
    for side in record.values():
        side.update(pixel_values=np.zeros((2, 8, pixels.shape[-1]), pixels.dtype), patch_positions=np.zeros((2, 8, 2), np.int32),
                    patch_segment_ids=np.zeros((2, 8), np.int32))
    real = pack_record(record, budget, shards=1, first_query=0, first_target=0, global_queries=2)["packed"]
    assert set(abstract["packed"]) == set(real)
    for name, x in real.items():
        assert abstract["packed"][name].shape == (shards, *x.shape[1:]) and abstract["packed"][name].dtype == x.dtype, name
    assert (abstract["valid"].shape, abstract["target_valid"].shape) == ((2 * shards,), (2 * shards,))
