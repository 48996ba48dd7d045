"""Qwen3-VL: its DeepStack tower (`vision.py`) and the Qwen3 decoder (the Qwen2 decoder class with
Qwen3's config: `qwen2_vl/text.py`)."""

from vlm2vec_jax.models.qwen2_vl.text import TextDecoder
from vlm2vec_jax.models.qwen3_vl.vision import DeepStackVisionTower
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel


class Qwen3VL(VisionLanguageModel):
    """transformers' `Qwen3VLModel` (the LM head left out)."""

    vision_tower = DeepStackVisionTower
    decoder = TextDecoder
