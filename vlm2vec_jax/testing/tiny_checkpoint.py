"""Tiny *real* Qwen2-VL checkpoints, built offline in well under two seconds, for tests and benchmarks.

A tiny checkpoint is a directory in exactly the layout of a hub checkpoint (``config.json``,
safetensors weights, ``tokenizer.json`` + ``tokenizer_config.json``, ``preprocessor_config.json``)
so the code under test reads it through the same path as Qwen2-VL-2B, and transformers loads it too,
which is what makes parity tests against the PyTorch model possible.

Choices, and why:
- The tokenizer and config.json are `models.model_dir_files`'s (a byte-level BPE trained on
  its small built-in corpus; its module doc says why they are built as they are).
- Weights are random but not default-initialised: linear weights have std 1/sqrt(fan_in) and
  embeddings std 1, so activations stay O(1) through every layer (the default std 0.02 makes
  attention nearly uniform and hidden states tiny, which hides bugs in masks and rotary
  embeddings); every norm weight and bias is perturbed randomly, because the default ones/zeros
  make a missing or transposed bias or norm scale invisible.
- ``max_pixels`` defaults to 56*56*4 (an image is at most 16 merged tokens) so image tests stay fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vlm2vec_jax.models.model_dir_files import build_tiny_tokenizer, image_processor_settings, tiny_hf_config


def _randomize_(model: object, seed: int) -> None:
    """Overwrite every parameter with seeded values that keep activations O(1) (see module doc)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                new = 0.2 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:  # RMSNorm / LayerNorm scales
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                new = torch.randn(p.shape, generator=gen)
            else:  # Linear (out, in) and the patch Conv3d (out, c, t, h, w)
                new = torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(new.to(p.dtype))


def build_tiny_checkpoint(
    out_dir: str | Path,
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_dim: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    dtype: str = "float32",
    min_pixels: int = 56 * 56,
    max_pixels: int = 56 * 56 * 4,
    sharded: bool = False,
    model_type: str = "qwen2_vl",
) -> Path:
    """Write a random tiny checkpoint of the backbone `model_type` (weights, config, tokenizer,
    image processor) with transformers' own model class; returns `out_dir`.

    `sharded=True` saves with a small `max_shard_size` so the multi-file layout with
    `model.safetensors.index.json` is produced, as for real multi-GB checkpoints.
    """
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = build_tiny_tokenizer(out_dir)
    raw = tiny_hf_config(
        out, text_hidden=text_hidden, text_layers=text_layers, heads=heads, kv_heads=kv_heads,
        intermediate=intermediate, vision_dim=vision_dim, vision_depth=vision_depth,
        vision_heads=vision_heads, tie_word_embeddings=tie_word_embeddings, model_type=model_type,
    )
    model_class = getattr(transformers, raw["architectures"][0])
    config = model_class.config_class(**raw)
    torch_dtype = getattr(torch, dtype)
    model = model_class(config)
    _randomize_(model, seed)
    model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.save_pretrained(out, **({"max_shard_size": "200KB"} if sharded else {}))
    # Writes the transformers 5.x spelling `size: {shortest_edge, longest_edge}`.
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **image_processor_settings(model_type)).save_pretrained(out)
    return out


def tiny_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A seeded random RGB uint8 image (H, W, 3), the kind of input tests feed the image processor."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
