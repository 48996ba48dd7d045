"""rope_index against transformers' `Qwen2VLModel.get_rope_index` on the tiny checkpoint, and the
tiny checkpoint itself (it loads in transformers with every weight accounted for)."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

from vlm2vec_jax.processing.rope_index import rope_index
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def hf_model(ckpt_dir):
    return Qwen2VLForConditionalGeneration.from_pretrained(ckpt_dir).eval()


@pytest.fixture(scope="module")
def ids(hf_model):
    """Token ids the sequences are built from: text ids from the tiny vocabulary, and the specials."""
    cfg = hf_model.config
    return {"pad": cfg.image_token_id, "start": cfg.vision_start_token_id, "end": cfg.vision_end_token_id}


def seq(ids: dict, *parts) -> np.ndarray:
    """Concatenate parts: an int n = n text tokens, a grid tuple = that image's pads, a str = that special."""
    out = []
    for part in parts:
        if isinstance(part, int):
            out += list(range(10, 10 + part))
        elif isinstance(part, tuple):
            out += [ids["pad"]] * (part[0] * part[1] * part[2] // 4)
        else:
            out.append(ids[part])
    return np.asarray(out, dtype=np.int32)


def grids_of(parts) -> list[tuple[int, int, int]]:
    return [p for p in parts if isinstance(p, tuple)]


def ours(ids: dict, parts, rule: str = "hf5") -> np.ndarray:
    return rope_index(
        seq(ids, *parts), grids_of(parts), image_token_id=ids["pad"], vision_start_token_id=ids["start"], rule=rule
    )


def hf_rope_index(model, ids: dict, batch_parts: list, padding_side: str = "right") -> list[np.ndarray]:
    """transformers' positions for a padded batch, returned per sequence at its real tokens."""
    seqs = [seq(ids, *parts) for parts in batch_parts]
    length = max(s.size for s in seqs)
    input_ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, s.size) if padding_side == "right" else slice(length - s.size, length)
        input_ids[i, cols] = torch.from_numpy(s).long()
        mask[i, cols] = 1
    grids = [g for parts in batch_parts for g in grids_of(parts)]
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == ids["pad"]).int() * mask,
        image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
        attention_mask=mask,
    )
    return [positions[:, i, mask[i].bool()].numpy() for i in range(len(seqs))]


def test_checkpoint_loads_with_every_weight(ckpt_dir):
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(ckpt_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    cfg = model.config
    assert cfg.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text_config.vocab_size % 64 == 0 and cfg.text_config.vocab_size >= len(tokenizer)
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == 64 // 4 // 2
    assert cfg.text_config.rms_norm_eps == 1e-6
    # Norms and biases are perturbed away from the ones/zeros default init.
    norm = model.model.language_model.norm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))
    assert model.model.visual.blocks[0].attn.qkv.bias.abs().min() > 0
    preprocessor = json.loads((ckpt_dir / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 56 * 56, "longest_edge": 56 * 56 * 4}


def test_sharded_checkpoint(tmp_path):
    out = build_tiny_checkpoint(tmp_path, sharded=True, seed=1)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # Cheap enough to build per test module: what costs is the weights' size (random init, saving,
    # loading), so it stays tiny (under 1 MB; a real Qwen2-VL-2B is 4.4 GB).
    assert index["metadata"]["total_size"] < 1_000_000
    assert len(set(index["weight_map"].values())) > 1
    _, info = Qwen2VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


CASES = {
    "one image": [3, "start", (1, 4, 6), "end", 7],
    "image first, no vision_start": [(1, 4, 4), 9],
    "two images, different aspect ratios": [2, "start", (1, 4, 8), "end", 5, "start", (1, 8, 4), "end", 3],
    "tall then wide, text between": [(1, 10, 2), 4, (1, 2, 6), 1],
    "text only": [12],
}


@pytest.mark.parametrize("name", CASES)
def test_hf5_equals_transformers(hf_model, ids, name):
    parts = CASES[name]
    (expected,) = hf_rope_index(hf_model, ids, [parts])
    got = ours(ids, parts)
    assert got.dtype == np.int32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hf5_equals_transformers_on_padded_mixed_batch(hf_model, ids, padding_side):
    batch = [CASES["one image"], CASES["text only"], CASES["two images, different aspect ratios"], [2, (1, 6, 6)]]
    for parts, expected in zip(batch, hf_rope_index(hf_model, ids, batch, padding_side)):
        np.testing.assert_array_equal(ours(ids, parts), expected)


def test_legacy_with_vision_start_equals_hf5(ids):
    for parts in (CASES["one image"], CASES["two images, different aspect ratios"], CASES["text only"]):
        np.testing.assert_array_equal(ours(ids, parts, "legacy"), ours(ids, parts, "hf5"))


def test_legacy_without_vision_start_is_sequential(ids):
    parts = CASES["tall then wide, text between"]
    n = seq(ids, *parts).size
    np.testing.assert_array_equal(ours(ids, parts, "legacy"), np.tile(np.arange(n), (3, 1)))


def test_legacy_decides_per_image(ids):
    # Only the second image follows <|vision_start|>: it alone is laid out in 3-D, exactly as hf5 lays
    # out a sequence where the first image's pads are ordinary text tokens.
    parts = [2, (1, 4, 4), 3, "start", (1, 4, 8), "end", 2]
    as_text = [2, 4, 3, "start", (1, 4, 8), "end", 2]
    np.testing.assert_array_equal(ours(ids, parts, "legacy"), ours(ids, as_text, "hf5"))


def test_adjacent_images_consume_their_own_tokens(ids):
    # transformers 5.x would merge these two runs into one; each image keeps its own 3-D block here.
    got = ours(ids, [1, (1, 2, 4), (1, 4, 2), 1])
    # text | image 1: merged grid 1x2 at 1 | image 2: merged grid 2x1 at 1 + 2 | text at 3 + 2
    expected = [[0, 1, 1, 3, 3, 5], [0, 1, 1, 3, 4, 5], [0, 1, 2, 3, 3, 5]]
    np.testing.assert_array_equal(got, expected)


def test_errors(ids):
    pads = seq(ids, 2, (1, 4, 4))
    with pytest.raises(ValueError, match="4 image tokens.*need 8"):
        rope_index(pads, [(1, 4, 8)], image_token_id=ids["pad"])
    split = np.concatenate([pads[:4], [11], pads[4:]])
    with pytest.raises(ValueError, match="not contiguous"):
        rope_index(split, [(1, 4, 4)], image_token_id=ids["pad"])
    with pytest.raises(ValueError, match="unknown rope rule"):
        rope_index(pads, [(1, 4, 4)], image_token_id=ids["pad"], rule="4.x")
    with pytest.raises(ValueError, match="needs vision_start_token_id"):
        rope_index(pads, [(1, 4, 4)], image_token_id=ids["pad"], rule="legacy")
