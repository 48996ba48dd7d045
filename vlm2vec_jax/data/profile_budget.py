"""Packing budgets sized from a training-set profile (`data/profile.py`) instead of the worst case.

`PackBudget.covering` sizes a packed chunk to hold one padded GradCache chunk's slots: every
sequence `max_len` tokens with the largest image. On MMEB-shaped data that chunk holds several
times the padded chunk's sequences, so a step runs few, large chunks and pays for whatever the
last one leaves empty. `budget_from_profile` sizes the chunk for what the data holds instead:

- `text_len`: the longest sequence the profile has, rounded up to `ALIGN` tokens (capped at the
  config's longest row). Not `max_len`: dense masked attention over a packed row costs
  `text_len**2` whatever its segments, so a row longer than any sequence only wastes.
- `vision_patches`: the profile's largest image, rounded up to `ALIGN` (capped at the config's
  vision row), for the same reason: the tower's attention costs `vision_patches**2` per row, and
  the row must take the largest image whole.
- `text_rows` / `vision_rows`: a chunk holds the tokens and patches of one padded GradCache chunk's
  sequences (`gc_chunk_size * (2 + hard negatives)`) at the profile's mean lengths, the mean over
  the recipe's mix (one query, one positive and h hard negatives per row, subsets by rows). So a
  chunk's memory is that of an average padded chunk, not the worst one, and a step runs about as
  many chunks as GradCache would on average-length data: the last, partly filled chunk of each
  device is a small share of its work. Each count is that mean rounded down or up, whichever of
  the (up to) four pairs costs least in expectation: a chunk runs all its rows, and a subset's
  batch fills chunks until its text or its vision rows run out, so the split between them must
  match the subsets' mix of text and images (one text row too many costs a row's FLOPs in every
  chunk of every step). The cost is `expected_cost`: the subsets' chunks, weighted by rows, times
  a chunk's FLOPs (`text_row_cost` and `vision_row_cost`, from `training.model_flops`).
- `chunks` (capacity, arrays only): 1.5 x the largest per-device chunk count any subset's mean
  needs, plus 2, for the variation between batches and first-fit's imperfect fill; a batch over it
  is a `PackingError` naming `train.pack_chunks`.
- `slots`: every sequence of a device shard (never the limit).

The `train.pack_*` keys still win where set (the trainer's `packing_budget` semantics).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from vlm2vec_jax.batch import MERGE_UNITS
from vlm2vec_jax.data.packing import PackBudget
from vlm2vec_jax.data.profile import Profile

ALIGN = 16  # row lengths in multiples of 16 tokens / patches: tile-friendly (64 would cost 0.6% more FLOPs on mmeb_shape)
CAPACITY_MARGIN = 1.5


@dataclasses.dataclass(frozen=True)
class SideMeans:
    """Mean tokens and patches per sequence of one subset (or the whole set) in the recipe's mix."""

    tokens: float
    patches: float
    weight: float  # the subset's share of training rows


def _mean(profile: Profile, side: str, subset: str | None, field: str) -> float:
    section = profile.side(side, subset)
    if not section["sequences"]:
        return 0.0
    return float(np.mean(profile.lengths(side, subset) if field == "tokens" else profile.patches(side, subset)))


def negative_side(profile: Profile, subset: str | None) -> str:
    """Where hard negatives' lengths come from: the profile's negatives where it recorded any, else
    the positives (B3++'s mined negatives are other rows' positives of the same task)."""
    return "negative" if profile.side("negative", subset)["sequences"] else "target"


def mix_means(profile: Profile, hard_negatives: int) -> dict[str, SideMeans]:
    """Per subset: mean tokens and patches per sequence over one query, one positive and
    `hard_negatives` negatives, and its share of the profile's used rows."""
    total = sum(s["used_rows"] for s in profile.subsets.values())
    out = {}
    for name, section in profile.subsets.items():
        sides = [("query", 1), ("target", 1), (negative_side(profile, name), hard_negatives)]
        per = 2 + hard_negatives
        out[name] = SideMeans(
            sum(k * _mean(profile, s, name, "tokens") for s, k in sides) / per,
            sum(k * _mean(profile, s, name, "patches") for s, k in sides) / per,
            section["used_rows"] / total,
        )
    return out


