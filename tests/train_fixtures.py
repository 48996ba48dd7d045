"""Shared builders for the training tests: a real tiny Qwen2-VL batch (images and text, hard
negatives, a masked target) and a step runner over any mesh."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from vlm2vec_jax.models.lora import LoRAConfig, LoRAParam, apply_lora
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.processing.batching import Batcher, BucketSpec, Example
from vlm2vec_jax.processing.image import ImageProcessorConfig, patchify, raw_patch_dim
from vlm2vec_jax.processing.text import TextProcessor
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image


def contrastive_batch(checkpoint: Path, queries: int, hard_negatives: int, length: int = 48) -> dict:
    """A training batch in the pipeline's layout (uint8 pixels, normalised by the training forward):
    queries alternate image / text, targets carry images every third row, one target slot is
    masked invalid."""
    text = TextProcessor.from_pretrained_dir(checkpoint, max_len=length)
    images = ImageProcessorConfig.from_pretrained_dir(checkpoint)
    per_query = 1 + hard_negatives

    def example(i: int, with_image: bool) -> Example:
        if with_image:
            image = patchify(tiny_image(56, 56 + 56 * (i % 2), seed=i), images)
            return Example(text.encode(f"{text.image_token} picture {i}", [image.num_tokens]), (image,), "hf5")
        return Example(text.encode(f"caption number {i} red dog " * (1 + i % 3)), (), "hf5")

    def batcher(rows: int) -> Batcher:
        return Batcher.from_text_processor(
            text, BucketSpec((length,), (32,), (rows,), batch_size=rows), aligned=True,
            patch_dim=raw_patch_dim(images), pixel_dtype="uint8",
        )

    target_valid = np.ones(queries * per_query, bool)
    target_valid[per_query * (queries - 1) + per_query - 1] = hard_negatives == 0  # mask one negative
    target_key = np.arange(queries * per_query, dtype=np.int32)
    target_key[per_query] = target_key[0]  # query 1's positive is a copy of query 0's (a repeated label)
    return {
        "query": batcher(queries)([example(i, i % 2 == 0) for i in range(queries)]),
        "target": batcher(queries * per_query)([example(100 + i, i % 3 == 0) for i in range(queries * per_query)]),
        "valid": np.ones(queries, bool),
        "target_valid": target_valid,
        "target_key": target_key,
    }


def perturbed_dora(checkpoint: Path) -> tuple:
    """(graphdef, adapter params, frozen rest) of the checkpoint with DoRA r 4 (dropout 0.2) on every
    target. Fresh adapters have B = 0 (no gradient reaches A): every adapter value is perturbed."""
    model = load_pretrained(checkpoint)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.2, use_dora=True), nnx.Rngs(1))
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return graphdef, params, frozen
