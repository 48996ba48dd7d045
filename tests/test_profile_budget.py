"""Packing budgets and representative batches from a training-set profile, on the built-in
`mmeb_shape` profile at the 2B recipes' settings (max_len 1536, 5120-patch vision rows)."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import pytest

from vlm2vec_jax.data.packing import PackingError
from vlm2vec_jax.data.profile_batches import draw_batches, shard_chunks
from vlm2vec_jax.data.profile_budget import budget_from_profile, mix_means
from vlm2vec_jax.data.profiles import BUILTIN, resolve_profile
from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config
from vlm2vec_jax.training.model_flops import FlopsModel
from vlm2vec_jax.training.pack_budget import with_overrides

FLOPS = FlopsModel(qwen2vl_2b_config(), rank=8)
SHARDS, QUERIES = 8, 1024


def budget(profile, hard_negatives: int = 0, chunk: int = 8, **caps):
    per_device = QUERIES // SHARDS
    return budget_from_profile(
        profile, queries=per_device, hard_negatives=hard_negatives, gc_chunks=per_device // chunk,
        max_text_len=caps.get("max_text_len", 1536), max_patches=caps.get("max_patches", 5120),
        text_row_cost=lambda n: float(FLOPS.decoder(n)), vision_row_cost=lambda n: float(FLOPS.vision(n)),
    )


@pytest.fixture(scope="module")
def profile():
    return resolve_profile("mmeb_shape")


def test_the_builtin_profile_is_small_and_at_the_2b_settings(profile) -> None:
    assert BUILTIN["mmeb_shape"].stat().st_size < 200_000  # histograms, not rows
    c = profile.config
    assert (c["model.max_len"], c["model.max_pixels"], c["patches_per_row"]) == (1536, 1280 * 28 * 28, 5120)
    assert profile.side("query")["image_tokens"]["max"] > 1200  # documents at MMEB's 1280-token cap
    assert sum(s["used_rows"] for s in profile.subsets.values()) == 5000


def test_budget_rows_fit_the_longest_sequence_and_the_largest_image(profile) -> None:
    b = budget(profile)
    longest = max(profile.side(s)["text_tokens"]["max"] for s in ("query", "target", "negative"))
    largest = max(profile.side(s)["patches"]["max"] for s in ("query", "target", "negative"))
    assert longest <= b.text_len < longest + 16 and b.text_len % 16 == 0
    assert largest <= b.vision_patches < largest + 16 and b.vision_patches % 4 == 0
    # A chunk holds one padded GradCache chunk's sequences (8 queries + 8 targets) at mean lengths.
    means = mix_means(profile, 0)
    tokens = 16 * sum(m.weight * m.tokens for m in means.values())
    patches = 16 * sum(m.weight * m.patches for m in means.values())
    assert abs(b.text_rows - tokens / b.text_len) < 1 and abs(b.vision_rows - patches / b.vision_patches) < 1
    assert b.slots == 256
    # Short rows cap at the config's: a profile longer than max_len is cut to it.
    assert budget(profile, max_text_len=1024).text_len == 1024


def test_budget_refuses_a_profile_whose_images_exceed_the_vision_row(profile) -> None:
    with pytest.raises(ValueError, match=r"data.profile .* over the 1024 .*model.max_pixels"):
        budget(profile, max_patches=1024)


def test_drawn_batches_are_deterministic_and_have_the_profiles_lengths(profile) -> None:
    draw = lambda seed: draw_batches(profile, queries=QUERIES, hard_negatives=5, one_task=True, seed=seed,  # noqa: E731
                                     max_len=1536, target_max_len=1536)
    batches = draw(0)
    assert [b.subset for b in batches] == list(profile.subsets)
    assert sum(b.weight for b in batches) == pytest.approx(1)
    assert batches[0].weight == profile.subsets[batches[0].subset]["used_rows"] / 5000
    for b, again, other in zip(batches, draw(0), draw(1)):
        assert np.array_equal(b.tokens, again.tokens) and np.array_equal(b.patches, again.patches)
        assert sorted(b.query_tokens) == sorted(other.query_tokens)  # the seed orders, the quantiles draw
        assert b.query_tokens.shape == (QUERIES,) and b.target_tokens.shape == (QUERIES * 6,)
        assert b.query_tokens.mean() == pytest.approx(profile.lengths("query", b.subset).mean(), rel=0.02)
        positives = b.target_patches.reshape(QUERIES, 6)[:, 0]
        assert positives.mean() == pytest.approx(profile.patches("target", b.subset).mean(), rel=0.02, abs=1)
        assert (b.patches <= 4 * b.tokens).all()  # a sequence holds its image's tokens


@pytest.mark.parametrize("h", [0, pytest.param(5, marks=pytest.mark.slow)])  # B3++ packs 7168 sequences a subset: ~40 s
def test_every_drawn_batch_packs_within_the_budget_and_wastes_little(profile, h: int) -> None:
    """The recipes' batches on this profile fit the capacity, and the chunks they fill cost at
    most 1.25 x the FLOPs of their sequences each alone (the formula; the dry run measures the
    compiled count). Fixed shapes cost about 5 x (B3) and 8 x (B3++)."""
    b = budget(profile, hard_negatives=h)
    executed = useful = padded = 0.0
    for batch in draw_batches(profile, queries=QUERIES, hard_negatives=h, one_task=True, seed=0, max_len=1536, target_max_len=1536):
        counts = shard_chunks(batch, b, SHARDS)
        assert counts.max() <= b.chunks
        chunk = b.text_rows * FLOPS.decoder(b.text_len) + b.vision_rows * FLOPS.vision(b.vision_patches)
        executed += batch.weight * SHARDS * counts.mean() * chunk
        useful += batch.weight * FLOPS.sequences(batch.tokens, batch.patches)
        padded += batch.weight * FLOPS.padded_step(sequences=batch.tokens.size, length=1536, patches=5120)
    assert executed / useful < 1.25 and padded / useful > (4.5 if h == 0 else 7.5)


def test_a_budget_too_small_for_a_batch_names_the_key(profile) -> None:
    batch = draw_batches(profile, queries=QUERIES, hard_negatives=0, one_task=True, seed=0, max_len=1536, target_max_len=1536)[0]
    with pytest.raises(PackingError, match="train.pack_chunks"):
        shard_chunks(batch, dataclasses.replace(budget(profile), chunks=2), SHARDS)


def test_useful_flops_of_full_length_sequences_are_the_padded_step() -> None:
    """Each sequence alone at max_len with the largest image is what the fixed shapes execute."""
    tokens, patches = np.full(16, 1536), np.full(16, 5120)
    assert FLOPS.sequences(tokens, patches) == pytest.approx(FLOPS.padded_step(sequences=16, length=1536, patches=5120))
    # attention is quadratic: two half-length sequences cost less than one full one
    assert 2 * FLOPS.decoder(768) < FLOPS.decoder(1536) and 2 * FLOPS.vision(2560) < FLOPS.vision(5120)
    assert FLOPS.vision(0) == 0


def test_the_flops_formula_names_what_it_does_not_cover() -> None:
    config = ml_collections.ConfigDict({
        "train": {"mode": "full", "freeze_vision": True, "gc_chunk_size": 8},
        "lora": {"rank": 8, "dora": True, "dropout": 0.1}, "model": {"remat": True},
    })
    with pytest.raises(ValueError, match="train.mode"):
        FlopsModel.of(config, qwen2vl_2b_config())
    config.train.mode, config.lora.dropout, config.model.remat = "lora", 0.0, False
    model = FlopsModel.of(config, qwen2vl_2b_config())
    assert (model.base_passes, model.caching, model.remat) == (1, True, False)


def _train(**keys) -> ml_collections.ConfigDict:
    defaults = dict(gc_chunk_size=8, pack_text_len=0, pack_text_rows=0, pack_vision_rows=0, pack_chunks=0)
    return ml_collections.ConfigDict({**defaults, **keys})


def test_pack_keys_override_a_budget_and_a_new_row_length_keeps_its_tokens(profile) -> None:
    """One rule for the profiled and the covering budget: unset keys change nothing, a set key wins,
    a shorter `pack_text_len` alone rescales the rows to hold at least the same tokens, and a
    text-only budget never gains vision rows."""
    base = budget(profile)
    assert with_overrides(base, _train()) == base
    longer = with_overrides(base, _train(pack_text_len=base.text_len // 2))
    assert longer.text_len * longer.text_rows >= base.text_len * base.text_rows > longer.text_len * (longer.text_rows - 1)
    explicit = with_overrides(base, _train(pack_text_len=base.text_len // 2, pack_text_rows=3, pack_vision_rows=5, pack_chunks=7))
    assert (explicit.text_rows, explicit.vision_rows, explicit.chunks) == (3, 5, 7)
    text_only = dataclasses.replace(base, vision_rows=0)
    assert with_overrides(text_only, _train(pack_vision_rows=5)).vision_rows == 0
    with pytest.raises(ValueError, match=r"train.pack_chunks > 1 needs GradCache \(train.gc_chunk_size > 0\)"):
        with_overrides(base, _train(gc_chunk_size=0, pack_chunks=2))
