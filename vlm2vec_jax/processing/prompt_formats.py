"""How an item's text and images become the model's input text: VLM2Vec's raw prompts, or
Qwen3-VL-Embedding's chat layout.

- "raw" (VLM2Vec, B3): the text as given, MMEB's `<|image_N|>` placeholders or `<|image_pad|>`
  marking the images, an image without a placeholder put first on a line of its own; no chat
  template, no special tokens.
- "qwen3_vl_embedding": Qwen3-VL-Embedding's reference embedder. The instruction (default
  "Represent the user's input.", given a full stop when it ends in no punctuation) is the system
  turn; the user turn holds the images, each as `<|vision_start|><|image_pad|><|vision_end|>`
  (where the text places them, else first), then the text ("NULL" when an item has neither); the
  generation prompt `<|im_start|>assistant\\n` follows, and its last token is the one pooled.
"""

from __future__ import annotations

import unicodedata

from vlm2vec_jax.processing.text import MMEB_IMAGE_PLACEHOLDER, with_image_placeholder

__all__ = ["DEFAULT_INSTRUCTION", "PROMPT_FORMATS", "format_prompt"]

PROMPT_FORMATS = ("raw", "qwen3_vl_embedding")
DEFAULT_INSTRUCTION = "Represent the user's input."
VISION = "<|vision_start|>{}<|vision_end|>"


def _sentence(instruction: str) -> str:
    instruction = instruction.strip() or DEFAULT_INSTRUCTION
    return instruction if unicodedata.category(instruction[-1]).startswith("P") else instruction + "."


def format_prompt(
    text: str, num_images: int, prompt_format: str = "raw", *, instruction: str = DEFAULT_INSTRUCTION, image_token: str = "<|image_pad|>"
) -> str:
    """The model's input text for an item of `text` and `num_images` images (module docstring)."""
    if prompt_format == "raw":
        return with_image_placeholder(text, num_images > 0, image_token)
    if prompt_format != "qwen3_vl_embedding":
        raise ValueError(f"prompt format {prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
    text = MMEB_IMAGE_PLACEHOLDER.sub(image_token, text)
    if num_images and image_token not in text:
        text = image_token * num_images + text
    elif not num_images and not text:
        text = "NULL"
    user = text.replace(image_token, VISION.format(image_token))
    return (
        f"<|im_start|>system\n{_sentence(instruction)}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
