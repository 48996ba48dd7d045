"""Shared fixtures: tiny real checkpoints of each backbone, written by transformers into temp dirs."""

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


@pytest.fixture(scope="session")
def tiny_ckpt_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL: windows of 4 x 4 patches in its first vision block, full attention in its
    last (`Qwen2_5_VLConfig.small_vision`), images up to 64 patches."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), max_pixels=56 * 56 * 16, model_type="qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_ckpt_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-VL: 16-px patches, a 4 x 4 learned position grid, DeepStack from both vision
    blocks into both decoder layers, heads twice as wide as hidden / heads
    (`Qwen3VLConfig.small_vision`, `small_text`), images up to 64 patches."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3_vl"), max_pixels=64 * 64 * 16, model_type="qwen3_vl")


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def backbone_ckpt(request: pytest.FixtureRequest) -> Path:
    """The tiny checkpoint of each backbone in turn."""
    return request.getfixturevalue("tiny_ckpt" if request.param == "qwen2_vl" else f"tiny_ckpt_{request.param}")