def _round_up(n: int, unit: int, cap: int) -> int:
    return min(-(-n // unit) * unit, cap)


def _chunks_needed(means: dict[str, SideMeans], sequences: int, text: float, vision: float) -> dict[str, float]:
    """Per subset: chunks a shard of `sequences` mean-length sequences fills, the side that runs out first deciding."""
    return {
        name: max(sequences * m.tokens / text, sequences * m.patches / vision if vision else 0.0)
        for name, m in means.items()
    }


def expected_cost(
    means: dict[str, SideMeans], sequences: int, text_len: int, text_rows: int, vision_patches: int, vision_rows: int,
    text_row_cost: float, vision_row_cost: float,
) -> float:
    """Expected executed FLOPs of a shard of `sequences` sequences (continuous chunk counts, no
    bin-packing losses): the subsets' chunks weighted by rows, times what one chunk runs."""
    need = _chunks_needed(means, sequences, text_rows * text_len, vision_rows * vision_patches)
    return sum(m.weight * need[name] for name, m in means.items()) * (text_rows * text_row_cost + vision_rows * vision_row_cost)


def budget_from_profile(
    profile: Profile, *, queries: int, hard_negatives: int, gc_chunks: int, max_text_len: int, max_patches: int,
    text_row_cost: Callable[[int], float], vision_row_cost: Callable[[int], float],
) -> PackBudget:
    """The packed chunk budget (module docstring) for a device shard of `queries` queries and
    `queries * (1 + hard_negatives)` targets that GradCache splits into `gc_chunks` chunks (0 = no
    caching: one chunk holds the whole shard). `max_text_len` / `max_patches`: the config's longest
    text row and its vision row; ValueError naming `data.profile` when the profile's sequences or
    images exceed them. `text_row_cost(length)` / `vision_row_cost(patches)`: FLOPs of one row."""
    sides = ("query", "target", "negative")
    longest = max((profile.side(s)["text_tokens"]["max"] or 0) for s in sides)
    largest = max((profile.side(s)["patches"]["max"] or 0) for s in sides)
    if largest > max_patches:
        raise ValueError(
            f"data.profile has an image of {largest} patches, over the {max_patches} of this config's vision "
            "row (model.max_pixels): profile the training set at this config's settings"
        )
    text_len = _round_up(min(longest, max_text_len), ALIGN, max_text_len)
    vision_patches = _round_up(largest, ALIGN, max_patches) if largest else 0
    vision_patches -= vision_patches % MERGE_UNITS
    means = mix_means(profile, hard_negatives)
    tokens = sum(m.weight * m.tokens for m in means.values())
    patches = sum(m.weight * m.patches for m in means.values())
    targets = queries * (1 + hard_negatives)
    per_chunk = (queries + targets) // gc_chunks if gc_chunks else queries + targets
    sequences = queries + targets
    x_text, x_vision = per_chunk * tokens / text_len, per_chunk * patches / vision_patches if vision_patches else 0.0
    options = {(max(1, t), max(1, v) if vision_patches else 0)
               for t in (math.floor(x_text), math.ceil(x_text)) for v in (math.floor(x_vision), math.ceil(x_vision))}
    costs = (text_row_cost(text_len), vision_row_cost(vision_patches) if vision_patches else 0.0)
    text_rows, vision_rows = min(
        sorted(options), key=lambda o: expected_cost(means, sequences, text_len, o[0], vision_patches, o[1], *costs)
    )
    need = max(_chunks_needed(means, sequences, text_rows * text_len, vision_rows * vision_patches).values())
    chunks = math.ceil(CAPACITY_MARGIN * need) + 2 if gc_chunks else 1
    if not gc_chunks:  # one chunk: it must hold the whole shard of the heaviest subset
        text_rows = max(text_rows, math.ceil(need * text_rows * CAPACITY_MARGIN))
        vision_rows = max(vision_rows, math.ceil(need * vision_rows * CAPACITY_MARGIN)) if vision_rows else 0
    return PackBudget(text_len, text_rows, vision_patches, vision_rows, queries + targets, chunks)
