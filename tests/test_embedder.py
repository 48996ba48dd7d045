"""Embedder.encode equals transformers' own pipeline item by item, packed (the default) or not, and
is independent of batching (more on packing in test_embedder_packing.py)."""

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hf_reference import HFReference, hf_embedding
from jaxpr_inspect import dot_operand_dtypes
from vlm2vec_jax import Embedder
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

ATOL = 1e-5
IMG_A, IMG_B, IMG_C = tiny_image(100, 60, 1), tiny_image(56, 120, 2), tiny_image(20, 200, 3)


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return HFReference(str(tiny_ckpt))


@pytest.fixture(scope="module")
def embedder(tiny_ckpt):
    return Embedder.from_pretrained(tiny_ckpt)


# (our item, the text transformers sees, its images)
CASES = [
    ("A photo of a dog running on the green grass.", "A photo of a dog running on the green grass.", []),
    ({"image": IMG_A}, "<|image_pad|>", [IMG_A]),
    ({"image": IMG_A, "text": "Represent the given image for classification."}, "<|image_pad|>\nRepresent the given image for classification.", [IMG_A]),
    ({"image": IMG_B, "text": "<|image_1|>\nWhat color is the bus?"}, "<|image_pad|>\nWhat color is the bus?", [IMG_B]),
    ({"image": [IMG_A, IMG_B], "text": "Compare <|image_pad|> with <|image_pad|> please."}, "Compare <|image_pad|> with <|image_pad|> please.", [IMG_A, IMG_B]),
    # under 28 px on a side: VLM2Vec resizes to 56x56 first
    ({"image": IMG_C, "text": "<|image_pad|> tiny"}, "<|image_pad|> tiny", [np.asarray(Image.fromarray(IMG_C).resize((56, 56), Image.Resampling.BICUBIC))]),
]


@pytest.fixture(scope="module")
def expected(hf):
    return np.stack([hf_embedding(hf, text, images) for _, text, images in CASES])


@pytest.mark.parametrize("packing", [True, False])
def test_encode_matches_transformers(tiny_ckpt, embedder, expected, packing):
    if not packing:
        embedder = Embedder.from_pretrained(tiny_ckpt, packing=False)
    vectors = embedder.encode([item for item, _, _ in CASES], batch_size=4)
    assert vectors.shape == (len(CASES), embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 8])
def test_vector_does_not_depend_on_batch(embedder, expected, batch_size):
    items = [item for item, _, _ in CASES]
    order = np.random.default_rng(batch_size).permutation(len(items))
    shuffled = embedder.encode([items[i] for i in order], batch_size=batch_size)
    np.testing.assert_allclose(shuffled, expected[order], atol=ATOL, rtol=0)


def test_left_padding_gives_the_same_vectors(tiny_ckpt, expected):
    left = Embedder.from_pretrained(tiny_ckpt, padding_side="left", packing=False)  # packed rows have no side
    np.testing.assert_allclose(left.encode([item for item, _, _ in CASES], batch_size=3), expected, atol=ATOL, rtol=0)


def test_legacy_rule_differs_only_for_images(tiny_ckpt, embedder):
    legacy = Embedder.from_pretrained(tiny_ckpt, position_rule="legacy")
    text, image = CASES[0][0], CASES[2][0]
    np.testing.assert_allclose(legacy.encode([text]), embedder.encode([text]), atol=ATOL)
    assert np.abs(legacy.encode([image]) - embedder.encode([image])).max() > 1e-3
    # with <|vision_start|> before the pads both rules agree
    framed = {"image": IMG_A, "text": "<|vision_start|><|image_pad|><|vision_end|>Describe."}
    np.testing.assert_allclose(legacy.encode([framed]), embedder.encode([framed]), atol=ATOL)


def test_bfloat16_embedder_is_close_to_float32(tiny_ckpt, embedder, expected):
    bf16 = Embedder.from_pretrained(tiny_ckpt, dtype="bfloat16")
    vectors = bf16.encode([item for item, _, _ in CASES])
    assert vectors.dtype == np.float32
    assert np.min(np.sum(vectors * expected, axis=1)) > 0.98
    # ... but computed in bfloat16: every matmul of the program `encode` runs takes bfloat16 operands
    # (bfloat16 weights alone, computed in float32, would not), and the vectors are far from the
    # float32 embedder's (which equal transformers' to ATOL).
    _, batch = next(bf16.batches([item for item, _, _ in CASES], 16))
    dots = dot_operand_dtypes(jax.make_jaxpr(bf16.embed_batch)(batch).jaxpr)
    assert len(dots) > 10 and set(dots) == {("bfloat16", "bfloat16")}, dots
    assert np.abs(vectors - embedder.encode([item for item, _, _ in CASES])).max() > 100 * ATOL


def test_truncation_keeps_image_tokens(tiny_ckpt, hf):
    short = Embedder.from_pretrained(tiny_ckpt, max_len=12)
    item = {"image": IMG_B, "text": "Represent the given image with the following question: what is in it?"}
    n_image = 8  # IMG_B is 56x120 -> 4x8 patches -> 8 merged tokens
    kept_text = hf.tokenizer.decode(hf.tokenizer("<|image_pad|>\n" + item["text"], add_special_tokens=False)["input_ids"][1 : 12 - n_image + 1])
    np.testing.assert_allclose(short.encode([item])[0], hf_embedding(hf, "<|image_pad|>" + kept_text, [IMG_B]), atol=ATOL)


@pytest.mark.parametrize(
    "item, message",
    [
        ({"text": ""}, "item 0: has neither text nor image"),
        ({"txt": "x"}, "unknown keys"),
        (3, "expected a str or a dict"),
        ({"image": "/no/such/file.png"}, "/no/such/file.png"),
        ({"image": IMG_A, "text": "<|image_pad|> <|image_pad|>"}, "2 image placeholder"),
    ],
)
def test_bad_items_name_the_item(embedder, item, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("|", r"\|")):
        embedder.encode([item])


def test_export_then_reload_gives_the_same_vectors(embedder, tmp_path):
    items = [item for item, _, _ in CASES]
    reloaded = Embedder.from_pretrained(embedder.save_pretrained(tmp_path / "export"))
    np.testing.assert_array_equal(reloaded.encode(items), embedder.encode(items))


def test_embedders_of_one_architecture_share_compiled_programs(tiny_ckpt, embedder, expected):
    """A second Embedder (another load, then other weights) compiles nothing the first one compiled,
    and runs its own weights."""
    items = [item for item, _, _ in CASES]
    embedder.encode(items, batch_size=4)  # every bucket these items need is compiled now
    compiles = []

    def count(event: str, _seconds: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    reloaded = Embedder.from_pretrained(tiny_ckpt)
    shifted = Embedder.from_pretrained(tiny_ckpt)
    nnx.update(shifted.model, jax.tree.map(lambda x: x * 1.01, nnx.state(shifted.model, nnx.Param)))
    shifted = Embedder(shifted.model, shifted.text, shifted.image_config)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        again = reloaded.encode(items, batch_size=4)
        moved = shifted.encode(items, batch_size=4)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == [], f"{len(compiles)} programs were compiled again"
    np.testing.assert_allclose(again, expected, atol=ATOL, rtol=0)
    assert np.abs(moved - expected).max() > 1e-3  # the shared program ran the new weights
