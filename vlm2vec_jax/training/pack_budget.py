"""The packed chunk budget of a training run or a dry run (`data/packing.py`'s `PackBudget`): from a
training-set profile (`data.profile`), or covering the padded layout, with the `train.pack_*` keys
winning where set; and whether a run packs at all."""

from __future__ import annotations

import dataclasses

import ml_collections
from jax.sharding import Mesh

from vlm2vec_jax.data.packing import PackBudget
from vlm2vec_jax.data.pipeline import TrainBatchSource, vision_row_patches
from vlm2vec_jax.data.profile import Profile
from vlm2vec_jax.data.profile_budget import budget_from_profile
from vlm2vec_jax.models.backbones import ModelConfig
from vlm2vec_jax.processing.image import ImageProcessorConfig
from vlm2vec_jax.training.model_flops import FlopsModel
from vlm2vec_jax.training.sharding import batch_size_of
from vlm2vec_jax.training.step import num_chunks


def packing_budget(
    config: ml_collections.ConfigDict, source: TrainBatchSource, mesh: Mesh, geometry: ModelConfig,
    profile: Profile | None = None,
) -> PackBudget:
    """The packed chunk shapes of a run: sized from `profile` where given (`data.profile`, what the
    dry run compiles too), else `PackBudget.covering` the padded layout of one device shard;
    `train.pack_*` keys win where set (configs/common.py)."""
    if profile is not None:
        return profile_budget(config, geometry, profile, source.image_config, mesh)
    c, shards = config.train, batch_size_of(mesh)
    queries, targets = c.batch_size // shards, c.batch_size * (1 + c.hard_negatives) // shards
    default = PackBudget.covering(
        queries=queries, targets=targets, query_len=source.max_len, target_len=source.target_max_len,
        patches_per_row=source.patches_per_row, query_images=source.query_vision_rows > 0,
        target_images=source.target_vision_rows > 0, gc_chunks=num_chunks(queries, c.gc_chunk_size),
    )
    return with_overrides(default, c)


def with_overrides(budget: PackBudget, train: ml_collections.ConfigDict) -> PackBudget:
    """`budget` with the `train.pack_*` keys that are set (non-zero) in its place. A new row length
    keeps the chunk's tokens: the rows are rescaled unless `train.pack_text_rows` is set too."""
    if train.gc_chunk_size == 0 and train.pack_chunks > 1:
        raise ValueError("train.pack_chunks > 1 needs GradCache (train.gc_chunk_size > 0): without it a step is one chunk")
    text_len = train.pack_text_len or budget.text_len
    return dataclasses.replace(
        budget,
        text_len=text_len,
        text_rows=train.pack_text_rows or -(-budget.text_rows * budget.text_len // text_len),
        vision_rows=(train.pack_vision_rows or budget.vision_rows) if budget.vision_rows else 0,
        chunks=train.pack_chunks or budget.chunks,
    )


def packs(config: ml_collections.ConfigDict) -> bool:
    """Whether a run packs its batches: `train.packing`, where it can pay off. A packed step saves
    through the GradCache chunks it skips; without caching the one chunk's shape is the whole cost,
    so packing then needs explicit budgets (`train.pack_text_rows`, e.g. from a profile)."""
    t = config.train
    return bool(t.packing) and (t.gc_chunk_size > 0 or t.pack_text_rows > 0)


def profile_budget(
    config: ml_collections.ConfigDict, geometry: ModelConfig, profile: Profile, image: ImageProcessorConfig, mesh: Mesh
) -> PackBudget:
    """The packed chunk budget of `config` on `profile`: `budget_from_profile` for one device shard
    (rows weighed by the recipe's FLOPs formula), with the `train.pack_*` keys winning where set."""
    c, m = config.train, config.model
    costs = FlopsModel(geometry, config.lora.rank)  # relative row costs only: the recipe's formula serves any mode
    shards = batch_size_of(mesh)
    queries = c.batch_size // shards
    query_len, target_len = m.max_len, m.target_max_len or m.max_len
    budget = budget_from_profile(
        profile, queries=queries, hard_negatives=c.hard_negatives, gc_chunks=num_chunks(queries, c.gc_chunk_size),
        max_text_len=max(query_len, target_len), max_patches=vision_row_patches(image, min(query_len, target_len)),
        text_row_cost=lambda n: float(costs.decoder(n)), vision_row_cost=lambda n: float(costs.vision(n)),
    )
    return with_overrides(budget, c)
