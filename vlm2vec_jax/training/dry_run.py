"""`--config.dry_run=True`: will this recipe fit, and how long will a step take, on hardware we do
not have? The real training step is compiled for the target's mesh on simulated CPU devices, from
abstract shapes only (no weights are created, no data is read), and the compiler's per-device memory,
the step's matmul FLOPs and a projected step time are reported (and written to workdir/dry_run.json).

The model, adapters, trainable/frozen split, optimizer, state layout and step are the training
run's own (`loop.add_adapters`, `loop.split_for_training`, `state.abstract_train_state`,
`loop.compile_step`); only the weights and the batch are shapes here. Caveats the numbers carry:
the compile is XLA's CPU backend, so memory is its buffer assignment (attention scores are
materialised; a GPU build with fused attention needs less, and adds its own workspace and runtime
context), and the projection assumes an MFU rather than measuring one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from vlm2vec_jax.batch import ModelInputs
from vlm2vec_jax.data.pipeline import vision_row_patches
from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig
from vlm2vec_jax.models.qwen2_vl.model import Qwen2VL
from vlm2vec_jax.processing.batching import ShapeSignature
from vlm2vec_jax.processing.image import ImageProcessorConfig, raw_patch_dim
from vlm2vec_jax.models.qwen2_vl.geometries import GEOMETRIES
from vlm2vec_jax.training.loop import CompiledStep, add_adapters, compile_step, master_weights, optimization, split_for_training
from vlm2vec_jax.training.model_init import RANDOM
from vlm2vec_jax.training.sharding import batch_sharding, batch_size_of, make_mesh
from vlm2vec_jax.training.state import abstract_train_state, param_shardings
from vlm2vec_jax.training.step import MASKS, SIDES

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


def model_config(config: ml_collections.ConfigDict) -> Qwen2VLConfig:
    """The geometry to compile: a Hugging Face `model.init`'s config.json (nothing else is read),
    else the named real geometry `model.geometry`."""
    m = config.model
    options = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    if m.init and m.init != RANDOM:
        return Qwen2VLConfig.from_pretrained_dir(Path(m.init).expanduser(), **options)
    if m.geometry not in GEOMETRIES:
        raise ValueError(
            f"a dry run needs the real geometry: set model.geometry to one of {sorted(GEOMETRIES)} "
            f"(got {m.geometry!r}) or model.init to a Hugging Face Qwen2-VL directory (only its config.json is read)"
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


def image_processor(config: ml_collections.ConfigDict, model: Qwen2VLConfig) -> ImageProcessorConfig:
    """The image processor the training pipeline would use for `model`'s vision tower."""
    v = model.vision
    return ImageProcessorConfig(
        min_pixels=config.model.min_pixels, max_pixels=config.model.max_pixels, patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
    )


def abstract_batch(config: ml_collections.ConfigDict, model: Qwen2VLConfig, mesh: Mesh) -> dict[str, Any]:
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
    masks = {
        "valid": jax.ShapeDtypeStruct((queries,), jnp.bool_),
        "target_valid": jax.ShapeDtypeStruct((targets,), jnp.bool_),
        "target_key": jax.ShapeDtypeStruct((targets,), jnp.int32),
    }

    def placed(key: str, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, key, x.ndim))

    batch = {side: {k: placed(k, x) for k, x in sides[side].items()} for side in SIDES}
    batch.update({m: placed(m, masks[m]) for m in MASKS})
    return batch


def _count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _bytes(tree: Any) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def dry_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compile the step of `config` for `topology.devices` simulated devices; print the report and
    write it to workdir/dry_run.json. Returns the report."""
    c, t = config, config.topology
    simulate_devices(t.devices)
    geometry = model_config(c)
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)

    def build() -> Qwen2VL:
        model = Qwen2VL(geometry, rngs=nnx.Rngs(c.seed))
        add_adapters(model, c)
        return model

    graphdef, params, frozen = split_for_training(nnx.eval_shape(build), c)
    params = jax.eval_shape(master_weights, params)
    schedule, optimizer = optimization(c)
    abstract = abstract_train_state(params, optimizer, mesh)
    abstract_frozen = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen, param_shardings(frozen, mesh)
    )
    batch = abstract_batch(c, geometry, mesh)
    print(f"dry run: compiling the training step for {t.devices} simulated devices ...", flush=True)
    step = compile_step(
        c, graphdef, schedule, optimizer, mesh, abstract, abstract_frozen, batch, jax.random.key(c.seed),
        image_processor(c, geometry),
    )
    report = _report(c, mesh, abstract, frozen, batch, step)
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
    step_seconds = step.flops.at() / (t.devices * t.peak_tflops * 1e12 * t.mfu)
    return {
        "config": {
            "geometry": c.model.geometry if not c.model.init or c.model.init == RANDOM else c.model.init,
            "mesh": dict(mesh.shape),
            "dtype": c.model.dtype, "param_dtype": c.model.param_dtype, "remat": c.model.remat,
            "train_mode": c.train.mode, "dora": c.lora.dora, "lora_rank": c.lora.rank,
            "batch_size": queries, "targets": batch["target_valid"].shape[0], "max_len": c.model.max_len,
            "target_max_len": batch["target"]["input_ids"].shape[1],
            "patches_per_image": batch["query"]["patch_segment_ids"].shape[1],
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
        "flops_per_step": step.flops.at(),
        "projected_step_seconds": step_seconds,
    }


def _describe(r: dict[str, Any]) -> str:
    c, t, p, m = r["config"], r["topology"], r["parameters"], r["memory_per_device"]
    mesh = " x ".join(f"{k} {v}" for k, v in c["mesh"].items())
    chunks = f"GradCache chunks of {c['gc_chunk_size']} queries per device ({c['gc_chunks_per_device']} per step)" if c["gc_chunk_size"] else "no GradCache"
    return "\n".join([
        f"geometry {c['geometry']}: {p['frozen'] / 1e9:.3f}B frozen ({p['frozen_gib']:.2f} GiB {c['param_dtype']}), "
        f"{p['trained'] / 1e6:.2f}M trained ({c['train_mode']}{', DoRA' if c['dora'] and c['train_mode'] == 'lora' else ''}; float32 master + AdamW)",
        f"mesh {mesh} on {t['devices']} devices; batch {c['batch_size']} queries + {c['targets']} targets of {c['max_len']} / {c['target_max_len']} tokens "
        f"and {c['patches_per_image']} patches each; {chunks}; compute {c['dtype']}, remat {c['remat']}",
        f"compiled in {r['compile_seconds']:.1f} s",
        f"per-device memory: arguments {m['arguments_gib']:.2f} GiB, outputs {m['outputs_gib']:.2f}, donated (aliased) "
        f"{m['aliased_gib']:.2f}, temporaries {m['temp_gib']:.2f}; total {m['total_gib']:.2f} GiB of {t['device_memory_gib']:g} GiB: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"FLOPs per step (matmuls, global batch): {r['flops_per_step']:.3e}",
        f"projected step time: {r['projected_step_seconds']:.2f} s at {t['mfu']:.0%} MFU of {t['devices']} x {t['peak_tflops']:g} TFLOP/s",
    ])
