"""M-RoPE position ids on the host, for one unpadded sequence: int32 (3, n) (temporal, height, width).

Text tokens advance one position per token on all three axes. An image laid out in 3-D gets, for
merged token (t, i, j) of its (T, H/2, W/2) grid, the positions (cur + t, cur + i, cur + j), and the
text after it resumes at cur + max(H, W)/2. Two rules decide which images are laid out in 3-D:

- ``"hf5"`` (transformers 5.x `get_rope_index` with `mm_token_type_ids = ids == image_token_id`):
  every image.
- ``"legacy"`` (the transformers 4.x copy vendored by VLM2Vec): only an image whose pad run directly
  follows `<|vision_start|>`; any other image's tokens are numbered like text. VLM2Vec's prompts have
  no `<|vision_start|>`, so released VLM2Vec checkpoints were trained with 1-D positions for image
  tokens, and reproducing them needs this rule.

Where `<|vision_start|>` precedes every image the rules agree. Quirks of the originals deliberately
not copied (they only change results on inputs the originals mishandle):
- 4.x walks the batch with one global image counter and finds each image as "the next image_pad
  after the previous one", while it counts images by `<|vision_start|>` pairs: an image without
  `<|vision_start|>` before one with it gets the 3-D layout (and grid) meant for the other, and all
  later rows of the batch read the wrong grids. Here each sequence owns its images, and the
  `<|vision_start|>` test is applied to each image's own run.
- 5.x groups consecutive image tokens with `itertools.groupby`, so two images whose pad runs touch
  merge into one run that consumes only the first grid (and then fails on the length). Here each
  image consumes exactly its own token count.
- 4.x fills padding with 1 and 5.x with 0; the caller places these ids at the real tokens and
  chooses the padding value (0 in `batch.py`'s contract).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ROPE_RULES", "rope_index"]

ROPE_RULES = ("hf5", "legacy")


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: Sequence[Sequence[int]],
    *,
    image_token_id: int,
    vision_start_token_id: int | None = None,
    rule: str = "hf5",
    merge_size: int = 2,
) -> np.ndarray:
    """M-RoPE positions (3, n) int32 for the real tokens `input_ids` (n,) holding these images in order.

    The images' pad tokens must appear in order, each image's `t*h*w / merge_size**2` pads
    contiguous (what `TextProcessor` produces). `vision_start_token_id` is needed by ``"legacy"``.
    """
    if rule not in ROPE_RULES:
        raise ValueError(f"unknown rope rule {rule!r}; choose one of {ROPE_RULES}")
    if rule == "legacy" and vision_start_token_id is None:
        raise ValueError('rule "legacy" needs vision_start_token_id')
    ids = np.asarray(input_ids).reshape(-1)
    n = ids.size
    pad_pos = np.flatnonzero(ids == image_token_id)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    llm_grids = grids // np.array([1, merge_size, merge_size])  # merged-token grid (t, h, w)
    counts = llm_grids.prod(axis=1)
    if pad_pos.size != counts.sum():
        raise ValueError(
            f"the sequence has {pad_pos.size} image tokens but its {len(grids)} image(s) need "
            f"{int(counts.sum())} (t*h*w/{merge_size**2} each)"
        )

    increment = np.ones(n, dtype=np.int64)  # how far each token moves the running position
    offsets = np.zeros((3, n), dtype=np.int64)  # 3-D offset of each token from its image's start
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    for (t, h, w), count, start in zip(llm_grids, counts, starts):
        first, last = pad_pos[start], pad_pos[start + count - 1]
        if last - first != count - 1:
            raise ValueError(f"the {count} tokens of an image starting at position {first} are not contiguous")
        if rule == "legacy" and (first == 0 or ids[first - 1] != vision_start_token_id):
            continue  # numbered like text
        k = np.arange(count)
        offsets[:, first : last + 1] = (k // (h * w), k // w % h, k % w)
        increment[first:last] = 0
        increment[last] = max(h, w)
    base = np.cumsum(increment) - increment  # exclusive prefix sum: position where each token starts
    return (base + offsets).astype(np.int32)
