"""The model's input contract: one padded batch of arrays, built on the host, consumed by the jitted model.

It lives outside `models/` and `processing/` so both can name it without importing each other.
Every array has a static, bucketed shape; all data-dependent layout (image packing, token positions)
is decided on the host so the jitted forward sees no Python and few distinct shapes.

Text side, B sequences of length L:
- ``input_ids`` int32 (B, L): token ids; padding uses the tokenizer's pad id (masked out anyway).
- ``attention_mask`` int32 (B, L): 1 for real tokens, 0 for padding (left or right padding both work).
- ``position_ids`` int32 (3, B, L): M-RoPE (temporal, height, width) position of every token;
  padding positions are 0.
- ``image_token_index`` int32 (B, L): for an ``<|image_pad|>`` token, the row of its merged vision
  token in the flattened vision output (V * R / merge**2 rows); -1 for every other token.

Vision side, V packed rows of R patches (R a multiple of merge**2; V may be 0 for text-only batches):
- ``pixel_values`` float32 (V, R, C * T * P * P): patches in the image processor's block-major order;
  images packed whole into rows, padding patches zero. Training batches carry them as uint8
  (V, R, C * P * P), one frame, which the training forward normalises on the device
  (`processing.image.normalize_patches`); the model itself takes float patches.
- ``patch_positions`` int32 (V, R, 2): (row, column) of each patch within its image, for the 2-D
  vision rotary embedding; 0 for padding.
- ``patch_segment_ids`` int32 (V, R): 1, 2, ... for the images of a row (attention stays inside an
  image), 0 for padding patches.
"""

from typing import TypedDict

import numpy as np

# Patches per merged image token: Qwen2-VL's merger joins 2 x 2 patches.
MERGE_UNITS = 4
TEXT_KEYS = ("input_ids", "attention_mask", "position_ids", "image_token_index")
VISION_KEYS = ("pixel_values", "patch_positions", "patch_segment_ids")


class ModelInputs(TypedDict):
    """One batch as the model consumes it (see the module docstring for shapes and meaning)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    image_token_index: np.ndarray
    pixel_values: np.ndarray
    patch_positions: np.ndarray
    patch_segment_ids: np.ndarray
