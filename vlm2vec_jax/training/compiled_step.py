"""The training step of a config, built and compiled ahead of time for given shapes and shardings,
with what the compiler says it costs; the Trainer compiles it for its first batch, the dry run for
abstract shapes on a simulated topology."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from vlm2vec_jax.processing.image import ImageProcessorConfig
from vlm2vec_jax.training.loss import parse_matryoshka_dims
from vlm2vec_jax.training.forward import make_embed_factory, make_vision_factory
from vlm2vec_jax.training.step import StepOptions, TrainState, make_train_step
from vlm2vec_jax.training.throughput import StepFlops


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The compiled training step with what it costs, per the compiler."""

    compiled: jax.stages.Compiled
    flops: StepFlops  # matmul FLOPs of one step over the global batch, by chunk-loop trips
    memory: Any  # `compiled.memory_analysis()`: per-device sizes; None where the backend has none
    seconds: float  # tracing, lowering and compilation


def reuses_vision_features(config: ml_collections.ConfigDict) -> bool:
    """Whether packed GradCache keeps each chunk's image features for its second pass: only a
    frozen tower's features are the same in both passes (`train.cache_vision`)."""
    return bool(config.train.freeze_vision and config.train.cache_vision)


def compile_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    schedule: optax.Schedule,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    abstract: TrainState,
    frozen: Any,
    batch: dict[str, Any],
    key: jax.Array,
    image_config: ImageProcessorConfig,
) -> CompiledStep:
    """The training step of `config` compiled for these shapes and shardings. `frozen` and `batch`
    may be placed arrays or ShapeDtypeStructs with shardings (a dry run compiles from shapes only);
    `image_config` normalises the batch's uint8 pixels on the device."""
    c = config
    dropout = c.train.mode == "lora" and c.lora.dropout > 0
    step = make_train_step(
        make_embed_factory(graphdef, dropout=dropout, image_config=image_config), optimizer, schedule,
        StepOptions(c.train.temperature, c.train.gc_chunk_size, c.train.mask_duplicate_targets, parse_matryoshka_dims(c.train.matryoshka_dims)),
        mesh, abstract,
        jax.tree.map(lambda x: x.sharding, frozen), batch,
        make_vision_factory(graphdef, image_config=image_config) if reuses_vision_features(c) else None,
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # kernels XLA cannot partition (splash attention) read it to shard_map themselves
        traced = step.trace(abstract, frozen, batch, key)
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    return CompiledStep(compiled, StepFlops.of(traced.jaxpr.jaxpr), compiled.memory_analysis(), seconds)
