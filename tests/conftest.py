"""Shared fixtures: tiny real Qwen2-VL checkpoints written by transformers into temp dirs."""

import os
from pathlib import Path

import pytest

from training_runs import FAST_COMPILE_FLAG
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint

# Read when JAX's CPU backend starts, after this (subprocesses that inherit the environment get it too).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """float32, tied embeddings, images up to 16 merged tokens (64 patches)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_pixels=56 * 56 * 16)


@pytest.fixture(scope="session")
def tiny_ckpt_untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied LM head, as Qwen2-VL-7B ships."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as `tiny_ckpt`, split over several files with model.safetensors.index.json."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sharded"), max_pixels=56 * 56 * 16, sharded=True)
