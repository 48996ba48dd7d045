"""The real Qwen2-VL geometries (2B and 7B), for dry runs, benchmarks and random checkpoints at
real scale without any download: the numbers of the hub's config.json files."""

from __future__ import annotations

import dataclasses

from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig

__all__ = ["qwen2vl_2b_config", "qwen2vl_7b_config"]


def qwen2vl_2b_config(**options) -> Qwen2VLConfig:
    """Qwen2-VL-2B(-Instruct) geometry; `options` sets dtype, param_dtype, remat."""
    text = TextConfig(
        vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
        intermediate_size=8960, rms_norm_eps=1e-6, rope_theta=1_000_000.0, mrope_section=(16, 24, 24),
        hidden_act="silu", tie_word_embeddings=True,
    )
    vision = VisionConfig(
        depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0, hidden_act="quick_gelu", in_channels=3,
        patch_size=14, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=1536,
    )
    return Qwen2VLConfig(vision=vision, text=text, **options)


def qwen2vl_7b_config(**options) -> Qwen2VLConfig:
    """Qwen2-VL-7B(-Instruct) geometry (the 2B's vision tower merged into a 3584-wide decoder with
    untied embeddings); `options` sets dtype, param_dtype, remat."""
    base = qwen2vl_2b_config(**options)
    text = dataclasses.replace(
        base.text, vocab_size=152064, hidden_size=3584, num_heads=28, num_kv_heads=4, intermediate_size=18944,
        tie_word_embeddings=False,
    )
    return base.replace(text=text, vision=dataclasses.replace(base.vision, out_hidden_size=3584))
