"""TextProcessor against the real (tiny) tokenizer loaded by transformers' AutoTokenizer."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from vlm2vec_jax.models.model_dir_files import SPECIAL_TOKENS, build_tiny_tokenizer
from vlm2vec_jax.processing.text import TextProcessor

PLAIN_TEXTS = [
    "Represent the given image for classification.",
    "A photo of a dog running on the green grass in the park.",
    "  leading spaces, CAPS, numbers 12345 and 3.14\nnew line\n\n tabs\tand ünïcödé — émoji 🙂",
    "what's the title? it's 'quoted' (really)!",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def processor(tokenizer_dir) -> TextProcessor:
    return TextProcessor.from_pretrained_dir(tokenizer_dir)


def hf_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tiny_tokenizer_loads_and_round_trips(hf_tokenizer):
    assert 400 <= len(hf_tokenizer) <= 1000
    assert hf_tokenizer.pad_token == "<|endoftext|>"
    for token in SPECIAL_TOKENS:
        assert len(hf_ids(hf_tokenizer, token)) == 1, token
    # Special tokens sit after the learned vocabulary, as in Qwen.
    assert hf_tokenizer.convert_tokens_to_ids("<|endoftext|>") == len(hf_tokenizer) - len(SPECIAL_TOKENS)
    # MMEB's placeholder is plain text for the tokenizer: TextProcessor has to map it.
    assert len(hf_ids(hf_tokenizer, "<|image_1|>")) > 1
    for text in PLAIN_TEXTS + ["<|vision_start|><|image_pad|><|vision_end|> Represent the image."]:
        assert hf_tokenizer.decode(hf_ids(hf_tokenizer, text)) == text


def test_plain_text_equals_transformers(processor, hf_tokenizer):
    for text in PLAIN_TEXTS:
        ids = processor.encode(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == hf_ids(hf_tokenizer, text)


def test_placeholders_mapped_and_expanded(processor, hf_tokenizer):
    pad = "<|image_pad|>"
    cases = [
        ("<|image_1|> Represent the given image for classification.", [5]),
        ("<|image_1|>\nCompare <|image_2|> with the first one.", [4, 9]),
        (f"{pad} already the backbone's token", [3]),
    ]
    for text, counts in cases:
        ids = processor.encode(text, counts)
        # transformers' Qwen2-VL processor expands the placeholder string the same way.
        expanded = text.replace("<|image_1|>", pad).replace("<|image_2|>", pad).split(pad)
        reference = expanded[0] + "".join(pad * c + rest for c, rest in zip(counts, expanded[1:]))
        assert ids.tolist() == hf_ids(hf_tokenizer, reference)
        assert (ids == processor.image_token_id).sum() == sum(counts)


def test_encode_batch_equals_encode(processor):
    texts = ["<|image_1|> a red car", "no image here", "<|image_1|><|image_2|> two"]
    counts = [[4], [], [2, 6]]
    for got, text, c in zip(processor.encode_batch(texts, counts), texts, counts):
        np.testing.assert_array_equal(got, processor.encode(text, c))


def test_placeholder_count_mismatch(processor):
    with pytest.raises(ValueError, match="1 image placeholder.*0 image"):
        processor.encode("<|image_1|> a dog")
    with pytest.raises(ValueError, match="1 image placeholder.*2 image"):
        processor.encode("<|image_1|> a dog", [4, 4])
    with pytest.raises(ValueError, match="0 image placeholder.*1 image"):
        processor.encode("a dog", [4])


def test_truncation_keeps_every_image_token(tokenizer_dir):
    full = TextProcessor.from_pretrained_dir(tokenizer_dir)
    short = TextProcessor.from_pretrained_dir(tokenizer_dir, max_len=20)
    text = "<|image_1|> a dog runs on the grass and the sea, then <|image_2|> the end of a long long caption"
    counts = [6, 8]
    untruncated = full.encode(text, counts)
    assert untruncated.size > 20
    ids = short.encode(text, counts)
    assert ids.size == 20
    is_image = ids == short.image_token_id
    assert is_image.sum() == 14
    # The text kept is the first text tokens, in order; images stay where they were relative to it.
    np.testing.assert_array_equal(ids[~is_image], untruncated[untruncated != full.image_token_id][:6])
    assert ids[-8:].tolist() == [short.image_token_id] * 8  # the second image survives the cut
    # Short enough texts are untouched.
    np.testing.assert_array_equal(short.encode("<|image_1|> a dog", [4]), full.encode("<|image_1|> a dog", [4]))


def test_images_longer_than_max_len(tokenizer_dir):
    proc = TextProcessor.from_pretrained_dir(tokenizer_dir, max_len=16)
    with pytest.raises(ValueError, match="max_len.*max_pixels"):
        proc.encode("<|image_1|> a cat", [17])


def test_bad_image_token(hf_tokenizer):
    with pytest.raises(ValueError, match="not a single token"):
        TextProcessor(hf_tokenizer, image_token="<|image_1|>")
