"""Qwen2-VL: its ViT tower (`vision.py`) and the Qwen2 decoder (`text.py`)."""

from vlm2vec_jax.models.qwen2_vl.text import TextDecoder
from vlm2vec_jax.models.qwen2_vl.vision import VisionTower
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel


class Qwen2VL(VisionLanguageModel):
    """transformers' `Qwen2VLModel` (the LM head left out)."""

    vision_tower = VisionTower
    decoder = TextDecoder
