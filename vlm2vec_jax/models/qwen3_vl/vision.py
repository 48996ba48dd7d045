"""The Qwen3-VL vision tower: Qwen2-VL's ViT blocks (LayerNorm, a two-layer tanh-GELU MLP, 2-D
rope, attention within each image) over 16-px patches with a biased patch embedding, plus

- learned position embeddings: a square table resampled to each image's (rows, columns) patch
  grid by bilinear interpolation with aligned corners (transformers' `F.interpolate` rule, as four
  taps per patch); each image's grid is read on the device from its patches' positions;
- DeepStack: the outputs of the blocks `deepstack_visual_indexes` names, each merged 2 x 2 by its
  own merger (norm over the merged features), become features the decoder adds to its first
  layers at the image tokens.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from vlm2vec_jax.models.attention import SegmentMask
from vlm2vec_jax.models.logical_axes import EMBED, POSITIONS, param
from vlm2vec_jax.models.qwen2_vl.layers import create_stack, scan_stack_capturing
from vlm2vec_jax.models.qwen2_vl.rope import vision_rope
from vlm2vec_jax.models.qwen2_vl.vision import PatchMerger, VisionTower, layer_norm
from vlm2vec_jax.models.qwen3_vl.config import DeepStackVisionConfig


def image_grid_sizes(patch_positions: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """(V, R, 2): for each patch, the (rows, columns) of its image's patch grid: one more than the
    largest row and column among the patches of its vision row and segment."""
    rows, length = segment_ids.shape
    groups = (jnp.arange(rows)[:, None] * (length + 1) + segment_ids).reshape(-1)
    largest = jax.ops.segment_max(patch_positions.reshape(-1, 2), groups, num_segments=rows * (length + 1))
    return (largest[groups] + 1).reshape(rows, length, 2)


def bilinear_taps(index: jnp.ndarray, size: jnp.ndarray, side: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The 2 table entries along one axis and their weights, for positions `index` of an axis of
    `size` resampled from `side` entries with aligned corners (endpoints map to 0 and side - 1)."""
    src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(src)
    offsets = jnp.arange(2, dtype=jnp.float32)
    taps = jnp.clip(floor[..., None] + offsets, 0, side - 1).astype(jnp.int32)
    weights = jnp.maximum(1.0 - jnp.abs(src[..., None] - floor[..., None] - offsets), 0.0)
    return taps, weights


class DeepStackVisionTower(VisionTower):
    """Patches (V, R, patch_dim) -> merged image tokens (V * R / 4, text hidden) and DeepStack
    features (levels, V * R / 4, text hidden)."""

    def __init__(
        self, cfg: DeepStackVisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, remat: bool, attention: str, rngs: nnx.Rngs
    ):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, rngs=rngs)
        dims = dict(dtype=dtype, param_dtype=param_dtype)
        table = nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_position_embeddings, cfg.embed_dim), param_dtype)
        self.pos_embed = param(table, (POSITIONS, EMBED))
        self.deepstack_mergers = create_stack(
            lambda r: PatchMerger(cfg, norm=layer_norm, norm_after_merge=True, rngs=r, **dims), len(cfg.deepstack_visual_indexes), rngs
        )

    def position_embeddings(self, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
        """(V, R, embed_dim): the learned table resampled to each patch's place in its image."""
        side = self.cfg.position_grid_side
        grid = image_grid_sizes(patch_positions, segment_ids)
        row_taps, row_weights = bilinear_taps(patch_positions[..., 0], grid[..., 0], side)
        col_taps, col_weights = bilinear_taps(patch_positions[..., 1], grid[..., 1], side)
        index = (row_taps[..., :, None] * side + col_taps[..., None, :]).reshape(*segment_ids.shape, 4)
        weight = (row_weights[..., :, None] * col_weights[..., None, :]).reshape(*segment_ids.shape, 4)
        table = self.pos_embed[...]
        return jnp.sum(jnp.take(table, index, axis=0) * weight[..., None].astype(table.dtype), axis=-2)

    def embed_patches(self, pixel_values: jnp.ndarray, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
        x = super().embed_patches(pixel_values, patch_positions, segment_ids)
        return x + self.position_embeddings(patch_positions, segment_ids).astype(x.dtype)

    def features(
        self, pixel_values: jnp.ndarray, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        cfg = self.cfg
        x = self.embed_patches(pixel_values, patch_positions, segment_ids)
        cos, sin = vision_rope(patch_positions, cfg.head_dim, cfg.rope_theta)
        mask = SegmentMask.build(segment_ids, causal=False, implementation=self.attention)
        x, captured = scan_stack_capturing(self.blocks, x, mask, cos, sin, remat=self.remat, capture=cfg.deepstack_visual_indexes)
        merged = self.merger(x)
        graphdef, state = nnx.split(self.deepstack_mergers)
        deepstack = jax.vmap(lambda s, h: nnx.merge(graphdef, s)(h))(state, captured)
        return merged.reshape(-1, merged.shape[-1]), deepstack.reshape(len(cfg.deepstack_visual_indexes), -1, merged.shape[-1])
