"""Sequence packing on the host: a training record's padded rows -> fixed token and patch budgets.

A padded record gives every query `max_len` text slots and every sequence a vision row sized for
the largest image `max_pixels` allows; on MMEB-shaped data most of those slots are padding. Packing
lays the same sequences out per device shard in GradCache chunks of fixed budgets:

- ``text_rows`` rows of ``text_len`` tokens per chunk, several sequences per row, each a segment
  (ids 1, 2, ... in the row's ``attention_mask``; 0 is padding) with its own M-RoPE positions;
- ``vision_rows`` rows of ``vision_patches`` patches per chunk, several images per row (the vision
  tower already attends within an image only);
- ``slots`` pooled sequences per chunk: ``pool_index`` (flat index of each sequence's last token in
  the chunk's text_rows x text_len tokens) and ``slot_example`` (its global example id: queries
  0 .. B - 1, targets B .. B + B * n - 1, -1 for an empty slot).

A chunk holds a variable number of sequences; ``num_chunks`` says how many chunks of its capacity
``chunks`` a shard fills, so the device loop runs only those (a dynamic trip count). Dropout needs
each token's example id and position inside its own sequence (``token_example``,
``token_position``), which packing never changes. Sequences are placed first-fit by decreasing
length (fewer, fuller chunks); a sequence's image goes whole into one vision row. Invalid slots
(bad data, all padding) take no room: their embeddings are never read by the loss.

Array layout of ``pack_record(...)["packed"]``, leading axes (K shards of this host, C chunks):
``input_ids``, ``attention_mask``, ``image_token_index`` (chunk-absolute), ``token_example``,
``token_position`` (K, C, Rt, Lt); ``position_ids`` (K, C, 3, Rt, Lt); ``pixel_values``
(K, C, Rv, P, patch_dim); ``patch_positions`` (K, C, Rv, P, 2); ``patch_segment_ids``
(K, C, Rv, P); ``pool_index``, ``slot_example`` (K, C, S); ``num_chunks`` (K,).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vlm2vec_jax.batch import MERGE_UNITS, ModelInputs

SIDES = ("query", "target")


@dataclasses.dataclass(frozen=True)
class PackBudget:
    """Static shapes of one packed GradCache chunk, and the chunks a device shard may fill."""

    text_len: int  # tokens per text row: the longest sequence must fit (train.pack_text_len)
    text_rows: int  # text rows per chunk (train.pack_text_rows)
    vision_patches: int  # patches per vision row: the largest image must fit
    vision_rows: int  # vision rows per chunk; 0 for text-only training (train.pack_vision_rows)
    slots: int  # sequences per chunk at most
    chunks: int  # chunk capacity per device shard (train.pack_chunks)

    def __post_init__(self) -> None:
        for name in ("text_len", "text_rows", "slots", "chunks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"packing budget {name} must be positive, got {getattr(self, name)}")
        if self.vision_rows < 0 or (self.vision_rows and self.vision_patches % MERGE_UNITS):
            raise ValueError(f"vision rows must be >= 0 and patches a multiple of {MERGE_UNITS}: {self}")

    @classmethod
    def covering(
        cls, *, queries: int, targets: int, query_len: int, target_len: int, patches_per_row: int,
        query_images: bool, target_images: bool, gc_chunks: int,
    ) -> PackBudget:
        """The default budget for a shard of `queries` and `targets` padded sequences that GradCache
        splits into `gc_chunks` chunks (0 = no caching): a packed chunk holds the tokens and images
        of one padded chunk, and the capacity is twice the padded chunk count, since first-fit
        closes a chunk when either its text or its vision rows are full. Without caching the whole
        shard is one chunk of one row per sequence, which always fits (and saves nothing: packing
        pays off through GradCache's chunk count, or through budgets sized from a profile)."""
        text_len = max(query_len, target_len)
        if gc_chunks == 0:
            rows, images = queries + targets, queries * query_images + targets * target_images
            return cls(text_len, rows, patches_per_row if images else 0, images, rows, 1)
        per_q, per_t = queries // gc_chunks, targets // gc_chunks
        vision_rows = per_q * query_images + per_t * target_images
        return cls(
            text_len=text_len,
            text_rows=-(-(per_q * query_len + per_t * target_len) // text_len),
            vision_patches=patches_per_row if vision_rows else 0,
            vision_rows=vision_rows,
            slots=queries + targets,  # never the limit: a chunk may hold every short sequence
            chunks=2 * gc_chunks,
        )

    @property
    def image_tokens_per_row(self) -> int:
        return self.vision_patches // MERGE_UNITS


@dataclasses.dataclass
class _Chunk:
    text_fill: np.ndarray
    vision_fill: np.ndarray
    text_segments: np.ndarray
    vision_segments: np.ndarray
    slots: int = 0


class PackingError(ValueError):
    """A sequence or a batch does not fit the packing budget; the message names the key to raise."""


def pack_record(
    record: dict[str, Any], budget: PackBudget, *, shards: int, first_query: int, first_target: int,
    global_queries: int,
) -> dict[str, Any]:
    """The record with its `query` and `target` inputs replaced by `packed` arrays (module
    docstring) for `shards` device shards of this host. `first_query` / `first_target` are the
    global indices of the host's first query and target (process_index * rows per host); target
    ids are offset by `global_queries`, the step's batch size."""
    query, target = record["query"], record["target"]
    q_rows, t_rows = query["input_ids"].shape[0], target["input_ids"].shape[0]
    if q_rows % shards or t_rows % shards:
        raise ValueError(f"{q_rows} queries and {t_rows} targets do not split over {shards} device shards")
    per_q, per_t = q_rows // shards, t_rows // shards
    out = _empty(budget, shards, query["pixel_values"].shape[-1], query["pixel_values"].dtype)
    per_query = t_rows // max(q_rows, 1)  # 1 + hard negatives
    lengths = {s: record[s]["attention_mask"].astype(bool).sum(axis=1) for s in SIDES}
    for shard in range(shards):
        sequences = [("query", i, first_query + i) for i in range(shard * per_q, (shard + 1) * per_q)]
        sequences += [("target", j, global_queries + first_target + j) for j in range(shard * per_t, (shard + 1) * per_t)]
        sequences = [s for s in sequences if lengths[s[0]][s[1]] > 0]
        sequences.sort(key=lambda s: -int(lengths[s[0]][s[1]]))
        chunks: list[_Chunk] = []
        for side, row, example in sequences:
            where = _describe(record, side, row, per_query)
            _place(out, shard, chunks, budget, record[side], row, example, where, record.get("step"))
        out["num_chunks"][shard] = len(chunks)
    rest = {k: v for k, v in record.items() if k not in SIDES}
    return {**rest, "packed": out}


def _describe(record: dict[str, Any], side: str, row: int, per_query: int) -> str:
    """Names a padded sequence by its planned training row, for errors."""
    planned = record.get("rows")
    owner = row if side == "query" else row // max(per_query, 1)
    name = "query" if side == "query" else ("positive" if row % max(per_query, 1) == 0 else "hard negative")
    return f"the {name} of planned training row {int(planned[owner]) if planned is not None else owner}"


def _empty(budget: PackBudget, shards: int, patch_dim: int, pixel_dtype: np.dtype) -> dict[str, np.ndarray]:
    k, c, rt, lt, rv, p, s = (shards, budget.chunks, budget.text_rows, budget.text_len, budget.vision_rows,
                              budget.vision_patches, budget.slots)
    text = lambda fill=0: np.full((k, c, rt, lt), fill, np.int32)  # noqa: E731
    return {
        "input_ids": text(),
        "attention_mask": text(),
        "position_ids": np.zeros((k, c, 3, rt, lt), np.int32),
        "image_token_index": text(-1),
        "token_example": text(),
        "token_position": text(),
        "pixel_values": np.zeros((k, c, rv, p, patch_dim), pixel_dtype),
        "patch_positions": np.zeros((k, c, rv, p, 2), np.int32),
        "patch_segment_ids": np.zeros((k, c, rv, p), np.int32),
        "pool_index": np.zeros((k, c, s), np.int32),
        "slot_example": np.full((k, c, s), -1, np.int32),
        "num_chunks": np.zeros((k,), np.int32),
    }


def _place(
    out: dict[str, np.ndarray], shard: int, chunks: list[_Chunk], budget: PackBudget, inputs: ModelInputs,
    row: int, example: int, where: str, step: Any,
) -> None:
    """Put padded sequence `row` of `inputs` into the first chunk with room (opening one if none)."""
    tokens = np.flatnonzero(inputs["attention_mask"][row])
    has_vision = inputs["patch_segment_ids"].shape[0] > 0
    patches = np.flatnonzero(inputs["patch_segment_ids"][row] > 0) if has_vision else np.zeros(0, np.int64)
    if len(patches) and (inputs["patch_segment_ids"][row].max() > 1 or patches[-1] - patches[0] + 1 != len(patches)):
        raise ValueError(f"{where}: packing takes vision rows of one image each (Batcher(aligned=True))")
    if len(tokens) > budget.text_len:
        raise PackingError(f"{where} has {len(tokens)} tokens, over train.pack_text_len={budget.text_len}; raise it")
    if len(patches) and len(patches) > budget.vision_patches:
        raise PackingError(f"{where} has an image of {len(patches)} patches, over the packed vision row of "
                           f"{budget.vision_patches}; raise model.max_pixels' row or lower the image size")
    if len(patches) and budget.vision_rows == 0:
        raise PackingError(f"{where} has an image but the packing budget has no vision rows (train.pack_vision_rows)")
    for c in range(budget.chunks):
        if c == len(chunks):
            chunks.append(_Chunk(np.zeros(budget.text_rows, int), np.zeros(budget.vision_rows, int),
                                 np.zeros(budget.text_rows, int), np.zeros(budget.vision_rows, int)))
        chunk = chunks[c]
        text_row = _first_fit(chunk.text_fill, len(tokens), budget.text_len)
        vision_row = _first_fit(chunk.vision_fill, len(patches), budget.vision_patches) if len(patches) else -1
        if chunk.slots < budget.slots and text_row >= 0 and (vision_row >= 0 or not len(patches)):
            _write(out, shard, c, chunk, budget, inputs, row, example, tokens, patches, text_row, vision_row)
            return
    raise PackingError(
        f"step {step}: device shard {shard}'s sequences need more than train.pack_chunks={budget.chunks} packed "
        f"chunks (at {where}); raise train.pack_chunks, or the chunk budgets train.pack_text_rows / "
        "train.pack_vision_rows"
    )


def _first_fit(fill: np.ndarray, size: int, capacity: int) -> int:
    """Index of the first row with room for `size`, or -1."""
    fits = np.flatnonzero(fill + size <= capacity)
    return int(fits[0]) if len(fits) else -1


def _write(
    out: dict[str, np.ndarray], shard: int, c: int, chunk: _Chunk, budget: PackBudget, inputs: ModelInputs,
    row: int, example: int, tokens: np.ndarray, patches: np.ndarray, text_row: int, vision_row: int,
) -> None:
    n, start = len(tokens), chunk.text_fill[text_row]
    cols = slice(start, start + n)
    at = (shard, c, text_row, cols)
    chunk.text_segments[text_row] += 1
    out["input_ids"][at] = inputs["input_ids"][row, tokens]
    out["attention_mask"][at] = chunk.text_segments[text_row]
    out["position_ids"][shard, c, :, text_row, cols] = inputs["position_ids"][:, row, tokens]
    out["token_example"][at] = example
    out["token_position"][at] = np.arange(n)
    index = inputs["image_token_index"][row, tokens]
    if len(patches):
        p, offset = len(patches), chunk.vision_fill[vision_row]
        source_first = row * (inputs["patch_segment_ids"].shape[1] // MERGE_UNITS) + patches[0] // MERGE_UNITS
        target_first = vision_row * budget.image_tokens_per_row + offset // MERGE_UNITS
        index = np.where(index >= 0, index - source_first + target_first, -1)
        vcols = slice(offset, offset + p)
        chunk.vision_segments[vision_row] += 1
        out["pixel_values"][shard, c, vision_row, vcols] = inputs["pixel_values"][row, patches]
        out["patch_positions"][shard, c, vision_row, vcols] = inputs["patch_positions"][row, patches]
        out["patch_segment_ids"][shard, c, vision_row, vcols] = chunk.vision_segments[vision_row]
        chunk.vision_fill[vision_row] += p
    out["image_token_index"][at] = index
    out["pool_index"][shard, c, chunk.slots] = text_row * budget.text_len + start + n - 1
    out["slot_example"][shard, c, chunk.slots] = example
    chunk.slots += 1
    chunk.text_fill[text_row] += n
