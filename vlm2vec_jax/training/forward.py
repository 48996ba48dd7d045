"""The model's training forward as a pure function of (trainable, frozen) states, for the step."""

from typing import Any

import jax
from flax import nnx

from vlm2vec_jax.batch import ModelInputs
from vlm2vec_jax.models.lora import set_lora_dropout
from vlm2vec_jax.training.chunks import absolute_image_index
from vlm2vec_jax.training.gradcache import EmbedFn


def make_embed_factory(graphdef: nnx.GraphDef, *, dropout: bool):
    """`make_embed(frozen, step_key) -> embed(params, inputs, example_ids)`. With `dropout`, LoRA
    dropout masks are keyed by (step key, example id), so GradCache's second pass and any sharding
    replay the first pass's masks exactly."""

    def make_embed(frozen: Any, key: jax.Array) -> EmbedFn:
        def embed(params: Any, inputs: ModelInputs, example_ids: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, params, frozen, copy=True)  # fresh Variables: mutable in this trace
            if dropout:
                set_lora_dropout(model, key, example_ids)
            return model(absolute_image_index(inputs))

        return embed

    return make_embed
