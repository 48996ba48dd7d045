"""`--config.dry_run=True`: will this recipe fit, and how long will a step take, on hardware we do
not have? The real training step is compiled for the target's mesh on simulated CPU devices, from
abstract shapes only (no weights are created, no data is read), and the compiler's per-device memory,
the step's matmul FLOPs and a projected step time are reported (and written to workdir/dry_run.json).

Without `data.profile` the batch is the worst case the fixed shapes pay every step (every sequence
`max_len` tokens, a largest image on every one) and `flops_executed` is that step's count. With a
profile (`data/profiles`), representative one-task batches are drawn from it
(`data/profile_batches.py`) and `flops_useful` says what the model computes for those sequences
each alone (`model_flops.py`); with `train.packing` the step compiled is the packed one, its budget
from the profile (`data/profile_budget.py`, `train.pack_*` winning where set), and its executed
FLOPs count each chunk loop as many times as the drawn batches fill chunks. Every FLOP figure is the
expectation over the subsets, each weighted by its share of training rows.

The model, adapters, trainable/frozen split, optimizer, state layout and step are the training
run's own (`trainable.add_adapters`, `trainable.split_for_training`, `optimizer.optimization`,
`state.abstract_train_state`, `compiled_step.compile_step`); only the weights and the batch are shapes here. Caveats the numbers carry:
the compile is XLA's CPU backend, so memory is its buffer assignment (attention scores are
materialised; a GPU build with fused attention needs less, and adds its own workspace and runtime
context), and the projection assumes an MFU rather than measuring one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vlm2vec_jax.batch import MERGE_UNITS, ModelInputs
from vlm2vec_jax.data.packing import PackBudget
from vlm2vec_jax.data.pipeline import vision_row_patches
from vlm2vec_jax.data.profile import Profile
from vlm2vec_jax.data.profile_batches import LengthBatch, draw_batches, shard_chunks
from vlm2vec_jax.data.profiles import resolve_profile
from vlm2vec_jax.models.backbones import GEOMETRIES, ModelConfig, build_model, read_config
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel
from vlm2vec_jax.processing.batching import ShapeSignature
from vlm2vec_jax.processing.image import ImageProcessorConfig, raw_patch_dim
from vlm2vec_jax.training.compiled_step import CompiledStep, compile_step
from vlm2vec_jax.training.model_flops import FlopsModel
from vlm2vec_jax.training.pack_budget import profile_budget
from vlm2vec_jax.training.model_init import RANDOM, init_dirs
from vlm2vec_jax.training.optimizer import optimization
from vlm2vec_jax.training.packed_gradcache import executed_trips
from vlm2vec_jax.training.sharding import batch_sharding, batch_size_of, make_mesh, uses_shard_map
from vlm2vec_jax.training.state import abstract_train_state, param_shardings
from vlm2vec_jax.training.step import MASKS, PACKED, SIDES
from vlm2vec_jax.training.trainable import add_adapters, master_weights, split_for_training

GIB = 2.0**30
REPORT_FILE = "dry_run.json"


def simulate_devices(count: int) -> None:
    """Make the CPU backend expose `count` devices. Must run before JAX initialises a backend: after
    that the device count is fixed, so this fails loudly instead of compiling for the wrong mesh."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(count))
    if jax.device_count() != count:
        raise ValueError(
            f"topology.devices={count} but JAX already initialised {jax.device_count()} devices; "
            "start the dry run in a fresh process (python -m vlm2vec_jax.train ... --config.dry_run=True)"
        )


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The geometry to compile: a Hugging Face `model.init`'s config.json (nothing else is read),
    else the named real geometry `model.geometry`."""
    m = config.model
    options = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention=m.attention)
    if m.init and m.init != RANDOM:
        return read_config(init_dirs(m.init)[0], **options)  # a PEFT adapter: its base's
    if m.geometry not in GEOMETRIES:
        raise ValueError(
            f"a dry run needs the real geometry: set model.geometry to one of {sorted(GEOMETRIES)} "
            f"(got {m.geometry!r}) or model.init to a Hugging Face directory of a supported backbone (only its config.json is read)"
        )
    return GEOMETRIES[m.geometry](**options)


def abstract_inputs(rows: int, signature: ShapeSignature, patch_dim: int) -> ModelInputs:
    """ShapeDtypeStructs of a training `ModelInputs` (layout and dtypes: `vlm2vec_jax.batch`;
    pixels are the pipeline's uint8 patches of `patch_dim` = C * P * P)."""
    length, v, r = signature.length, signature.vision_rows, signature.patches_per_row
    i32 = jnp.int32
    return {
        "input_ids": jax.ShapeDtypeStruct((rows, length), i32),
        "attention_mask": jax.ShapeDtypeStruct((rows, length), i32),
        "position_ids": jax.ShapeDtypeStruct((3, rows, length), i32),
        "image_token_index": jax.ShapeDtypeStruct((rows, length), i32),
        "pixel_values": jax.ShapeDtypeStruct((v, r, patch_dim), jnp.uint8),
        "patch_positions": jax.ShapeDtypeStruct((v, r, 2), i32),
        "patch_segment_ids": jax.ShapeDtypeStruct((v, r), i32),
    }


def image_processor(config: ml_collections.ConfigDict, model: ModelConfig) -> ImageProcessorConfig:
    """The image processor the training pipeline would use for `model`'s vision tower."""
    v = model.vision
    return ImageProcessorConfig(
        min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels, patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
    )


def abstract_batch(config: ml_collections.ConfigDict, model: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """The global batch the pipeline would feed, as sharded ShapeDtypeStructs: every query padded
    to `model.max_len` and every target to `model.target_max_len`, and (MMEB's worst case, which the fixed shapes pay every step) an image on
    every query and target, each in its own vision row of the largest image `max_pixels` allows."""
    image = image_processor(config, model)
    query_len, target_len = config.model.max_len, config.model.target_max_len or config.model.max_len
    patches = vision_row_patches(image, min(query_len, target_len))
    queries = config.train.batch_size
    targets = queries * (1 + config.train.hard_negatives)
    sides = {
        "query": abstract_inputs(queries, ShapeSignature(queries, query_len, queries, patches), raw_patch_dim(image)),
        "target": abstract_inputs(targets, ShapeSignature(targets, target_len, targets, patches), raw_patch_dim(image)),
    }
    batch = {side: {k: _placed(mesh, k, x) for k, x in sides[side].items()} for side in SIDES}
    return {**batch, **_masks(mesh, queries, targets)}


def _placed(mesh: Mesh, key: str, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, key, x.ndim))


def _masks(mesh: Mesh, queries: int, targets: int) -> dict[str, jax.ShapeDtypeStruct]:
    masks = {
        "valid": jax.ShapeDtypeStruct((queries,), jnp.bool_),
        "target_valid": jax.ShapeDtypeStruct((targets,), jnp.bool_),
        "target_key": jax.ShapeDtypeStruct((targets,), jnp.int32),
    }
    return {m: _placed(mesh, m, masks[m]) for m in MASKS}


def abstract_packed_batch(
    config: ml_collections.ConfigDict, budget: PackBudget, image: ImageProcessorConfig, mesh: Mesh
) -> dict[str, Any]:
    """The packed global batch (`data/packing.py`'s layout, one leading entry per device shard, as
    `placement.device_batch` places it) as sharded ShapeDtypeStructs."""
    k, c, rt, lt = batch_size_of(mesh), budget.chunks, budget.text_rows, budget.text_len
    rv, p, s = budget.vision_rows, budget.vision_patches, budget.slots
    patch_dim = raw_patch_dim(image)
    pixels = abstract_inputs(1, ShapeSignature(1, 1, 1, MERGE_UNITS), patch_dim)["pixel_values"].dtype  # the pipeline's
    i32 = jnp.int32
    text = jax.ShapeDtypeStruct((k, c, rt, lt), i32)
    packed = {
        **dict.fromkeys(("input_ids", "attention_mask", "image_token_index", "token_example", "token_position"), text),
        "position_ids": jax.ShapeDtypeStruct((k, c, 3, rt, lt), i32),
        "pixel_values": jax.ShapeDtypeStruct((k, c, rv, p, patch_dim), pixels),
        "patch_positions": jax.ShapeDtypeStruct((k, c, rv, p, 2), i32),
        "patch_segment_ids": jax.ShapeDtypeStruct((k, c, rv, p), i32),
        "pool_index": jax.ShapeDtypeStruct((k, c, s), i32),
        "slot_example": jax.ShapeDtypeStruct((k, c, s), i32),
        "num_chunks": jax.ShapeDtypeStruct((k,), i32),
    }
    queries = config.train.batch_size
    return {PACKED: {name: _placed(mesh, "", x) for name, x in packed.items()},
            **_masks(mesh, queries, queries * (1 + config.train.hard_negatives))}


def _count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _bytes(tree: Any) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def dry_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compile the step of `config` for `topology.devices` simulated devices; print the report and
    write it to workdir/dry_run.json. Returns the report."""
    c, t = config, config.topology
    profile = resolve_profile(c.data.profile, c)  # first: a bad path fails before anything is built
    simulate_devices(t.devices)
    geometry = model_config(c)
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)

    def build() -> VisionLanguageModel:
        model = build_model(geometry, nnx.Rngs(c.seed))
        add_adapters(model, c)
        return model

    graphdef, params, frozen = split_for_training(nnx.eval_shape(build), c.train.mode, c.train.freeze_vision)
    params = jax.eval_shape(master_weights, params)
    schedule, optimizer = optimization(c)
    abstract = abstract_train_state(params, optimizer, mesh)
    abstract_frozen = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen, param_shardings(frozen, mesh)
    )
    image = image_processor(c, geometry)
    budget = profile_budget(c, geometry, profile, image, mesh) if profile is not None and c.train.packing else None
    batch = abstract_batch(c, geometry, mesh) if budget is None else abstract_packed_batch(c, budget, image, mesh)
    drawn = _drawn(c, profile, budget, mesh) if profile is not None else []  # before compiling: a batch over the budget fails fast
    layout = "fixed shapes" if budget is None else f"packed on data.profile={c.data.profile}"
    print(f"dry run: compiling the training step ({layout}) for {t.devices} simulated devices ...", flush=True)
    step = compile_step(c, graphdef, schedule, optimizer, mesh, abstract, abstract_frozen, batch, jax.random.key(c.seed), image)
    report = _report(c, mesh, abstract, frozen, batch, step)
    report.update(_flops_report(c, geometry, mesh, step, profile, budget, drawn))
    workdir = Path(c.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(_describe(report) + f"\nwritten to {workdir / REPORT_FILE}")
    return report


def _report(
    c: ml_collections.ConfigDict, mesh: Mesh, abstract: Any, frozen: Any, batch: dict[str, Any], step: CompiledStep
) -> dict[str, Any]:
    t = c.topology
    memory = step.memory
    sizes = {
        "arguments_gib": memory.argument_size_in_bytes / GIB,
        "outputs_gib": memory.output_size_in_bytes / GIB,
        "aliased_gib": memory.alias_size_in_bytes / GIB,  # donated state: outputs reuse argument buffers
        "temp_gib": memory.temp_size_in_bytes / GIB,
    }
    sizes["total_gib"] = sizes["arguments_gib"] + sizes["outputs_gib"] - sizes["aliased_gib"] + sizes["temp_gib"]
    per_device = batch_size_of(mesh)
    queries = batch["valid"].shape[0]
    chunk = c.train.gc_chunk_size
    return {
        "config": {
            "geometry": c.model.geometry if not c.model.init or c.model.init == RANDOM else c.model.init,
            "mesh": dict(mesh.shape),
            "dtype": c.model.dtype, "param_dtype": c.model.param_dtype, "remat": c.model.remat,
            "train_mode": c.train.mode, "dora": c.lora.dora, "lora_rank": c.lora.rank,
            "batch_size": queries, "targets": batch["target_valid"].shape[0], "max_len": c.model.max_len,
            "target_max_len": c.model.target_max_len or c.model.max_len,
            "patches_per_image": batch["query"]["patch_segment_ids"].shape[1] if PACKED not in batch else None,
            "gc_chunk_size": chunk, "gc_chunks_per_device": queries // per_device // chunk if chunk else 0,
        },
        "topology": {k: t[k] for k in ("devices", "device_memory_gib", "peak_tflops", "mfu")},
        "parameters": {
            "trained": _count(abstract.params), "frozen": _count(frozen),
            "trained_gib": _bytes(abstract.params) / GIB, "frozen_gib": _bytes(frozen) / GIB,
        },
        "compile_seconds": step.seconds,
        "memory_per_device": sizes,
        "fits": sizes["total_gib"] <= t.device_memory_gib,
    }


def _weighted(batches: list[LengthBatch], values: list[float]) -> float:
    return sum(b.weight * v for b, v in zip(batches, values)) / sum(b.weight for b in batches)


def _differences(c: ml_collections.ConfigDict, profile: Profile) -> dict[str, dict[str, Any]]:
    """Settings the profile's lengths depend on where it was written with other values than this
    config's (its lengths are then those of the other settings: re-profile at these)."""
    here = {
        "model.max_len": c.model.max_len, "model.target_max_len": c.model.target_max_len or c.model.max_len,
        "model.min_pixels": c.model.min_pixels, "model.max_pixels": c.model.max_pixels,
        "data.positive_prompts": c.data.positive_prompts,
    }
    return {k: {"profile": profile.config[k], "config": v} for k, v in here.items() if k in profile.config and profile.config[k] != v}


def _drawn(
    c: ml_collections.ConfigDict, profile: Profile, budget: PackBudget | None, mesh: Mesh
) -> list[tuple[LengthBatch, np.ndarray | None]]:
    """The representative batches of `profile` (`profile_batches.draw_batches`: one task each unless
    `data.homogeneous=False` without a batch file), each with the chunks its device shards fill
    under `budget` (None for fixed shapes)."""
    batches = draw_batches(
        profile, queries=c.train.batch_size, hard_negatives=c.train.hard_negatives,
        one_task=bool(c.data.homogeneous or c.data.batch_file), seed=c.seed, max_len=c.model.max_len,
        target_max_len=c.model.target_max_len or c.model.max_len,
    )
    return [(b, None if budget is None else shard_chunks(b, budget, batch_size_of(mesh))) for b in batches]


def _flops_report(
    c: ml_collections.ConfigDict, geometry: ModelConfig, mesh: Mesh, step: CompiledStep, profile: Profile | None,
    budget: PackBudget | None, drawn: list[tuple[LengthBatch, np.ndarray | None]],
) -> dict[str, Any]:
    """`flops_executed` (and with a profile `flops_useful`, their ratio, per-subset figures and the
    packing budget), `step_seconds` and `recipe_hours` at `topology.mfu`. Without a profile there is
    no data to count useful work on (a worst-case batch of full-length sequences would call the
    padding useful), so `flops_useful` is left out."""
    t = c.topology
    rate = t.devices * t.peak_tflops * 1e12 * t.mfu
    out: dict[str, Any] = {"layout": "fixed shapes" if budget is None else "packed",
                           "flops_fixed": step.flops.fixed, "flops_per_trip": step.flops.per_trip}
    if profile is None:
        executed = step.flops.at()
        out.update(flops_executed=executed)
    else:
        shards = batch_size_of(mesh)
        batches = [b for b, _ in drawn]
        try:
            flops_model = FlopsModel.of(c, geometry)
        except ValueError as e:
            flops_model, out["flops_useful_note"] = None, str(e)
        subsets = {}
        for b, counts in drawn:
            entry: dict[str, Any] = {"weight": b.weight, "sequences": int(b.tokens.size), "tokens": int(b.tokens.sum()),
                                     "patches": int(b.patches.sum())}
            if counts is None:
                entry["flops_executed"] = step.flops.at()
            else:
                trips = executed_trips(counts, shards, uses_shard_map(mesh))
                entry.update(chunks_per_shard=counts.tolist(), trips=trips, flops_executed=step.flops.at(trips))
            if flops_model is not None:
                entry["flops_useful"] = flops_model.sequences(b.tokens, b.patches)
                entry["ratio"] = entry["flops_executed"] / entry["flops_useful"]
            subsets[b.subset or "all"] = entry
        executed = _weighted(batches, [e["flops_executed"] for e in subsets.values()])
        out.update(flops_executed=executed)
        if flops_model is not None:
            useful = _weighted(batches, [e["flops_useful"] for e in subsets.values()])
            out.update(flops_useful=useful, flops_ratio=executed / useful)
        out["profile"] = {
            "source": c.data.profile, "subsets": len(profile.subsets), "differs_from_config": _differences(c, profile),
            "batches": "one task per batch, each subset weighted by its rows" if len(batches) > 1 else "mixed tasks",
            "per_subset": subsets,
        }
        if budget is not None:
            out["packing"] = dataclasses.asdict(budget)
    seconds = executed / rate
    # flops_per_step / projected_step_seconds: the names earlier reports used, kept for their readers
    return {**out, "step_seconds": seconds, "recipe_hours": c.train.steps * seconds / 3600,
            "flops_per_step": executed, "projected_step_seconds": seconds}


def _describe(r: dict[str, Any]) -> str:
    c, t, p, m = r["config"], r["topology"], r["parameters"], r["memory_per_device"]
    mesh = " x ".join(f"{k} {v}" for k, v in c["mesh"].items())
    chunks = f"GradCache chunks of {c['gc_chunk_size']} queries per device ({c['gc_chunks_per_device']} per step)" if c["gc_chunk_size"] else "no GradCache"
    if "packing" in r:
        b = r["packing"]
        shape = (f"packed chunks of {b['text_rows']} x {b['text_len']} tokens and {b['vision_rows']} x "
                 f"{b['vision_patches']} patches (capacity {b['chunks']} per device)")
    else:
        shape = f"{c['max_len']} / {c['target_max_len']} tokens and {c['patches_per_image']} patches each"
    useful = (f"; useful {r['flops_useful']:.3e} (each sequence alone), executed / useful {r['flops_ratio']:.2f}"
              if "flops_useful" in r else "")
    differs = r.get("profile", {}).get("differs_from_config")
    changed = ", ".join(f"{k} {v['profile']} (here {v['config']})" for k, v in (differs or {}).items())
    note = [f"note: data.profile was written with other settings: {changed}; its lengths are those settings'"] if differs else []
    return "\n".join(note + [
        f"geometry {c['geometry']}: {p['frozen'] / 1e9:.3f}B frozen ({p['frozen_gib']:.2f} GiB {c['param_dtype']}), "
        f"{p['trained'] / 1e6:.2f}M trained ({c['train_mode']}{', DoRA' if c['dora'] and c['train_mode'] == 'lora' else ''}; float32 master + AdamW)",
        f"mesh {mesh} on {t['devices']} devices; batch {c['batch_size']} queries + {c['targets']} targets in {shape}; "
        f"{chunks}; compute {c['dtype']}, remat {c['remat']}",
        f"compiled in {r['compile_seconds']:.1f} s",
        f"per-device memory: arguments {m['arguments_gib']:.2f} GiB, outputs {m['outputs_gib']:.2f}, donated (aliased) "
        f"{m['aliased_gib']:.2f}, temporaries {m['temp_gib']:.2f}; total {m['total_gib']:.2f} GiB of {t['device_memory_gib']:g} GiB: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"FLOPs per step (matmuls, global batch, {r['layout']}"
        + (f", on data.profile={r['profile']['source']}" if "profile" in r else "")
        + f"): executed {r['flops_executed']:.3e}{useful}",
        f"projected step time: {r['step_seconds']:.2f} s at {t['mfu']:.0%} MFU of {t['devices']} x {t['peak_tflops']:g} TFLOP/s; "
        f"{r['recipe_hours']:.1f} h for the recipe's steps",
    ])
