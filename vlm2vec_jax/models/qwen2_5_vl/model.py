"""Qwen2.5-VL: its window-attention tower (`vision.py`) and Qwen2-VL's decoder."""

from vlm2vec_jax.models.qwen2_5_vl.vision import WindowVisionTower
from vlm2vec_jax.models.qwen2_vl.text import TextDecoder
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel


class Qwen2_5_VL(VisionLanguageModel):
    """transformers' `Qwen2_5_VLModel` (the LM head left out)."""

    vision_tower = WindowVisionTower
    decoder = TextDecoder
