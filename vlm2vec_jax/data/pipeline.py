"""Training input as a grain pipeline: one record = one global batch, sliced per host; index = step.

`TrainBatchSource[step]` asks the batch plan for global batch `step`, keeps this host's rows
(`[process_index * per_host, (process_index + 1) * per_host)`), decodes and patchifies the images,
adds the image placeholder where a side's text has none (the Embedder's layout), tokenizes, and
returns fixed-shape numpy arrays. Because the record index is the step and everything else is a pure
function of it, resuming at step k is `make_train_iterator(source, start_step=k)`: the same batches
an uninterrupted run sees, with any number of workers (grain's per-worker slices are interleaved back
into index order). Flat sampler + `Batch` is avoided on purpose: with 2+ workers it mixes records
across batches (docs/reference.md, "JAX and grain pitfalls"), which would break mined B3 batches.

A record (dict of numpy arrays, every shape fixed for a given source):
- ``query``: `ModelInputs` of the per_host queries, row i = planned row i of this host's slice.
- ``target``: `ModelInputs` of per_host * (1 + h) targets, h = `num_hard_negatives`: query i's
  positive at i * (1 + h), its hard negatives at i * (1 + h) + 1 ... i * (1 + h) + h, the layout of
  VLM2Vec's loss (labels arange(0, B * n, n)). Concatenating hosts in process order keeps that
  layout for the global batch.
- ``valid`` bool (per_host,): False for a row skipped as bad data. ``target_valid`` bool
  (per_host * (1 + h),): False for the targets of skipped rows, for skipped hard negatives, and for
  negative slots a row has no candidate for. An invalid slot holds an all-padding sequence (no real
  token, no image). The loss must drop invalid queries and exclude invalid targets from every
  query's denominator, so in-batch negatives never contain garbage.
- ``target_key`` int32 (per_host * (1 + h),): a content id of each target (its text and image
  path hashed; -1 for an invalid slot), so the loss can tell an in-batch duplicate of a query's
  positive (a repeated label or answer) from a real negative.
- ``rows`` int64 (per_host,): the planned training-set rows, skipped ones included; ``step`` int64 ().
- ``bad_data``: a `BadDataReport` of what this record skipped (not an array: pop it and merge it
  into the run's report before sending the arrays to devices).

Why mask rather than replace a bad row: a replacement would have to be searched outside the planned
batch (and might be bad too), would change B3's mined batches, and could duplicate a row (a false
negative); a mask is local, deterministic, keeps every shape fixed and costs one padded slot.

Hard negatives of row i: the positives of the rows the plan mined for it (B3++), else the pair's
own explicit negatives (MMEB's neg_text/neg_image_path), the first h of them.

Vision row i holds sequence i's image (`Batcher(aligned=True)`), so the trainer can chunk and shard
rows of sequences and vision arrays together.

Fixed shapes: text length = `max_len` for every query and `target_max_len` for every target;
patches per vision row = the largest image `max_pixels` allows; vision rows = the number of
sequences (each side has at most one image), or 0 for a side to which no pair of the training set
gives an image (the batcher's text-only shape: no zero pixels shipped every step). That is the worst
case padded once, so every step compiles to the same program; it costs memory at large `max_pixels`
(64 sequences x 5120 patches x 588 bytes is 193 MB of pixels), so set `max_pixels` to what the
data needs.

Pixels travel as uint8 patches (`patchify`: C x P x P bytes a patch, one frame) and are
normalised on the device (`normalize_patches`, the same lookup table as `process_image`): an
eighth of the bytes of float32 patches repeated over T, through the workers' pickling, the host
and the transfer.

Records need the tokenizer of `processor_dir`; it is loaded in the constructor (fail fast) and
again lazily in each worker process, since grain spawns workers and pickles the source.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import grain
from absl import flags
import numpy as np

from vlm2vec_jax.batch import ModelInputs
from vlm2vec_jax.data.bad_data import CORRUPT_IMAGE, BadDataHandler, BadDataPolicy, BadDataReport
from vlm2vec_jax.data.batch_plan import BatchPlan
from vlm2vec_jax.data.prompts import to_backbone_text
from vlm2vec_jax.data.records import Side, TrainPair
from vlm2vec_jax.processing.batching import Batcher, BucketSpec, Example
from vlm2vec_jax.processing.image import ImageProcessorConfig, ProcessedImage, patchify, raw_patch_dim
from vlm2vec_jax.processing.rope_index import ROPE_RULES
from vlm2vec_jax.processing.text import TextProcessor, with_image_placeholder

__all__ = ["TrainBatchSource", "make_train_iterator", "vision_row_patches"]

# Arrays smaller than this leave a worker pickled instead of in their own shared-memory segment
# (a segment per array made 84x84-image records 1.4x slower to receive, measured here).
SHM_MIN_BYTES = 256 * 1024
# An invalid slot: no token at all, so the row is pure padding (`Batcher` masks it fully).
_EMPTY = Example(np.zeros(0, np.int32))


class TrainBatchSource:
    """A grain random-access source whose item `step` is this host's slice of global batch `step`
    (record layout in the module docstring)."""

    def __init__(
        self,
        pairs: Sequence[TrainPair],
        plan: BatchPlan,
        processor_dir: str | os.PathLike,
        *,
        max_len: int,
        num_steps: int,
        target_max_len: int | None = None,
        num_hard_negatives: int = 0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        rope_rule: str = "hf5",
        bad_data: BadDataPolicy = "skip",
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        """`pairs` in the training set's global row order (what plan rows index); `processor_dir`
        holds the tokenizer and preprocessor_config.json (a checkpoint directory); `num_steps` is the
        source's length (steps past an epoch wrap into the next one); `target_max_len` pads and
        truncates target sequences (positives and negatives) instead of `max_len`, since targets
        (labels, answers, captions, an image) are often far shorter than queries (None = max_len).
        `pairs` is pickled into every worker: pass a compact sequence for large training sets."""
        if plan.batch_size % process_count:
            raise ValueError(f"the global batch size {plan.batch_size} is not divisible by {process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
        if rope_rule not in ROPE_RULES:
            raise ValueError(f"rope_rule must be one of {ROPE_RULES}, got {rope_rule!r}")
        if num_hard_negatives < 0 or num_steps < 0:
            raise ValueError(f"num_hard_negatives and num_steps must be >= 0, got {num_hard_negatives}, {num_steps}")
        self.pairs = pairs
        self.plan = plan
        self.processor_dir = os.fspath(processor_dir)
        self.max_len = int(max_len)
        self.target_max_len = int(target_max_len or max_len)
        self.num_steps = int(num_steps)
        self.num_hard_negatives = int(num_hard_negatives)
        self.rope_rule = rope_rule
        self.bad_data = bad_data
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.per_host = plan.batch_size // process_count
        BadDataHandler(bad_data)  # validates the policy name now rather than in a worker
        self.image_config = ImageProcessorConfig.from_pretrained_dir(
            self.processor_dir, min_pixels=min_pixels, max_pixels=max_pixels
        )
        h = self.num_hard_negatives
        query_images = any(p.query.image is not None for p in pairs)
        target_images = any(
            p.positive.image is not None or any(n.image is not None for n in p.negatives[:h]) for p in pairs
        )
        sides = ((self.max_len, query_images), (self.target_max_len, target_images))
        image_side_lengths = [length for length, has_images in sides if has_images]
        self.patches_per_row = vision_row_patches(self.image_config, min(image_side_lengths, default=self.max_len))
        self.query_vision_rows = self.per_host if query_images else 0
        self.target_vision_rows = self.per_host * (1 + h) if target_images else 0
        _ = self.text  # load the tokenizer here so a bad processor_dir fails before any worker starts

    # The tokenizers and batchers are rebuilt in each worker rather than pickled.
    @cached_property
    def text(self) -> TextProcessor:
        """The query side's tokenizer (truncates to `max_len`)."""
        return TextProcessor.from_pretrained_dir(self.processor_dir, max_len=self.max_len)

    @cached_property
    def target_text(self) -> TextProcessor:
        """The target side's: the same tokenizer, truncating to `target_max_len`."""
        return TextProcessor(self.text.tokenizer, self.text.image_token, max_len=self.target_max_len)

    @cached_property
    def _query_batcher(self) -> Batcher:
        return self._batcher(self.text, self.per_host, self.query_vision_rows)

    @cached_property
    def _target_batcher(self) -> Batcher:
        return self._batcher(self.target_text, self.per_host * (1 + self.num_hard_negatives), self.target_vision_rows)

    def _batcher(self, text: TextProcessor, sequences: int, vision_rows: int) -> Batcher:
        """One bucket per dimension: the same shapes at every step (module docstring)."""
        buckets = BucketSpec((text.max_len,), (self.patches_per_row,), (max(1, vision_rows),), batch_size=sequences)
        return Batcher.from_text_processor(
            text, buckets, merge_size=self.image_config.merge_size, aligned=True,
            patch_dim=raw_patch_dim(self.image_config), pixel_dtype="uint8",
        )

    def __getstate__(self) -> dict[str, Any]:
        skip = ("text", "target_text", "_query_batcher", "_target_batcher")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (
            f"TrainBatchSource(plan={self.plan!r}, pairs={len(self.pairs)}, num_steps={self.num_steps}, "
            f"process={self.process_index}/{self.process_count}, max_len={self.max_len}, "
            f"target_max_len={self.target_max_len}, "
            f"patches_per_row={self.patches_per_row}, hard_negatives={self.num_hard_negatives}, "
            f"rope_rule={self.rope_rule!r}, bad_data={self.bad_data!r})"
        )

    def __getitem__(self, step: int) -> dict[str, Any]:
        step = int(step)
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} is outside the source's {self.num_steps} steps")
        planned = self.plan.batch(step)
        lo = self.process_index * self.per_host
        rows = planned.rows[lo : lo + self.per_host]
        mined = planned.hard_negatives[lo : lo + self.per_host]
        handler = BadDataHandler(self.bad_data, BadDataReport())
        images: dict[str, ProcessedImage] = {}  # an image shared by several sides is decoded once
        h = self.num_hard_negatives
        queries, targets = [], []
        valid = np.zeros(self.per_host, bool)
        target_valid = np.zeros(self.per_host * (1 + h), bool)
        target_key = np.full(self.per_host * (1 + h), -1, np.int32)
        for i, (row, mined_rows) in enumerate(zip(rows, mined)):
            pair = self.pairs[int(row)]
            query = self._example(self.text, pair, pair.query, "query", handler, images)
            positive = None if query is None else self._example(
                self.target_text, pair, pair.positive, "positive", handler, images
            )
            negatives: list[Example | None] = [None] * h
            if query is not None and positive is not None:
                valid[i] = target_valid[i * (1 + h)] = True
                target_key[i * (1 + h)] = content_key(pair.positive)
                for k, (owner, side, field) in enumerate(self._negative_sides(pair, mined_rows)):
                    negatives[k] = self._example(self.target_text, owner, side, field, handler, images)
                    if negatives[k] is not None:
                        target_valid[i * (1 + h) + 1 + k] = True
                        target_key[i * (1 + h) + 1 + k] = content_key(side)
            queries.append(query if valid[i] else _EMPTY)  # a query whose positive is bad goes too
            targets += [_EMPTY if t is None else t for t in (positive, *negatives)]
        return {
            "query": self._fixed(self._query_batcher, queries, self.query_vision_rows),
            "target": self._fixed(self._target_batcher, targets, self.target_vision_rows),
            "valid": valid,
            "target_valid": target_valid,
            "target_key": target_key,
            "rows": rows.astype(np.int64),
            "step": np.asarray(step, np.int64),
            "bad_data": handler.report,
        }

    def _negative_sides(self, pair: TrainPair, mined_rows: np.ndarray) -> list[tuple[TrainPair, Side, str]]:
        """Up to h (owner pair, side, field name) hard negatives: mined rows' positives, else the
        pair's explicit negatives."""
        h = self.num_hard_negatives
        if len(mined_rows):
            owners = [self.pairs[int(r)] for r in mined_rows[:h]]
            return [(owner, owner.positive, "positive") for owner in owners]
        return [(pair, side, f"negatives[{k}]") for k, side in enumerate(pair.negatives[:h])]

    def _example(
        self, text_processor: TextProcessor, pair: TrainPair, side: Side, field: str, handler: BadDataHandler,
        images: dict[str, ProcessedImage],
    ) -> Example | None:
        """Tokens (truncated by `text_processor`) and image of one side, or None when the bad-data
        policy skips it (counted)."""
        where = {"dataset": pair.dataset, "row": pair.row}
        text = with_image_placeholder(to_backbone_text(side.text), side.image is not None, self.text.image_token)
        if not handler.check_side(
            Side(text, side.image), **where, text_column=f"{field}.text", image_column=f"{field}.image",
            check_images=False,
        ):
            return None
        if side.image is None:
            return Example(text_processor.encode(text), (), self.rope_rule)
        image = images.get(side.image)
        if image is None:
            pil = handler.load_image(side.image, **where, column=f"{field}.image")
            if pil is None:
                return None
            try:
                image = patchify(pil, self.image_config)
                if len(image.patches) > self.patches_per_row:  # smart_resize's 28 px floor on a side
                    raise ValueError(f"{len(image.patches)} patches, over the {self.patches_per_row} of max_pixels")
            except ValueError as e:  # decodes, but no usable shape (e.g. aspect ratio over 200)
                handler.reject(**where, column=f"{field}.image", reason=CORRUPT_IMAGE,
                               problem=f"image file {side.image}: {e}", cause=e)
                return None
            images[side.image] = image
        return Example(text_processor.encode(text, [image.num_tokens]), (image,), self.rope_rule)

    def _fixed(self, batcher: Batcher, examples: list[Example], vision_rows: int) -> ModelInputs:
        """`batcher(examples)`, with the vision arrays of a step without images padded to the fixed
        row count of a side that has images elsewhere (the batcher gives 0 rows then)."""
        inputs = batcher(examples)
        v, r = vision_rows, self.patches_per_row
        if v and inputs["patch_segment_ids"].shape != (v, r):
            inputs["pixel_values"] = np.zeros((v, r, batcher.patch_dim), batcher.pixel_dtype)
            inputs["patch_positions"] = np.zeros((v, r, 2), np.int32)
            inputs["patch_segment_ids"] = np.zeros((v, r), np.int32)
        return inputs


