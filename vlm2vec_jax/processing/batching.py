"""Host-side batching: token ids + processed images -> one `ModelInputs` with bucketed static shapes.

Every shape is drawn from a ladder of buckets (`BucketSpec`) so a stream of batches compiles only a
few programs (`shape_signature` tells them apart):
- text length L: the smallest bucket >= the longest sequence; powers of two from 16 below
  `max_len`, then `max_len` itself (< 50% padding, about log2(max_len) shapes);
- patches per vision row R: the smallest bucket >= the largest image's patch count, on a ladder
  from 16 patches (a 56x56 image, the processor's minimum) to the largest image `max_pixels`
  allows. Powers of two by default: the number of shapes grows with log(max patches), where
  multiples of a step (64, 128, ...) would give dozens of shapes up to Qwen2-VL's 5120-patch
  images; the leftover space of a row is filled by smaller images, so the 50% worst case is rare.
  Every bucket is a multiple of merge**2 = 4, as the merger needs;
- vision rows V: images are packed whole, greedy first-fit in order of appearance (small images
  share a row, told apart by `patch_segment_ids`); V is the smallest bucket >= the rows used,
  powers of two by default;
- batch B: fixed when `batch_size` is set, else the number of examples. Padding rows are fully
  masked (all-zero attention mask, pad ids, positions 0, no image tokens): the model has to
  tolerate a row without a real token (its output is ignored), which avoids inventing tokens.

`BucketSpec.default(..., half_octaves=True)` adds the 1.5x steps (16, 24, 32, 48, ... patches; 1, 2,
3, 4, 6, ... rows): at most 33% padding instead of 50%, for about twice the shapes per dimension
(measured on a random stream: ~75% of patch slots real instead of ~63%). That pays off in long runs
where compilations amortise; for training, a single-valued spec (one L, R and V) gives one shape.

A text-only batch has V = 0 and the minimal legal R = merge**2, so its vision arrays are
(0, 4, patch_dim), (0, 4, 2), (0, 4): one signature whatever the buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from vlm2vec_jax.batch import ModelInputs
from vlm2vec_jax.processing.image import ProcessedImage, vision_patch_positions
from vlm2vec_jax.processing.rope_index import rope_index
from vlm2vec_jax.processing.text import TextProcessor

__all__ = ["BucketSpec", "Batcher", "Example", "ShapeSignature", "pick_bucket", "shape_signature"]

PATCH_DIM = 3 * 2 * 14 * 14  # C * T * P * P of Qwen2-VL's patches


class Example(NamedTuple):
    """One sequence to embed: its token ids (placeholders already expanded), its images in order, and
    the M-RoPE rule for its positions ("hf5" or "legacy", see `rope_index`)."""

    input_ids: np.ndarray
    images: Sequence[ProcessedImage] = ()
    rope_rule: str = "hf5"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _ladder(lo: int, hi: int, *, half_octaves: bool, multiple: int = 1) -> tuple[int, ...]:
    """lo * (1, 1.5, 2, 3, 4, 6, ...) (or lo * 2^k without half octaves), rounded up to `multiple`
    and capped at `hi` (a multiple itself), plus `hi`."""
    factors = (2, 3) if half_octaves else (2,)
    values = {hi}
    k = 0
    while lo << k < hi:
        values.update(min(hi, _round_up((f * lo << k) // 2, multiple)) for f in factors)
        k += 1
    return tuple(sorted(values))


@dataclass(frozen=True)
class BucketSpec:
    """The allowed sizes of each batch dimension (sorted ascending) and an optional fixed batch size."""

    text_lengths: tuple[int, ...]
    patches_per_row: tuple[int, ...]
    vision_rows: tuple[int, ...]
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("text_lengths", "patches_per_row", "vision_rows"):
            values = tuple(int(v) for v in getattr(self, name))  # lists from configs become tuples
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"BucketSpec.{name} must be strictly increasing positive sizes, got {values}")
            object.__setattr__(self, name, values)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"BucketSpec.batch_size must be positive or None, got {self.batch_size}")

    @classmethod
    def default(
        cls,
        max_len: int,
        max_patches: int,
        *,
        batch_size: int | None = None,
        max_vision_rows: int = 4096,
        min_len: int = 16,
        min_patches: int = 16,
        merge_size: int = 2,
        half_octaves: bool = False,
    ) -> BucketSpec:
        """Buckets as described in the module docstring (`half_octaves` adds 1.5x steps to the patch
        and row ladders: less padding, more shapes).

        `max_patches` is the largest image's patch count, `max_pixels // 14**2` for Qwen2-VL's
        processor; `max_vision_rows` only bounds the ladder (it is generous on purpose).
        """
        unit = merge_size**2
        max_patches = _round_up(max_patches, unit)
        return cls(
            text_lengths=_ladder(min_len, max_len, half_octaves=False),
            patches_per_row=_ladder(
                min(_round_up(min_patches, unit), max_patches), max_patches, multiple=unit, half_octaves=half_octaves
            ),
            vision_rows=_ladder(1, max_vision_rows, half_octaves=half_octaves),
            batch_size=batch_size,
        )


def pick_bucket(size: int, buckets: Sequence[int], what: str) -> int:
    """The smallest bucket >= size; a clear error when `size` exceeds them all."""
    i = int(np.searchsorted(buckets, size))
    if i == len(buckets):
        raise ValueError(f"{what} {size} exceeds the largest bucket {buckets[-1]}; add a larger bucket")
    return int(buckets[i])


class ShapeSignature(NamedTuple):
    """The dimensions that determine every array shape of a `ModelInputs` (dtypes and trailing sizes
    are fixed by `Batcher`), so distinct signatures = distinct compilations of the model."""

    batch: int
    length: int
    vision_rows: int
    patches_per_row: int


def shape_signature(inputs: ModelInputs) -> ShapeSignature:
    """The shape signature of a built batch; count distinct ones to count compilations."""
    batch, length = inputs["input_ids"].shape
    rows, patches = inputs["patch_segment_ids"].shape
    return ShapeSignature(batch, length, rows, patches)


@dataclass(frozen=True)
class Batcher:
    """Builds `ModelInputs` from `Example`s with the token ids of one tokenizer and one `BucketSpec`."""

    buckets: BucketSpec
    image_token_id: int
    vision_start_token_id: int
    pad_token_id: int
    padding_side: str = "right"
    merge_size: int = 2
    patch_dim: int = PATCH_DIM
    # float32 normalised patches (`process_image`), or uint8 ones (`patchify`, training: the device
    # normalises) with patch_dim C * P * P.
    pixel_dtype: str = "float32"
    # Vision row i holds sequence i's images (and nothing else), so a slice of sequences with the
    # same slice of vision rows is a self-contained batch: what GradCache chunks and data sharding
    # need. Off, images pack first-fit into as few rows as possible (inference).
    aligned: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f'padding_side must be "right" or "left", got {self.padding_side!r}')
        unit = self.merge_size**2
        if any(r % unit for r in self.buckets.patches_per_row):
            raise ValueError(f"patches_per_row buckets must be multiples of {unit}: {self.buckets.patches_per_row}")

    @classmethod
    def from_text_processor(cls, text: TextProcessor, buckets: BucketSpec, **kwargs: object) -> Batcher:
        """A batcher using `text`'s image, vision-start and pad token ids."""
        return cls(
            buckets=buckets,
            image_token_id=text.image_token_id,
            vision_start_token_id=text.vision_start_token_id,
            pad_token_id=text.pad_token_id,
            **kwargs,
        )

    def __call__(self, examples: Sequence[Example]) -> ModelInputs:
        """Pad, pack and index `examples` into one batch (layout in `vlm2vec_jax.batch`)."""
        examples = [Example(*e) for e in examples]
        if not examples:
            raise ValueError("cannot build a batch from no examples")
        b = self.buckets.batch_size or len(examples)
        if len(examples) > b:
            raise ValueError(f"{len(examples)} examples exceed the fixed batch size {b}")
        seqs = [np.asarray(e.input_ids, dtype=np.int32).reshape(-1) for e in examples]
        length = pick_bucket(max(s.size for s in seqs), self.buckets.text_lengths, "sequence length")

        input_ids = np.full((b, length), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((b, length), dtype=np.int32)
        position_ids = np.zeros((3, b, length), dtype=np.int32)
        image_token_index = np.full((b, length), -1, dtype=np.int32)
        images = [img for e in examples for img in e.images]
        vision, merged_rows = self._pack(images, [len(e.images) for e in examples] if self.aligned else None)

        image_start = 0
        for row, (example, ids) in enumerate(zip(examples, seqs)):
            n_images = len(example.images)
            cols = slice(0, ids.size) if self.padding_side == "right" else slice(length - ids.size, length)
            input_ids[row, cols] = ids
            attention_mask[row, cols] = 1
            position_ids[:, row, cols] = rope_index(
                ids,
                [img.grid_thw for img in example.images],
                image_token_id=self.image_token_id,
                vision_start_token_id=self.vision_start_token_id,
                rule=example.rope_rule,
                merge_size=self.merge_size,
            )  # also checks that the image tokens match the images
            merged = merged_rows[image_start : image_start + n_images]
            image_token_index[row, cols][ids == self.image_token_id] = np.concatenate(merged) if merged else []
            image_start += n_images
        return ModelInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_token_index=image_token_index,
            **vision,
        )

    def _pack(
        self, images: Sequence[ProcessedImage], per_sequence: Sequence[int] | None = None
    ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """Pack images whole into V rows of R patches, greedy first-fit in order; with
        `per_sequence` (image counts of the sequences, `aligned`), sequence i's images into row i.

        Returns the vision arrays and, per image, the rows of its merged tokens in the flattened
        (V * R / merge**2) merger output.
        """
        unit = self.merge_size**2
        if not images:
            return {
                "pixel_values": np.zeros((0, unit, self.patch_dim), dtype=self.pixel_dtype),
                "patch_positions": np.zeros((0, unit, 2), dtype=np.int32),
                "patch_segment_ids": np.zeros((0, unit), dtype=np.int32),
            }, []
        for img in images:
            n, dim = img.patches.shape
            if n % unit or dim != self.patch_dim or img.patches.dtype != self.pixel_dtype:
                raise ValueError(
                    f"image patches of shape {img.patches.shape} and dtype {img.patches.dtype}: expected "
                    f"(multiple of {unit}, {self.patch_dim}) {self.pixel_dtype}"
                )
        sizes = [img.patches.shape[0] for img in images]
        r = pick_bucket(max(sizes), self.buckets.patches_per_row, "image patch count")
        free: list[int] = []  # patches left in each opened row
        segments: list[int] = []  # images placed in each row so far
        placement = []  # (row, first patch, segment id) of each image
        owner = None if per_sequence is None else np.repeat(np.arange(len(per_sequence)), per_sequence)
        if owner is not None:
            free, segments = [r] * len(per_sequence), [0] * len(per_sequence)
        for k, size in enumerate(sizes):
            if owner is None:
                row = next((i for i, f in enumerate(free) if f >= size), len(free))
            else:
                row = int(owner[k])
                if free[row] < size:
                    raise ValueError(f"sequence {row}'s images need more than the {r} patches of one aligned vision row")
            if row == len(free):
                free.append(r)
                segments.append(0)
            segments[row] += 1
            placement.append((row, r - free[row], segments[row]))
            free[row] -= size
        v = pick_bucket(len(free), self.buckets.vision_rows, "packed vision row count")

        pixel_values = np.zeros((v, r, self.patch_dim), dtype=self.pixel_dtype)
        patch_positions = np.zeros((v, r, 2), dtype=np.int32)
        patch_segment_ids = np.zeros((v, r), dtype=np.int32)
        merged_rows = []
        for img, size, (row, start, segment) in zip(images, sizes, placement):
            pixel_values[row, start : start + size] = img.patches
            patch_positions[row, start : start + size] = vision_patch_positions(img.grid_thw, self.merge_size)
            patch_segment_ids[row, start : start + size] = segment
            merged_rows.append((row * r + start) // unit + np.arange(size // unit, dtype=np.int32))
        vision = {
            "pixel_values": pixel_values,
            "patch_positions": patch_positions,
            "patch_segment_ids": patch_segment_ids,
        }
        return vision, merged_rows
