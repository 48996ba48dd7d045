"""The "legacy" M-RoPE rule against golden outputs of transformers 4.52.3's `get_rope_index`.

VLM2Vec pins transformers==4.52.3 and vendors the same `get_rope_index`; the golden positions in
tests/fixtures/legacy_rope_index.json come from it (regenerate with
tests/scripts/make_legacy_rope_fixture.py under a transformers 4.x environment). Each case goes
through `Batcher`, the path the model's positions take, with the same padding side and length, and
is compared at the real tokens (4.x fills padding with 1, our batches with 0).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from vlm2vec_jax.processing.batching import PATCH_DIM, Batcher, BucketSpec, Example
from vlm2vec_jax.processing.image import ProcessedImage

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "legacy_rope_index.json").read_text())
CASES = {case["name"]: case for case in FIXTURE["cases"]}
MATCHING = [name for name, case in CASES.items() if not case["deviation"]]
DEVIATIONS = [name for name, case in CASES.items() if case["deviation"]]


def our_batch(case: dict) -> dict:
    """`Batcher`'s batch for the fixture case's sequences, with the legacy rule on every row."""
    ids, mask = np.asarray(case["input_ids"]), np.asarray(case["attention_mask"]).astype(bool)
    grids = [tuple(g) for g in case["image_grid_thw"] or []]
    images = [ProcessedImage(patches=np.zeros((h * w, PATCH_DIM), np.float32), grid_thw=(t, h, w)) for t, h, w in grids]
    examples, start = [], 0
    for row, count in enumerate(case["images_per_row"]):
        examples.append(Example(ids[row][mask[row]], images[start : start + count], "legacy"))
        start += count
    patches = max([-(-img.patches.shape[0] // 4) * 4 for img in images], default=4)
    batcher = Batcher(
        buckets=BucketSpec(text_lengths=(ids.shape[1],), patches_per_row=(patches,), vision_rows=(1, 2, 4, 8)),
        image_token_id=FIXTURE["token_ids"]["image_pad"],
        vision_start_token_id=FIXTURE["token_ids"]["vision_start"],
        pad_token_id=FIXTURE["token_ids"]["pad"],
        padding_side=case["padding_side"],
        merge_size=FIXTURE["spatial_merge_size"],
    )
    return batcher(examples)


def test_fixture_is_from_transformers_4():
    assert FIXTURE["transformers"].startswith("4.")
    assert FIXTURE["token_ids"] == {
        "pad": 151643,
        "vision_start": 151652,
        "vision_end": 151653,
        "image_pad": 151655,
        "video_pad": 151656,
    }
    assert len(MATCHING) >= 15 and DEVIATIONS


@pytest.mark.parametrize("name", MATCHING)
def test_legacy_equals_transformers_4(name):
    case = CASES[name]
    batch = our_batch(case)
    mask = np.asarray(case["attention_mask"]).astype(bool)
    np.testing.assert_array_equal(batch["input_ids"], case["input_ids"], err_msg=f"{name}: batch layout")
    np.testing.assert_array_equal(batch["attention_mask"], mask, err_msg=f"{name}: attention mask")
    golden = np.asarray(case["position_ids"])
    for row in range(mask.shape[0]):
        got, expected = batch["position_ids"][:, row, mask[row]], golden[:, row, mask[row]]
        np.testing.assert_array_equal(got, expected, err_msg=f"{name}: row {row} positions (t, h, w)")
        # rope_deltas: 4.x's max position + 1 - padded length, derived from the same positions.
        assert got.max() + 1 - mask.shape[1] == case["rope_deltas"][row], f"{name}: row {row} rope_deltas"


@pytest.mark.parametrize("name", DEVIATIONS)
def test_documented_deviations_still_differ(name):
    # Inputs that 4.x mishandles (see `rope_index`'s docstring): ours follows the per-image rule.
    case = CASES[name]
    batch = our_batch(case)
    mask = np.asarray(case["attention_mask"]).astype(bool)
    golden = np.asarray(case["position_ids"])
    assert not np.array_equal(batch["position_ids"][:, mask], golden[:, mask]), f"{name}: {case['deviation']}"
