"""Batcher: bucketed shapes, image packing and the image-token gather, on real tokens and images."""

import numpy as np
import pytest

from vlm2vec_jax.batch import TEXT_KEYS, VISION_KEYS
from vlm2vec_jax.models.model_dir_files import build_tiny_tokenizer
from vlm2vec_jax.processing.batching import Batcher, BucketSpec, Example, pick_bucket, shape_signature
from vlm2vec_jax.processing.image import ImageProcessorConfig, ProcessedImage, process_image, vision_patch_positions
from vlm2vec_jax.processing.rope_index import rope_index
from vlm2vec_jax.processing.text import TextProcessor
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

MAX_PIXELS = 56 * 56 * 4  # the tiny checkpoint's default: at most 64 patches per image
IMAGES = ImageProcessorConfig(max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> TextProcessor:
    return TextProcessor.from_pretrained_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")), max_len=128)


def make_batcher(text: TextProcessor, batch_size: int | None = None, **kwargs) -> Batcher:
    spec = BucketSpec.default(128, MAX_PIXELS // 14**2, batch_size=batch_size)
    return Batcher.from_text_processor(text, spec, **kwargs)


def tagged_image(tag: int, grid_hw: tuple[int, int]) -> ProcessedImage:
    """An image whose patch p holds the constant tag * 1000 + p, so a gather shows which patches it hit."""
    gh, gw = grid_hw
    values = tag * 1000 + np.arange(gh * gw, dtype=np.float32)
    return ProcessedImage(patches=np.repeat(values[:, None], 1176, axis=1), grid_thw=(1, gh, gw))


def example(text: TextProcessor, prompt: str, images: list[ProcessedImage], rule: str = "hf5") -> Example:
    return Example(text.encode(prompt, [img.num_tokens for img in images]), images, rule)


def test_default_buckets():
    spec = BucketSpec.default(300, 5120)
    assert spec.text_lengths == (16, 32, 64, 128, 256, 300)
    assert spec.patches_per_row == (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 5120)
    assert spec.vision_rows[:6] == (1, 2, 4, 8, 16, 32)
    fine = BucketSpec.default(300, 5118, half_octaves=True)  # rounded up to a multiple of 4
    assert fine.text_lengths == spec.text_lengths
    assert fine.patches_per_row[:6] == (16, 24, 32, 48, 64, 96) and fine.patches_per_row[-1] == 5120
    assert all(r % 4 == 0 for r in fine.patches_per_row)
    assert fine.vision_rows[:8] == (1, 2, 3, 4, 6, 8, 12, 16)
    assert pick_bucket(33, spec.text_lengths, "length") == 64
    with pytest.raises(ValueError, match="exceeds the largest bucket 300"):
        pick_bucket(301, spec.text_lengths, "length")
    with pytest.raises(ValueError, match="strictly increasing"):
        BucketSpec(text_lengths=(32, 16), patches_per_row=(64,), vision_rows=(1,))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_shapes_positions_and_padding_rows(text, padding_side):
    img = process_image(tiny_image(60, 100), IMAGES)
    examples = [
        example(text, "<|image_1|> Represent the given image for classification.", [img]),
        example(text, "A red car is parked next to a small white house.", []),
    ]
    batch = make_batcher(text, batch_size=4, padding_side=padding_side)(examples)
    n = [e.input_ids.size for e in examples]
    assert 16 < max(n) <= 32  # so the length bucket is 32
    assert shape_signature(batch) == (4, 32, 1, 32)
    assert batch["position_ids"].shape == (3, 4, 32)
    assert {k: batch[k].dtype for k in TEXT_KEYS + VISION_KEYS} == {
        **{k: np.int32 for k in TEXT_KEYS + VISION_KEYS},
        "pixel_values": np.float32,
    }
    for row, e in enumerate(examples):
        real = batch["attention_mask"][row].astype(bool)
        assert real.sum() == n[row]
        start = 0 if padding_side == "right" else 32 - n[row]
        np.testing.assert_array_equal(np.flatnonzero(real), np.arange(start, start + n[row]))
        np.testing.assert_array_equal(batch["input_ids"][row, real], e.input_ids)
        expected = rope_index(e.input_ids, [i.grid_thw for i in e.images], image_token_id=text.image_token_id)
        np.testing.assert_array_equal(batch["position_ids"][:, row, real], expected)
        assert (batch["position_ids"][:, row, ~real] == 0).all()
        assert (batch["input_ids"][row, ~real] == text.pad_token_id).all()
    # Padding rows: fully masked, pad ids, positions 0, no image tokens.
    assert not batch["attention_mask"][2:].any() and (batch["input_ids"][2:] == text.pad_token_id).all()
    assert not batch["position_ids"][:, 2:].any() and (batch["image_token_index"][2:] == -1).all()


def test_image_token_index_gathers_the_right_merged_tokens(text):
    # Three sequences, five images of different sizes and aspect ratios, images packed across rows.
    imgs = [tagged_image(t, hw) for t, hw in enumerate([(4, 8), (8, 8), (2, 4), (6, 4), (4, 4)], start=1)]
    examples = [
        example(text, "<|image_1|> first <|image_2|> second", imgs[:2]),
        example(text, "no image at all", []),
        example(text, "<|image_1|> a <|image_2|> b <|image_3|>", imgs[2:]),
    ]
    batch = make_batcher(text, padding_side="left")(examples)
    v, r, _ = batch["pixel_values"].shape
    assert r == 64  # the largest image has 64 patches
    merged = batch["pixel_values"][..., 0].reshape(v * r // 4, 4)  # what the merger folds together
    index = batch["image_token_index"]
    is_pad = batch["input_ids"] == text.image_token_id
    assert ((index >= 0) == is_pad).all()
    # In order of appearance, sequence by sequence, the tokens must gather each image's merged
    # tokens in order: merged token k of image t holds patches t*1000 + 4k .. 4k+3.
    expected = np.concatenate([img.patches[:, 0].reshape(-1, 4) for img in imgs])
    np.testing.assert_array_equal(merged[index[is_pad]], expected)


def test_packing_segments_and_patch_positions(text):
    imgs = [tagged_image(t, hw) for t, hw in enumerate([(4, 8), (8, 8), (2, 4), (6, 4), (4, 4)], start=1)]
    batch = make_batcher(text)([example(text, "<|image_1|>" * len(imgs), imgs)])
    # First-fit in order into rows of 64: [32 + 8 + 24 (images 1, 3, 4)], [64 (2)], [16 (5)];
    # 3 rows -> V bucket 4, the last row all padding.
    seg = batch["patch_segment_ids"]
    assert seg.shape == (4, 64) and not seg[3].any() and not batch["pixel_values"][3].any()
    np.testing.assert_array_equal(seg[0], [1] * 32 + [2] * 8 + [3] * 24)
    np.testing.assert_array_equal(seg[1], [1] * 64)
    np.testing.assert_array_equal(seg[2], [1] * 16 + [0] * 48)
    tags = batch["pixel_values"][..., 0] // 1000
    np.testing.assert_array_equal(tags[0], [1] * 32 + [3] * 8 + [4] * 24)
    assert (tags[1] == 2).all() and (tags[2, :16] == 5).all()
    assert not batch["pixel_values"][2, 16:].any()
    pos = batch["patch_positions"]
    np.testing.assert_array_equal(pos[0, 32:40], vision_patch_positions((1, 2, 4)))
    np.testing.assert_array_equal(pos[0, 40:], vision_patch_positions((1, 6, 4)))
    assert not pos[2, 16:].any()


def test_text_only_batch_has_no_vision_rows(text):
    batch = make_batcher(text, batch_size=2)([example(text, "just text", [])])
    assert batch["pixel_values"].shape == (0, 4, 1176)
    assert batch["patch_positions"].shape == (0, 4, 2)
    assert batch["patch_segment_ids"].shape == (0, 4)
    assert (batch["image_token_index"] == -1).all()


def test_legacy_rule_per_example(text):
    img = process_image(tiny_image(56, 112), IMAGES)
    prompt = "<|image_1|> Represent the given image."
    batch = make_batcher(text)([example(text, prompt, [img], "legacy"), example(text, prompt, [img], "hf5")])
    n = batch["attention_mask"][0].sum()
    np.testing.assert_array_equal(batch["position_ids"][:, 0, :n], np.tile(np.arange(n), (3, 1)))
    assert (batch["position_ids"][:, 1, :n] != batch["position_ids"][:, 0, :n]).any()


def test_errors(text):
    img = process_image(tiny_image(56, 56), IMAGES)
    batcher = make_batcher(text, batch_size=1)
    with pytest.raises(ValueError, match="exceed the fixed batch size 1"):
        batcher([example(text, "a", []), example(text, "b", [])])
    with pytest.raises(ValueError, match="image tokens"):
        batcher([Example(text.encode("no placeholder"), [img])])
    with pytest.raises(ValueError, match="sequence length 129 exceeds"):
        batcher([Example(np.ones(129, dtype=np.int32))])
    with pytest.raises(ValueError, match="unknown rope rule"):
        batcher([Example(text.encode("x"), [], "4.x")])
    with pytest.raises(ValueError, match="padding_side"):
        make_batcher(text, padding_side="middle")


def random_stream(text: TextProcessor, n: int, seed: int = 0) -> list[Example]:
    """Examples with 1-40 words and 0-2 images of random sizes (16-64 patches each)."""
    rng = np.random.default_rng(seed)
    words = "a dog red car runs on the green grass near small white house".split()
    examples = []
    for _ in range(n):
        sizes = rng.integers(28, 200, size=(rng.integers(0, 3), 2))
        images = [process_image(tiny_image(int(h), int(w), seed=int(h * w)), IMAGES) for h, w in sizes]
        prompt = "<|image_1|> " * len(images) + " ".join(rng.choice(words, rng.integers(1, 40)))
        examples.append(example(text, prompt, images))
    return examples


def stream_shapes(text: TextProcessor, examples: list[Example], spec: BucketSpec, label: str) -> tuple[set, float]:
    """Distinct shape signatures of the stream cut into batches, and the share of patch slots used."""
    batcher = Batcher.from_text_processor(text, spec)
    batches = [batcher(examples[i : i + spec.batch_size]) for i in range(0, len(examples), spec.batch_size)]
    distinct = sorted({shape_signature(b) for b in batches})
    slots = [b["patch_segment_ids"] for b in batches]
    fill = sum((s > 0).sum() for s in slots) / sum(s.size for s in slots)
    print(f"\n{label}: {len(batches)} batches of {spec.batch_size} -> {len(distinct)} shapes, "
          f"{fill:.0%} of patch slots real: {[tuple(d) for d in distinct]}")
    return set(distinct), fill


def test_random_stream_compiles_few_shapes(text):
    examples = random_stream(text, 50)
    spec = BucketSpec.default(128, MAX_PIXELS // 14**2, batch_size=4)
    shapes, fill = stream_shapes(text, examples, spec, "default")
    # 13 batches; each dimension takes only a couple of bucket values.
    assert len({s.length for s in shapes}) <= 2
    assert len({s.patches_per_row for s in shapes if s.vision_rows}) <= 2
    assert len({s.vision_rows for s in shapes}) <= 4
    assert len(shapes) <= 8
    fine = BucketSpec.default(128, MAX_PIXELS // 14**2, batch_size=4, half_octaves=True)
    fine_shapes, fine_fill = stream_shapes(text, examples, fine, "half octaves")
    assert fine_fill > fill and len(fine_shapes) >= len(shapes)


def test_fixed_shape_spec_compiles_once(text):
    # Training-style: one length, one row size, one row count -> one shape (two with a text-only batch).
    spec = BucketSpec(text_lengths=(128,), patches_per_row=(64,), vision_rows=(16,), batch_size=8)
    shapes, _ = stream_shapes(text, random_stream(text, 50), spec, "fixed")
    assert shapes <= {(8, 128, 16, 64), (8, 128, 0, 4)}