def vision_row_patches(image_config: ImageProcessorConfig, max_len: int) -> int:
    """Patches of a training batch's vision row: the largest image `max_pixels` allows, rounded up
    to whole merged tokens. Its tokens must leave room for text within `max_len` (ValueError)."""
    unit = image_config.merge_size**2
    patches = -(-(image_config.max_pixels // image_config.patch_size**2) // unit) * unit
    if patches // unit >= max_len:
        raise ValueError(
            f"max_len {max_len} leaves no room for text next to the largest image ({patches // unit} "
            "tokens at max_pixels); raise max_len or lower max_pixels"
        )
    return patches


def content_key(side: Side) -> int:
    """A non-negative int32 id of a side's content (text and image path): equal sides, equal ids."""
    return zlib.crc32(f"{side.text}\x00{side.image or ''}".encode()) & 0x7FFFFFFF


def make_train_iterator(
    source: TrainBatchSource, start_step: int = 0, num_workers: int = 0, prefetch: int = 2
) -> grain.DatasetIterator:
    """Records `start_step`, `start_step + 1`, ... of `source`, in step order with any worker count.

    `num_workers` > 0 builds records in that many spawned processes (each process builds whole
    records; grain interleaves them back in index order), `prefetch` records ahead per worker.
    0 builds each record on the caller's thread when it is asked for: JAX's asynchronous dispatch
    already overlaps that with the previous step, and a helper thread built records 1.6x slower here
    (glibc gives it its own malloc arena; MALLOC_ARENA_MAX=1 removed the gap).
    Close the iterator (`it.close()`) to stop the workers promptly; it supports grain's
    `get_state`, but resuming by `start_step` needs nothing from it.
    """
    if not 0 <= start_step <= len(source):
        raise ValueError(f"start_step {start_step} is outside [0, {len(source)}]")
    if num_workers < 0 or prefetch < 1:
        raise ValueError(f"num_workers must be >= 0 and prefetch >= 1, got {num_workers}, {prefetch}")
    # No reader threads: a record is built whole by one worker (or by the caller), see above.
    records = grain.MapDataset.source(source)[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    if num_workers == 0:
        return iter(records)
    if not flags.FLAGS.is_parsed():
        # grain reads its absl flags when it starts workers; a program without absl.app has not
        # parsed them, so take the defaults (an absl program's own parse is left alone).
        flags.FLAGS.mark_as_parsed()
    records = grain.experimental.WithOptionsIterDataset(
        records, grain.experimental.DatasetOptions(min_shm_size=SHM_MIN_BYTES)
    )
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
    return iter(records.mp_prefetch(options))
