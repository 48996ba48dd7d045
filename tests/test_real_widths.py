"""The newer backbones at their released widths (Qwen2.5-VL-3B, Qwen3-VL-2B) with 2 decoder layers
and 2 vision blocks, against transformers in float32: the real head_dim, window size, position
table and DeepStack mergers, the real Qwen vocabulary and image processor settings (random weights
in the backbone's key layout, `testing/random_checkpoint.py`, stored in bfloat16 and loaded by
both sides as float32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hf_reference import HFReference
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, WindowVisionConfig
from vlm2vec_jax.models.qwen2_vl.config import TextConfig
from vlm2vec_jax.models.qwen3_vl.geometries import qwen3vl_2b_config
from vlm2vec_jax.testing.random_checkpoint import write_random_checkpoint
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

pytestmark = pytest.mark.slow
ATOL = 1e-5


def qwen2_5_vl_3b_two_layers() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B's widths (decoder 2048, 16 heads / 2 kv, MLP 11008; tower 1280, MLP 3420,
    112-px windows), 2 layers and 2 blocks, the second with full attention."""
    text = TextConfig(hidden_size=2048, num_layers=2, num_heads=16, num_kv_heads=2, intermediate_size=11008)
    return Qwen2_5_VLConfig(text=text, vision=WindowVisionConfig(depth=2, fullatt_block_indexes=(1,)))


def qwen3_vl_2b_two_layers():
    base = qwen3vl_2b_config()
    return base.replace(
        text=dataclasses.replace(base.text, num_layers=2),
        vision=dataclasses.replace(base.vision, depth=2, deepstack_visual_indexes=(0, 1)),
    )


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def checkpoint(request, tmp_path_factory):
    config = {"qwen2_5_vl": qwen2_5_vl_3b_two_layers, "qwen3_vl": qwen3_vl_2b_two_layers}[request.param]()
    # stored in bfloat16 (half the bytes to write and read); both sides load it as float32
    return write_random_checkpoint(config, tmp_path_factory.mktemp(request.param), dtype="bfloat16", processor_files=True)


def test_released_widths_match_transformers(checkpoint):
    # A tensor transformers missed would be initialised at random there, and the states would differ.
    hf = HFReference(str(checkpoint), dtype="float32")
    ours = load_pretrained(checkpoint, dtype="float32")
    images = [tiny_image(224, 224, 1), tiny_image(160, 320, 2)]
    ref = hf.build([["Represent the given image ", 0, " for classification."], ["A red car next to ", 1]], images)
    expected = hf.hidden_states(ref)
    hidden = np.asarray(ours.hidden_states(ref.ours))
    assert np.abs(expected[ref.mask]).max() > 0.5
    np.testing.assert_allclose(hidden[ref.mask], expected[ref.mask], atol=ATOL, rtol=0)
