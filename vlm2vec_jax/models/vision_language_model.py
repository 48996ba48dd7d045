"""What every backbone shares: a vision tower whose merged image tokens replace the
`<|image_pad|>` embeddings (and whose DeepStack features, where it has them, go to the first
decoder layers at the same places), a decoder, and the pooled, normalised embedding read from its
last layer. A backbone (`models/backbones.py`) names its own tower and decoder classes.

Inputs follow `vlm2vec_jax.batch.ModelInputs`; every layout decision was made on the host.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from vlm2vec_jax.models.pooling import l2_normalize, last_token_index, last_token_pool


class VisionLanguageModel(nnx.Module):
    """A Qwen-VL-family model without the LM head: what an embedding model needs. Subclasses set
    `vision_tower` and `decoder`, each built as `cls(sub_config, dtype=, param_dtype=, remat=,
    attention=, rngs=)` from `config.vision` / `config.text`."""

    vision_tower: ClassVar[type[nnx.Module]]
    decoder: ClassVar[type[nnx.Module]]
    # The vision tower's parameters (what `train.freeze_vision` freezes): everything under `visual`.
    VISION_PARAMETERS: ClassVar[nnx.filterlib.Filter] = nnx.All(nnx.Param, nnx.PathContains("visual"))

    def __init__(self, config: Any, *, rngs: nnx.Rngs):
        dims = dict(dtype=config.compute_dtype, param_dtype=config.parameter_dtype, remat=config.remat, rngs=rngs)
        dims["attention"] = config.attention
        self.visual = self.vision_tower(config.vision, **dims)
        self.language_model = self.decoder(config.text, **dims)
        self.config = config

    def lora_sites(self) -> list[tuple[nnx.Module, str, tuple[str, ...]]]:
        """Where LoRA adapters may go: (module, attribute holding a stacked `Projection`, the HF
        linears it holds): the decoder's projections (`LORA_SITES`), never the vision tower's."""
        layers = self.language_model.layers
        return [(layers, attribute, names) for attribute, names in self.decoder.LORA_SITES.items()]

    def input_embeddings(self, batch: Mapping[str, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """(token embeddings with each image_pad replaced by its merged vision token, the tower's
        DeepStack features at the same places (levels, B, L, D), zero elsewhere, or None)."""
        embeds = self.language_model.embed_tokens(batch["input_ids"])
        pixel_values = batch.get("pixel_values")
        if pixel_values is None or pixel_values.shape[0] == 0:  # static: text-only batch
            return embeds, None
        image_tokens, deepstack = self.visual.features(pixel_values, batch["patch_positions"], batch["patch_segment_ids"])
        index = batch["image_token_index"]
        is_image = (index >= 0)[..., None]

        def place(tokens: jnp.ndarray, elsewhere: jnp.ndarray) -> jnp.ndarray:
            return jnp.where(is_image, jnp.take(tokens, jnp.maximum(index, 0), axis=0).astype(embeds.dtype), elsewhere)

        embeds_out = place(image_tokens, embeds)
        if deepstack is None:
            return embeds_out, None
        zeros = jnp.zeros_like(embeds)
        return embeds_out, jnp.stack([place(level, zeros) for level in deepstack])

    def hidden_states(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """Final-layer hidden states (B, L, D) in the compute dtype."""
        embeds, deepstack = self.input_embeddings(batch)
        return self.language_model(embeds, batch["attention_mask"], batch["position_ids"], deepstack)

    def __call__(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """Unit-norm float32 embeddings of the final layer (the training path): (B, D) from each
        row's last real token, or, for packed rows, (S, D) from the tokens `pool_index` (S,) names
        (flat indices into the B * L tokens: each sequence's last token)."""
        hidden = self.hidden_states(batch)
        if "pool_index" in batch:
            return l2_normalize(jnp.take(hidden.reshape(-1, hidden.shape[-1]), batch["pool_index"], axis=0))
        return l2_normalize(last_token_pool(hidden, batch["attention_mask"]))

    def embed(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """The same embeddings for inference, with the last layer computed for the pooled tokens
        only: (B, D) from each row's last real token, or, for packed inference rows
        (`processing.packed_batching`), (B * Q, D) from the columns `pool_positions` (B, Q) names
        in each row (row-major: vector b * Q + j is row b's j-th segment)."""
        mask = batch["attention_mask"]
        query_index = batch["pool_positions"] if "pool_positions" in batch else last_token_index(mask)[:, None]
        embeds, deepstack = self.input_embeddings(batch)
        states = self.language_model.pooled_states(embeds, mask, batch["position_ids"], query_index, deepstack)
        return l2_normalize(states.reshape(-1, states.shape[-1]))
