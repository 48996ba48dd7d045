"""Packed inference batches: the host layout, and vectors that equal one-item and unpacked encodes."""

import numpy as np
import pytest

from vlm2vec_jax import Embedder
from vlm2vec_jax.models.model_dir_files import build_tiny_tokenizer
from vlm2vec_jax.processing.batching import Batcher, BucketSpec, Example
from vlm2vec_jax.processing.image import ImageProcessorConfig, process_image
from vlm2vec_jax.processing.packed_batching import PackedBatcher, first_fit
from vlm2vec_jax.processing.text import TextProcessor
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

ATOL = 1e-5
IMG_A, IMG_B, IMG_C, IMG_D = tiny_image(100, 60, 1), tiny_image(56, 120, 2), tiny_image(20, 200, 3), tiny_image(180, 150, 4)
LONG = "Represent the given dialogue about the photo for retrieval: " + "what is on the left of the red square? " * 6
# text only of several lengths, images of several sizes, two images in one item
ITEMS = [
    "a",
    "A photo of a dog running on the green grass.",
    LONG,
    {"image": IMG_A},
    {"image": IMG_A, "text": "Represent the given image for classification."},
    {"image": IMG_B, "text": "<|image_1|>\nWhat color is the bus?"},
    {"image": [IMG_A, IMG_D], "text": "Compare <|image_pad|> with <|image_pad|> please."},
    {"image": IMG_C, "text": "<|image_pad|> tiny"},
    {"image": IMG_D, "text": LONG},
    "bus",
]


@pytest.fixture(scope="module")
def embedder(tiny_ckpt):
    return Embedder.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def alone(embedder):
    """Each item encoded in a batch of its own."""
    return np.stack([embedder.encode([item])[0] for item in ITEMS])


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_packed_vector_does_not_depend_on_batch(embedder, alone, batch_size):
    order = np.random.default_rng(batch_size).permutation(len(ITEMS))
    shuffled = [ITEMS[i] for i in order]
    batches = list(embedder.batches(shuffled, batch_size))
    segments = max(int(batch["attention_mask"].max()) for _, batch in batches)
    assert segments >= 3 and len(batches) < len(ITEMS)  # really packed: several items share a row
    np.testing.assert_allclose(embedder.encode(shuffled, batch_size=batch_size), alone[order], atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_equals_unpacked(tiny_ckpt, embedder, padding_side):
    """Unpacked batches pool each row's last token: a wrong pooled column or segment mask differs."""
    unpacked = Embedder.from_pretrained(tiny_ckpt, packing=False, padding_side=padding_side)
    np.testing.assert_allclose(embedder.encode(ITEMS, batch_size=4), unpacked.encode(ITEMS, batch_size=4), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ host layout
@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextProcessor, list[Example]]:
    text = TextProcessor.from_pretrained_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")), max_len=512)
    images = ImageProcessorConfig(max_pixels=56 * 56 * 16)
    out = []
    for prompt, pictures in [("a b c", []), (LONG, []), ("<|image_pad|> x", [IMG_A]), ("<|image_pad|><|image_pad|>", [IMG_B, IMG_C]),
                             ("hello there", []), (LONG + "<|image_pad|>", [IMG_D])]:
        processed = [process_image(p, images) for p in pictures]
        out.append(Example(text.encode(prompt, [p.num_tokens for p in processed]), processed))
    return text, out


def packer(text: TextProcessor, **kwargs) -> PackedBatcher:
    return PackedBatcher(Batcher.from_text_processor(text, BucketSpec.default(512, 256)), **kwargs)


def test_first_fit():
    np.testing.assert_array_equal(first_fit([5, 4, 3, 2, 1], 6), [0, 1, 2, 1, 0])
    np.testing.assert_array_equal(first_fit([5, 4, 3, 2, 1], 6, max_rows=2), [0, 1, -1, 1, 0])


@pytest.mark.parametrize("rows_multiple", [1, 4])
def test_segments_hold_the_padded_rows(examples, rows_multiple):
    """Every sequence is a segment with the padded batch's own tokens, positions and image indices;
    its vector slot names its last token; shapes are bucketed."""
    text, seqs = examples
    seqs = sorted(seqs, key=lambda e: -sum(img.patches.shape[0] for img in e.images))  # the order images pack in
    pack = packer(text, max_rows=4, min_length=64, rows_multiple=rows_multiple)
    padded = pack.batcher(seqs)
    batch, slots = pack(seqs)
    rows, length = batch["input_ids"].shape
    q = batch["pool_positions"].shape[1]
    assert (length, rows) == (256, max(2, rows_multiple)) and q == 8  # 159 + 12 + 10 + 5 + 3 tokens, then 129
    assert len(set(slots.tolist())) == len(seqs)
    for k, e in enumerate(seqs):
        row, column = divmod(int(slots[k]), q)
        end = int(batch["pool_positions"][row, column]) + 1
        cols = slice(end - e.input_ids.size, end)
        assert (batch["attention_mask"][row] == column + 1).sum() == e.input_ids.size
        np.testing.assert_array_equal(batch["attention_mask"][row, cols], column + 1)
        np.testing.assert_array_equal(batch["input_ids"][row, cols], e.input_ids)
        np.testing.assert_array_equal(batch["position_ids"][:, row, cols], padded["position_ids"][:, k, : e.input_ids.size])
        np.testing.assert_array_equal(batch["image_token_index"][row, cols], padded["image_token_index"][k, : e.input_ids.size])
    for key in ("pixel_values", "patch_positions", "patch_segment_ids"):
        np.testing.assert_array_equal(batch[key], padded[key])


def test_groups_fill_rows_and_cover_every_sequence(examples):
    text, seqs = examples
    pack = packer(text, max_rows=1, min_length=16)
    lengths = [e.input_ids.size for e in seqs]
    groups = list(pack.groups(lengths))
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(seqs)))
    for group in groups:
        assert sum(lengths[k] for k in group) <= pack.row_length(max(lengths[k] for k in group))
        assert pack([seqs[k] for k in group]).inputs["input_ids"].shape[0] == 1
    with pytest.raises(ValueError, match="over 1"):
        pack(seqs)


@pytest.mark.parametrize("rows_multiple", [1, 2])
def test_groups_fill_every_row_they_build(examples, rows_multiple):
    """A batch is built with exactly the rows its sequences fill (a power of two rows): the rows
    past the largest such count go to a later batch instead of padding this one."""
    pack = packer(examples[0], max_rows=16, min_length=64, rows_multiple=rows_multiple)
    lengths = np.random.default_rng(0).integers(1, 300, 500)
    groups = list(pack.groups(lengths))
    assert sorted(np.concatenate(groups).tolist()) == list(range(lengths.size))
    rows_built = []
    for k, group in enumerate(groups):
        ordered = np.sort(lengths[group])[::-1]
        used = int(first_fit(ordered, pack.row_length(int(ordered[0]))).max()) + 1
        last_and_below_the_multiple = k == len(groups) - 1 and used < rows_multiple
        assert used in pack.row_counts() or last_and_below_the_multiple, (used, pack.row_counts())
        rows_built.append(used)
    assert max(rows_built) == 16 and len(set(rows_built)) > 1  # full batches, and smaller ones for the rest
