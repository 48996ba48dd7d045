"""Prompt text as the backbone sees it: MMEB placeholders mapped, B3's positive-side prompts added.

B3 (section 3.3, Table 5; its code's `POS_MOD_DICT`) prefixes a short instruction to the targets
of the datasets whose targets are bare text (class names, answers, captions), at training time on
positives and hard negatives and at evaluation time on every candidate. Other datasets' targets
already carry VLM2Vec's instructions in the data and get no prefix. The prefix goes in front of the
whole target text, exactly as B3's `mod_instruction + text`.
"""

from __future__ import annotations

import dataclasses

from vlm2vec_jax.data.records import Side
from vlm2vec_jax.data.registry import DatasetInfo
from vlm2vec_jax.processing.text import MMEB_IMAGE_PLACEHOLDER

__all__ = [
    "ANSWER_PROMPT",
    "CLASS_LABEL_PROMPT",
    "IMAGE_CAPTION_PROMPT",
    "IMAGE_TOKEN",
    "count_image_placeholders",
    "positive_prompt",
    "to_backbone_text",
    "with_prompt",
]

CLASS_LABEL_PROMPT = "Represent the class label: "
ANSWER_PROMPT = "Represent the answer: "
IMAGE_CAPTION_PROMPT = "Represent the image caption: "
IMAGE_TOKEN = "<|image_pad|>"

_BY_META_TASK = {"classification": CLASS_LABEL_PROMPT, "vqa": ANSWER_PROMPT}
# Only these two retrieval datasets have caption-only targets; B3 prompts no other retrieval or
# grounding dataset. Train (MMEB-train) and eval (MMEB-eval) spell both names the same way.
# B3 names MSCOCO_i2t and VisualNews_i2t, MMEB's only image-to-caption sets; the "_i2t" suffix
# rule covers them and datasets following the same naming (the synthetic SynCaption_i2t).
CAPTION_TARGET_SUFFIX = "_i2t"


def positive_prompt(info: DatasetInfo) -> str:
    """B3's target-side prefix for a dataset: by meta-task (classification, VQA) or by name
    (image-to-caption datasets, named *_i2t); "" for every other dataset."""
    if info.name.endswith(CAPTION_TARGET_SUFFIX):
        return IMAGE_CAPTION_PROMPT
    return _BY_META_TASK.get(info.meta_task, "")


def to_backbone_text(text: str | None, image_token: str = IMAGE_TOKEN) -> str:
    """MMEB's Phi-3 `<|image_N|>` placeholders replaced by the backbone's image token; None -> ""."""
    return MMEB_IMAGE_PLACEHOLDER.sub(image_token, text or "")


def count_image_placeholders(text: str, image_token: str = IMAGE_TOKEN) -> int:
    """Image placeholders in backbone text: one per image the side must carry."""
    return text.count(image_token)


def with_prompt(side: Side, prompt: str) -> Side:
    """`side` with `prompt` prefixed to its text (unchanged when the prompt is empty)."""
    return dataclasses.replace(side, text=prompt + side.text) if prompt else side
