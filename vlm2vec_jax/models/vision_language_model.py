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

from vlm2vec_jax.models.pooling import l2_normalize, last_token_index


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
        if "image_features" not in batch:  # else computed before (`image_features`): the tower does not run
            pixel_values = batch.get("pixel_values")
            if pixel_values is None or pixel_values.shape[0] == 0:  # static: text-only batch
                return embeds, None
            batch = {**batch, **self.image_features(batch)}
        image_tokens, deepstack = batch["image_features"], batch.get("deepstack_features")
        index = batch["image_token_index"]
        is_image = (index >= 0)[..., None]

        def place(tokens: jnp.ndarray, elsewhere: jnp.ndarray) -> jnp.ndarray:
            return jnp.where(is_image, jnp.take(tokens, jnp.maximum(index, 0), axis=0).astype(embeds.dtype), elsewhere)

        embeds_out = place(image_tokens, embeds)
        if deepstack is None:
            return embeds_out, None
        zeros = jnp.zeros_like(embeds)
        return embeds_out, jnp.stack([place(level, zeros) for level in deepstack])

    def image_features(self, batch: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
        """The vision tower's output for the batch's vision rows, as `input_embeddings` takes it back
        in place of the pixels: "image_features" (merged tokens, text hidden) and, for towers with
        DeepStack, "deepstack_features" (levels first). GradCache computes them once per chunk when
        the tower is frozen and reuses them in its second pass."""
        tokens, deepstack = self.visual.features(batch["pixel_values"], batch["patch_positions"], batch["patch_segment_ids"])
        if deepstack is None:
            return {"image_features": tokens}
        return {"image_features": tokens, "deepstack_features": deepstack}

    def hidden_states(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """Final-layer hidden states (B, L, D) in the compute dtype."""
        embeds, deepstack = self.input_embeddings(batch)
        return self.language_model(embeds, batch["attention_mask"], batch["position_ids"], deepstack)

    def __call__(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """Unit-norm float32 embeddings (the training path): (B, D) from each row's last real
        token, or, for packed rows, (S, D) from the tokens `pool_index` (S,) names (flat indices
        into the B * L tokens: each sequence's last token). The last layer computes the pooled
        tokens only: for packed rows every row's columns of all S (the right row's are kept)."""
        mask = batch["attention_mask"]
        if "pool_index" not in batch:
            return self._pooled(batch, last_token_index(mask)[:, None])
        rows, length = mask.shape
        pool = batch["pool_index"]
        states = self._pooled(batch, jnp.broadcast_to(pool % length, (rows, pool.shape[0])), flat=False)
        return states[pool // length, jnp.arange(pool.shape[0])]

    def embed(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """The same embeddings for inference: (B, D) from each row's last real token, or, for
        packed inference rows (`processing.packed_batching`), (B * Q, D) from the columns
        `pool_positions` (B, Q) names in each row (row-major: vector b * Q + j is row b's j-th
        segment)."""
        if "pool_positions" in batch:
            return self._pooled(batch, batch["pool_positions"])
        return self._pooled(batch, last_token_index(batch["attention_mask"])[:, None])

    def _pooled(self, batch: Mapping[str, jnp.ndarray], query_index: jnp.ndarray, flat: bool = True) -> jnp.ndarray:
        """Unit vectors of the tokens `query_index` (B, Q) names: (B * Q, D), or (B, Q, D)."""
        embeds, deepstack = self.input_embeddings(batch)
        states = self.language_model.pooled_states(embeds, batch["attention_mask"], batch["position_ids"], query_index, deepstack)
        return l2_normalize(states.reshape(-1, states.shape[-1]) if flat else states)
