"""Tokenization as VLM2Vec does it: prompt text as given, image placeholders expanded to image tokens.

VLM2Vec applies no chat template and adds no special tokens; MMEB stores Phi-3's `<|image_N|>`
placeholders, which become the backbone's `<|image_pad|>`; each placeholder is then repeated once
per merged vision token of its image (the model scatters vision features into exactly those slots).

Each text is tokenized once by the Rust tokenizer; expansion and truncation are numpy operations.
Truncation never cuts image tokens: a partial image would break the one-feature-per-token scatter,
so non-image tokens are dropped from the end instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["TextProcessor", "MMEB_IMAGE_PLACEHOLDER", "with_image_placeholder"]

# MMEB's (Phi-3's) numbered image placeholders: <|image_1|>, <|image_2|>, ...
MMEB_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")


def with_image_placeholder(text: str, has_image: bool, image_token: str = "<|image_pad|>") -> str:
    """`text` with `image_token` and a newline prepended when it has an image but no placeholder:
    MMEB's layout, image first, then the instruction. Shared by inference and training input."""
    if has_image and image_token not in text and not MMEB_IMAGE_PLACEHOLDER.search(text):
        return f"{image_token}\n{text}" if text else image_token
    return text


class TextProcessor:
    """Turns prompt strings plus per-image token counts into int32 token ids (see module docstring)."""

    def __init__(self, tokenizer: object, image_token: str = "<|image_pad|>", max_len: int | None = None) -> None:
        """`tokenizer`: a transformers tokenizer backed by `tokenizers` (Qwen2's always is in 5.x)."""
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.max_len = max_len
        self._backend = tokenizer.backend_tokenizer
        self.image_token_id = self._single_token_id(image_token)
        self.vision_start_token_id = self._single_token_id("<|vision_start|>")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; Qwen2-VL's is <|endoftext|>")
        self.pad_token_id = int(tokenizer.pad_token_id)

    @classmethod
    def from_pretrained_dir(
        cls, path: str | os.PathLike, max_len: int | None = None, image_token: str = "<|image_pad|>"
    ) -> TextProcessor:
        """Load the tokenizer of a local checkpoint directory with `AutoTokenizer`."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(os.fspath(path)), image_token=image_token, max_len=max_len)

    def _single_token_id(self, token: str) -> int:
        ids = self._backend.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not a single token in this tokenizer (encodes to {ids})")
        return ids[0]

    def normalize_placeholders(self, text: str) -> str:
        """Replace MMEB's `<|image_N|>` placeholders with this backbone's image token."""
        return MMEB_IMAGE_PLACEHOLDER.sub(self.image_token, text)

    def encode(self, text: str, image_token_counts: Sequence[int] = ()) -> np.ndarray:
        """Token ids (int32) of `text`, its i-th placeholder expanded to `image_token_counts[i]` tokens."""
        encoding = self._backend.encode(self.normalize_placeholders(text), add_special_tokens=False)
        return self._expand(encoding.ids, image_token_counts)

    def encode_batch(self, texts: Sequence[str], image_token_counts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """`encode` for many texts; the Rust tokenizer runs them in parallel."""
        if len(texts) != len(image_token_counts):
            raise ValueError(f"{len(texts)} texts but {len(image_token_counts)} lists of image token counts")
        encodings = self._backend.encode_batch(
            [self.normalize_placeholders(t) for t in texts], add_special_tokens=False
        )
        return [self._expand(e.ids, c) for e, c in zip(encodings, image_token_counts)]

    def _expand(self, ids: list[int], image_token_counts: Sequence[int]) -> np.ndarray:
        ids_arr = np.asarray(ids, dtype=np.int32)
        counts = np.asarray(image_token_counts, dtype=np.int64).reshape(-1)
        is_image = ids_arr == self.image_token_id
        n_placeholders = int(is_image.sum())
        if n_placeholders != counts.size:
            raise ValueError(
                f"the text has {n_placeholders} image placeholder(s) ({self.image_token} or <|image_N|>) "
                f"but {counts.size} image(s) were given; every image needs exactly one placeholder"
            )
        if counts.size and counts.min() < 1:
            raise ValueError(f"image token counts must be >= 1, got {counts.tolist()}")
        if self.max_len is not None:
            n_image_tokens = int(counts.sum())
            if n_image_tokens > self.max_len:
                raise ValueError(
                    f"the images alone need {n_image_tokens} tokens but max_len is {self.max_len}; "
                    "raise max_len or lower the image processor's max_pixels"
                )
            # Keep every placeholder and the first (max_len - image tokens) text tokens.
            keep = is_image | (np.cumsum(~is_image) <= self.max_len - n_image_tokens)
            ids_arr, is_image = ids_arr[keep], is_image[keep]
        repeats = np.ones(ids_arr.size, dtype=np.int64)
        repeats[is_image] = counts
        return np.repeat(ids_arr, repeats)
