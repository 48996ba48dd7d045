"""The model's training forward as a pure function of (trainable, frozen) states, for the step."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlm2vec_jax.batch import ModelInputs
from vlm2vec_jax.models.lora import sequence_positions, set_lora_dropout
from vlm2vec_jax.processing.image import ImageProcessorConfig, normalize_patches
from vlm2vec_jax.training.chunks import absolute_image_index
from vlm2vec_jax.training.gradcache import EmbedFn

# make_vision(frozen) -> vision(params, inputs) -> {"image_features": ..., ["deepstack_features": ...]}
VisionFactory = Callable[[Any], Callable[[Any, ModelInputs], dict[str, jax.Array]]]


def make_embed_factory(graphdef: nnx.GraphDef, *, dropout: bool, image_config: ImageProcessorConfig):
    """`make_embed(frozen, step_key) -> embed(params, inputs, example_ids)`. Pixels arrive as the
    pipeline's uint8 patches and are normalised here, per chunk, with `image_config`'s mean and
    std (float patches pass through: the model takes either after this). With `dropout`, LoRA
    dropout masks are keyed by (step key, example id, position in its sequence), so GradCache's
    second pass, packing and any sharding replay the first pass's masks exactly. Padded inputs
    (one sequence per row, `example_ids` (B,)) carry image indices relative to their own vision
    row; packed chunks (`pool_index` present, per-token `example_ids` and `token_position`) come
    with chunk-absolute indices from the host."""

    def make_embed(frozen: Any, key: jax.Array) -> EmbedFn:
        def embed(params: Any, inputs: ModelInputs, example_ids: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, frozen, copy=True)  # fresh Variables: mutable in this trace
            if dropout:
                positions = inputs.get("token_position")
                if positions is None:
                    positions = sequence_positions(inputs["attention_mask"])
                set_lora_dropout(model, key, example_ids, positions)
            inputs = float_pixels(inputs, image_config)
            return model(inputs if "pool_index" in inputs else absolute_image_index(inputs))

        return embed

    return make_embed


def make_vision_factory(graphdef: nnx.GraphDef, *, image_config: ImageProcessorConfig) -> VisionFactory:
    """`make_vision(frozen) -> vision(params, inputs)`: the vision tower's features of a packed
    chunk's images (`VisionLanguageModel.image_features`), which GradCache computes once per chunk
    when the tower is frozen and hands back to the embed function in its second pass (as
    `inputs["image_features"]`, in place of the pixels)."""

    def make_vision(frozen: Any) -> Callable[[Any, ModelInputs], dict[str, jax.Array]]:
        def vision(params: Any, inputs: ModelInputs) -> dict[str, jax.Array]:
            return nnx.merge(graphdef, params, frozen, copy=True).image_features(float_pixels(inputs, image_config))

        return vision

    return make_vision


def float_pixels(inputs: ModelInputs, image_config: ImageProcessorConfig) -> ModelInputs:
    """The pipeline's uint8 patches normalised with the processor's mean and std (floats pass through)."""
    if inputs["pixel_values"].dtype != jnp.uint8:
        return inputs
    return {**inputs, "pixel_values": normalize_patches(inputs["pixel_values"], image_config)}
