"""Representative global batches drawn from a training-set profile, as lengths, and how they pack.

A dry run on a profile (`data.profile`) needs what a step of that data costs: how many packed
chunks each device fills (the chunk loops' trip counts) and how many tokens and patches the
sequences really hold. The profile's joint (text tokens, image tokens) histograms give both
without any data.

The draw is deterministic: for each side, `n` systematic quantile picks of the side's sorted
per-sequence lengths (every `N / n`-th sequence, starting half a step in, so the draw has the
profile's distribution whatever the seed), then put in a seeded random order, which decides what
lands on which device as a random batch would. Batches are one task each (VLM2Vec's homogeneous
sampler; B3's mined batches are per task too): one batch per subset, weighted by the subset's share
of training rows, which is how often a one-task sampler picks that subset. With
`data.homogeneous=False` and no batch file, one batch drawn from the whole set instead.

Packing uses the trainer's own `pack_record` on a record holding only what placement reads
(attention masks and vision-row segment ids; pixels one byte wide), one device shard at a time.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vlm2vec_jax.data.packing import PackBudget, pack_record
from vlm2vec_jax.data.profile import Profile
from vlm2vec_jax.data.profile_budget import negative_side


@dataclasses.dataclass(frozen=True)
class LengthBatch:
    """One global batch as lengths: query i's positive is target i * (1 + h), its h hard negatives
    follow it (the pipeline's order). Tokens count text plus image tokens."""

    subset: str | None  # None: drawn from the whole set
    weight: float  # share of the run's steps that draw from this subset
    query_tokens: np.ndarray
    query_patches: np.ndarray
    target_tokens: np.ndarray
    target_patches: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return np.concatenate([self.query_tokens, self.target_tokens])

    @property
    def patches(self) -> np.ndarray:
        return np.concatenate([self.query_patches, self.target_patches])


def _systematic(profile: Profile, side: str, subset: str | None, n: int, limit: int, rng: np.random.Generator):
    """`n` quantile picks of a side's (tokens, patches), in a seeded random order; tokens capped at
    `limit` (the config's truncation, which keeps image tokens)."""
    tokens, patches = profile.lengths(side, subset), profile.patches(side, subset)
    if not len(tokens):
        raise ValueError(f"data.profile has no {side} sequences{f' in subset {subset!r}' if subset else ''}")
    picks = ((np.arange(n) + 0.5) * len(tokens) / n).astype(np.int64)
    order = rng.permutation(n)
    return np.minimum(tokens[picks], limit)[order], patches[picks][order]


def draw_batches(
    profile: Profile, *, queries: int, hard_negatives: int, one_task: bool, seed: int, max_len: int,
    target_max_len: int,
) -> list[LengthBatch]:
    """The representative batches of a run (module docstring): one per subset when `one_task`."""
    rows = {name: s["used_rows"] for name, s in profile.subsets.items()}
    subsets = [(name, rows[name] / sum(rows.values())) for name in rows if rows[name]] if one_task else [(None, 1.0)]
    out = []
    for k, (name, weight) in enumerate(subsets):
        rng = np.random.default_rng([seed, k])
        q_tokens, q_patches = _systematic(profile, "query", name, queries, max_len, rng)
        p_tokens, p_patches = _systematic(profile, "target", name, queries, target_max_len, rng)
        t_tokens = np.zeros((queries, 1 + hard_negatives), np.int64)
        t_patches = np.zeros_like(t_tokens)
        t_tokens[:, 0], t_patches[:, 0] = p_tokens, p_patches
        if hard_negatives:
            n_tokens, n_patches = _systematic(profile, negative_side(profile, name), name, queries * hard_negatives,
                                              target_max_len, rng)
            t_tokens[:, 1:] = n_tokens.reshape(queries, hard_negatives)
            t_patches[:, 1:] = n_patches.reshape(queries, hard_negatives)
        out.append(LengthBatch(name, weight, q_tokens, q_patches, t_tokens.reshape(-1), t_patches.reshape(-1)))
    return out


def _side_record(tokens: np.ndarray, patches: np.ndarray) -> dict[str, np.ndarray]:
    """Padded inputs with only placement's fields meaningful: sequence i's first tokens[i] slots
    and its image's first patches[i] vision slots set."""
    rows, width, row_patches = len(tokens), max(int(tokens.max(initial=1)), 1), int(patches.max(initial=0))
    mask = (np.arange(width)[None] < tokens[:, None]).astype(np.int32)
    return {
        "input_ids": np.zeros((rows, width), np.int32),
        "attention_mask": mask,
        "position_ids": np.zeros((3, rows, width), np.int32),
        "image_token_index": np.full((rows, width), -1, np.int32),
        "pixel_values": np.zeros((rows, row_patches, 1), np.uint8),
        "patch_positions": np.zeros((rows, row_patches, 2), np.int32),
        "patch_segment_ids": (np.arange(row_patches)[None] < patches[:, None]).astype(np.int32),
    }


def shard_chunks(batch: LengthBatch, budget: PackBudget, shards: int) -> np.ndarray:
    """Packed chunks each device shard of `batch` fills (`num_chunks`, global shard order), by the
    trainer's `pack_record`; a `PackingError` names the budget key to raise."""
    queries, targets = len(batch.query_tokens), len(batch.target_tokens)
    if queries % shards or targets % shards:
        raise ValueError(f"{queries} queries and {targets} targets do not split over {shards} device shards")
    per_q, per_t = queries // shards, targets // shards
    counts = np.zeros(shards, np.int64)
    for shard in range(shards):
        q, t = slice(shard * per_q, (shard + 1) * per_q), slice(shard * per_t, (shard + 1) * per_t)
        record = {
            "query": _side_record(batch.query_tokens[q], batch.query_patches[q]),
            "target": _side_record(batch.target_tokens[t], batch.target_patches[t]),
            "rows": np.arange(shard * per_q, (shard + 1) * per_q),
        }
        packed = pack_record(record, budget, shards=1, first_query=shard * per_q, first_target=shard * per_t,
                             global_queries=queries)
        counts[shard] = int(packed["packed"]["num_chunks"][0])
    return counts
