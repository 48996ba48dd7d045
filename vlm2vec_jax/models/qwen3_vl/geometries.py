"""The real Qwen3-VL geometries (dense 2B and 8B), for dry runs and random checkpoints at real
scale without any download: the numbers of the released config.json files (Qwen3-VL-Embedding
2B / 8B share them). The 8B tower is transformers' `Qwen3VLVisionConfig` default."""

from __future__ import annotations

import dataclasses

from vlm2vec_jax.models.qwen3_vl.config import DeepStackVisionConfig, Qwen3VLConfig

__all__ = ["qwen3vl_2b_config", "qwen3vl_8b_config"]


def qwen3vl_2b_config(**options) -> Qwen3VLConfig:
    """Qwen3-VL-2B(-Instruct): a 28-layer 2048-wide decoder (16 heads of 128, 8 kv, tied
    embeddings) and a 24-block 1024-wide tower with DeepStack from blocks 5, 11, 17;
    `options` sets dtype, param_dtype, remat, attention."""
    return Qwen3VLConfig(**options)  # the class defaults are this geometry


def qwen3vl_8b_config(**options) -> Qwen3VLConfig:
    """Qwen3-VL-8B(-Instruct): a 36-layer 4096-wide decoder (32 heads of 128, 8 kv, untied) and
    a 27-block 1152-wide tower with DeepStack from blocks 8, 16, 24."""
    base = Qwen3VLConfig(**options)
    text = dataclasses.replace(
        base.text, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=12288,
        tie_word_embeddings=False,
    )
    vision = DeepStackVisionConfig(
        depth=27, embed_dim=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096,
        deepstack_visual_indexes=(8, 16, 24),
    )
    return base.replace(text=text, vision=vision)
