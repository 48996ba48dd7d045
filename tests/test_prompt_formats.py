"""Qwen3-VL-Embedding's conventions beside VLM2Vec's: its chat layout (instruction as the system
turn, images then text in the user turn, last token of the generation prompt pooled) against
transformers' model on the same text, and Matryoshka dimensions of `encode`."""

from __future__ import annotations

import numpy as np
import pytest

from hf_reference import HFReference, hf_embedding
from vlm2vec_jax import Embedder
from vlm2vec_jax.processing.prompt_formats import format_prompt
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

IMG = tiny_image(70, 110, 4)
SYSTEM = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n"
END = "<|im_end|>\n<|im_start|>assistant\n"
PAD = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.mark.parametrize(
    "text, images, instruction, expected",
    [
        ("A red car.", 0, "Represent the user's input.", SYSTEM.format("Represent the user's input.") + "A red car." + END),
        ("What is shown?", 1, "Find the matching caption", SYSTEM.format("Find the matching caption.") + PAD + "What is shown?" + END),
        ("Compare <|image_1|> and <|image_2|>", 2, "Compare!", SYSTEM.format("Compare!") + f"Compare {PAD} and {PAD}" + END),
        ("", 1, "Represent the user's input.", SYSTEM.format("Represent the user's input.") + PAD + END),
        ("", 0, "", SYSTEM.format("Represent the user's input.") + "NULL" + END),
    ],
)
def test_qwen3_vl_embedding_layout(text, images, instruction, expected):
    assert format_prompt(text, images, "qwen3_vl_embedding", instruction=instruction) == expected


def test_raw_layout_is_vlm2vecs():
    assert format_prompt("What is shown?", 1) == "<|image_pad|>\nWhat is shown?"
    assert format_prompt("<|image_1|> shown", 1) == "<|image_1|> shown"
    with pytest.raises(ValueError, match="prompt format 'chat' is not one of raw, qwen3_vl_embedding"):
        format_prompt("x", 0, "chat")


@pytest.fixture(scope="module")
def qwen3(tiny_ckpt_qwen3_vl):
    return Embedder.from_pretrained(tiny_ckpt_qwen3_vl, prompt_format="qwen3_vl_embedding", instruction="Retrieve the image")


def test_chat_layout_embeddings_equal_transformers(qwen3, tiny_ckpt_qwen3_vl):
    hf = HFReference(str(tiny_ckpt_qwen3_vl))
    items = ["a dog on the grass", {"image": IMG, "text": "What is in the picture?"}]
    expected = np.stack([
        hf_embedding(hf, SYSTEM.format("Retrieve the image.") + "a dog on the grass" + END, []),
        hf_embedding(hf, SYSTEM.format("Retrieve the image.") + PAD + "What is in the picture?" + END, [IMG]),
    ])
    np.testing.assert_allclose(qwen3.encode(items), expected, atol=1e-5, rtol=0)
    raw = Embedder.from_pretrained(tiny_ckpt_qwen3_vl).encode(items)
    assert np.abs(raw - expected).max() > 1e-2  # the layout changes the vectors


def test_matryoshka_dimensions_are_renormalised_prefixes(qwen3):
    items = ["a dog on the grass", {"image": IMG}]
    full = qwen3.encode(items)
    short = qwen3.encode(items, dim=16)
    assert short.shape == (2, 16)
    np.testing.assert_allclose(short, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-6)
    for bad in (0, qwen3.dim + 1):
        with pytest.raises(ValueError, match=f"dim={bad}: a Matryoshka dimension must be in 1..{qwen3.dim}"):
            qwen3.encode(items, dim=bad)
