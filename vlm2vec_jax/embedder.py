"""The inference API: any mix of image and text in, one L2-normalised vector out.

    from vlm2vec_jax import Embedder
    embedder = Embedder.from_pretrained("path/to/a-Qwen2-VL-Qwen2.5-VL-or-Qwen3-VL-dir")
    vectors = embedder.encode(["a caption", {"image": "cat.png", "text": "<|image_pad|> Represent the image."}])

Speed comes from the whole path, not only the model: items are preprocessed on host threads while
the previous batches run (JAX dispatch is asynchronous), batches are packed (several items per text
row, first-fit by decreasing length, `processing.packed_batching`: a batch of short items costs what
its tokens cost), and every shape is bucketed (a handful of compilations for any stream). An item's
vector does not depend on its batch: positions are per sequence, attention stays inside it, and
padding is masked. `packing=False` gives one item per row, items of similar length batched together.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vlm2vec_jax.models.lora import merge_lora
from vlm2vec_jax.models.pooling import check_matryoshka_dim, truncate_and_normalize
from vlm2vec_jax.models.peft_adapter import is_adapter_dir, load_adapted, processor_dir
from vlm2vec_jax.models.hf_export import save_pretrained
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel
from vlm2vec_jax.processing.batching import Batcher, BucketSpec, Example
from vlm2vec_jax.processing.image import ImageProcessorConfig, ProcessedImage, patch_dim, process_image
from vlm2vec_jax.processing.packed_batching import PackedBatcher
from vlm2vec_jax.processing.rope_index import ROPE_RULES
from vlm2vec_jax.processing.prompt_formats import DEFAULT_INSTRUCTION, PROMPT_FORMATS, format_prompt
from vlm2vec_jax.processing.text import TextProcessor

Item = str | Mapping[str, Any]
# Longest sequence when no max_len is given: Qwen2-VL's max_position_embeddings.
DEFAULT_MAX_LEN = 32768
# Items preprocessed and length-sorted together: bounds host memory, keeps batches tight.
CHUNK_BATCHES = 16
# Batches dispatched ahead of the one being read back: keeps the device busy while the host works.
IN_FLIGHT_BATCHES = 4


@partial(jax.jit, static_argnums=0)
def embed_program(graphdef: nnx.GraphDef, state: nnx.State, batch: Mapping[str, np.ndarray]) -> jax.Array:
    """The jitted forward of every Embedder. Module level with the graphdef static, so Embedders of
    the same architecture (a new one per evaluation during training, the mining teacher, a
    reloaded checkpoint) share compiled programs instead of recompiling every bucket."""
    return nnx.merge(graphdef, state).embed(batch)


class Embedder:
    """Encodes items with a Qwen-VL-family embedding model (last-token pooling, unit vectors)."""

    # Text rows of a packed batch are a multiple of this (a data-parallel mesh's device count).
    rows_multiple: int = 1

    def __init__(
        self,
        model: VisionLanguageModel,
        text: TextProcessor,
        image_config: ImageProcessorConfig,
        *,
        position_rule: str = "hf5",
        padding_side: str = "right",
        source_dir: str | Path | None = None,
        num_threads: int | None = None,
        packing: bool = True,
        prompt_format: str = "raw",
        instruction: str = DEFAULT_INSTRUCTION,
    ):
        if position_rule not in ROPE_RULES:
            raise ValueError(f"position_rule must be one of {ROPE_RULES}, got {position_rule!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.prompt_format = prompt_format
        self.instruction = instruction
        self.model = model
        self.text = text
        self.image_config = image_config
        self.position_rule = position_rule
        self.padding_side = padding_side
        self.packing = packing
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        max_patches = image_config.max_pixels // image_config.patch_size**2
        self._max_len = text.max_len or DEFAULT_MAX_LEN
        self._max_patches = max_patches
        self._patch_layout = {"patch_dim": patch_dim(image_config), "merge_size": image_config.merge_size}
        self._batchers: dict[int, Batcher] = {}  # by rows
        self._packers: dict[int, PackedBatcher] = {}  # by max rows
        self._graphdef, self._state = nnx.split(model)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        base: str | Path | None = None,
        dtype: str = "float32",
        param_dtype: str | None = None,
        max_len: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        position_rule: str = "hf5",
        padding_side: str = "right",
        num_threads: int | None = None,
        packing: bool = True,
        attention: str = "auto",
        prompt_format: str = "raw",
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> Embedder:
        """Load weights, tokenizer and image-processor settings from a local Hugging Face directory,
        or from a PEFT LoRA/DoRA adapter directory (adapter_config.json + adapter_model.safetensors)
        on top of `base` (default: its base_model_name_or_path, a local directory), merged into the
        weights for inference; the tokenizer and preprocessor come from the adapter directory when
        it has them, else from the base.

        `dtype` is the compute dtype ("float32" or "bfloat16"), `param_dtype` the storage dtype
        (default: `dtype`). `max_len` truncates text (never image tokens); `min_pixels`/`max_pixels`
        override the checkpoint's preprocessor_config.json. `position_rule` "hf5" is transformers
        5.x's M-RoPE; "legacy" reproduces released VLM2Vec checkpoints (image tokens without
        `<|vision_start|>` get 1-D positions). `packing` False batches one item per text row
        (`padding_side` matters only then). `attention` is the kernel (`models/attention.py`: "auto"
        picks dense on CPU, XLA's fused attention on GPU, splash on TPU). `prompt_format` "raw" is
        VLM2Vec's (the text as given); "qwen3_vl_embedding" is Qwen3-VL-Embedding's chat layout with
        `instruction` as its system turn (`processing/prompt_formats.py`).
        """
        if is_adapter_dir(directory):
            model, _, source = load_adapted(directory, base=base, dtype=dtype, param_dtype=param_dtype, attention=attention)
            merge_lora(model)
            directory = processor_dir(directory, source)
        elif base is not None:
            raise ValueError(f"{directory} is a full model directory, not a PEFT adapter (no adapter_config.json): base= applies to adapters only")
        else:
            model, source = load_pretrained(directory, dtype=dtype, param_dtype=param_dtype, attention=attention), directory
        text = TextProcessor.from_pretrained_dir(directory, max_len=max_len)
        if text.image_token_id != model.config.image_token_id:
            raise ValueError(
                f"{directory}: the tokenizer's <|image_pad|> is id {text.image_token_id} but config.json says "
                f"image_token_id={model.config.image_token_id}; tokenizer and weights come from different models"
            )
        image_config = ImageProcessorConfig.from_pretrained_dir(directory, min_pixels=min_pixels, max_pixels=max_pixels)
        return cls(
            model, text, image_config, position_rule=position_rule, padding_side=padding_side,
            source_dir=source, num_threads=num_threads, packing=packing, prompt_format=prompt_format, instruction=instruction,
        )

    @property
    def dim(self) -> int:
        return self.model.config.text.hidden_size

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the model as a Hugging Face directory (tokenizer and image config copied)."""
        return save_pretrained(self.model, out_dir, source_dir=self.source_dir)

    # ------------------------------------------------------------------------------------ encode
    def encode(
        self, items: Sequence[Item], *, batch_size: int = 16, show_progress: bool = False, dim: int | None = None
    ) -> np.ndarray:
        """(N, D) float32 unit vectors, one per item, in the order given; with `dim`, (N, dim):
        each vector's first `dim` entries, renormalised (Matryoshka dimensions).

        An item is a string, or a dict with "text" and/or "image" (path, bytes, PIL image or uint8
        array; or a list of them, one placeholder each). An image whose text has no placeholder gets
        `<|image_pad|>` and a newline prepended, MMEB's layout (image first, then the instruction).
        `batch_size` is the text rows of a batch: packed, each row holds as many items as fit.
        """
        check_matryoshka_dim(dim, self.dim)
        items = list(items)
        out = np.empty((len(items), self.dim), np.float32)
        in_flight: deque[tuple[np.ndarray, jax.Array]] = deque()
        with tqdm(total=len(items), disable=not show_progress, desc="encode", unit="item") as progress:

            def collect(keep: int) -> None:
                while len(in_flight) > keep:
                    owners, vectors = in_flight.popleft()
                    real = owners >= 0
                    out[owners[real]] = np.asarray(vectors)[real]
                    progress.update(int(real.sum()))

            for owners, batch in self.batches(items, batch_size):
                in_flight.append((owners, self.embed_batch(batch)))
                # Dispatch is asynchronous: the host prepares the next batches while these run.
                collect(keep=IN_FLIGHT_BATCHES)
            collect(keep=0)
        return out if dim is None else np.asarray(truncate_and_normalize(out, dim))

    def embed_batch(self, batch: Mapping[str, np.ndarray]) -> jax.Array:
        """Unit vectors (one per row, or per slot when packed) of one built batch; returns
        immediately (asynchronous dispatch)."""
        return embed_program(self._graphdef, self._state, batch)

    def batches(self, items: Sequence[Item], batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Bucketed batches, each with the index of the item behind every vector the model returns
        for it (-1 for padding rows and empty slots). Items are preprocessed a chunk at a time
        (host memory stays bounded) and batched longest first within it. Packed: `batch_size`
        text rows of the bucketed length of the batch's longest item, filled first-fit by
        decreasing length (`PackedBatcher.groups`); unpacked: `batch_size` items, one per row.
        A short last batch is padded to the next power of two rows only, so one item costs one row."""
        chunk = batch_size * CHUNK_BATCHES
        with ThreadPoolExecutor(self.num_threads) as pool:
            for start in range(0, len(items), chunk):
                prepared = self._prepare(items, range(start, min(start + chunk, len(items))), pool)
                indices = np.fromiter(prepared, np.int64, len(prepared))
                build = self._packed if self.packing else self._padded
                yield from build(indices, [prepared[i] for i in indices], batch_size)

    def _packed(self, indices: np.ndarray, examples: list[Example], batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        max_rows = -(-batch_size // self.rows_multiple) * self.rows_multiple
        if max_rows not in self._packers:
            padded = Batcher.from_text_processor(self.text, BucketSpec.default(self._max_len, self._max_patches), **self._patch_layout)
            self._packers[max_rows] = PackedBatcher(padded, max_rows, rows_multiple=self.rows_multiple)
        packer = self._packers[max_rows]
        for group in packer.groups([e.input_ids.size for e in examples]):
            packed = packer([examples[k] for k in group])
            owners = np.full(packed.inputs["pool_positions"].size, -1, np.int64)
            owners[packed.slots] = indices[group]
            yield owners, packed.inputs

    def _padded(self, indices: np.ndarray, examples: list[Example], batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        order = np.argsort([-e.input_ids.size for e in examples], kind="stable")
        for first in range(0, len(order), batch_size):
            group = order[first : first + batch_size]
            rows = min(batch_size, 1 << (len(group) - 1).bit_length())
            if rows not in self._batchers:
                buckets = BucketSpec.default(self._max_len, self._max_patches, batch_size=rows)
                self._batchers[rows] = Batcher.from_text_processor(self.text, buckets, padding_side=self.padding_side, **self._patch_layout)
            owners = np.full(rows, -1, np.int64)
            owners[: len(group)] = indices[group]
            yield owners, self._batchers[rows]([examples[k] for k in group])

    def _prepare(self, items: Sequence[Item], indices: range, pool: ThreadPoolExecutor) -> dict[int, Example]:
        """Images decoded and patchified on host threads, texts tokenized in one batched call."""
        parsed = [_parse_item(items[i], i) for i in indices]
        jobs = [(source, i) for (_, sources), i in zip(parsed, indices) for source in sources]
        processed = iter(pool.map(lambda job: self._process_image(*job), jobs))
        images = [[next(processed) for _ in sources] for _, sources in parsed]
        texts = [
            format_prompt(text, len(imgs), self.prompt_format, instruction=self.instruction, image_token=self.text.image_token)
            for (text, _), imgs in zip(parsed, images)
        ]
        counts = [[image.num_tokens for image in imgs] for imgs in images]
        try:
            ids = self.text.encode_batch(texts, counts)
        except ValueError:
            for i, text, count in zip(indices, texts, counts):  # find the item at fault
                try:
                    self.text.encode(text, count)
                except ValueError as err:
                    raise ValueError(f"item {i}: {err}") from None
            raise
        return {
            i: Example(tokens, imgs, self.position_rule)
            for i, tokens, imgs in zip(indices, ids, images)
        }

    def _process_image(self, source: Any, index: int) -> ProcessedImage:
        try:
            return process_image(source, self.image_config)
        except ValueError as err:
            raise ValueError(f"item {index}: {err}") from err


def _parse_item(item: Item, index: int) -> tuple[str, list[Any]]:
    """(text, image sources) of one item, with an error naming the item when malformed. "image" may
    also be a list of images, one placeholder each in the text."""
    if isinstance(item, str):
        return item, []
    if not isinstance(item, Mapping):
        raise TypeError(f"item {index}: expected a str or a dict with 'text' and/or 'image', got {type(item).__name__}")
    unknown = set(item) - {"text", "image"}
    if unknown:
        raise ValueError(f"item {index}: unknown keys {sorted(unknown)}; an item has 'text' and/or 'image'")
    text, image = item.get("text") or "", item.get("image")
    sources = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    if not text and not sources:
        raise ValueError(f"item {index}: has neither text nor image")
    if not isinstance(text, str):
        raise TypeError(f"item {index}: 'text' must be a str, got {type(text).__name__}")
    return text, sources
