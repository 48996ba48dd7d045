"""The Qwen2-VL vision tower: patch embedding, ViT blocks with 2-D rope, 2x2 patch merger.

Input is packed: V rows of R patches, several whole images per row told apart by segment ids, so
attention is block-diagonal per image without any per-image Python loop.
"""

from collections.abc import Callable
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from vlm2vec_jax.models.attention import SegmentMask, attention
from vlm2vec_jax.models.logical_axes import EMBED, FUSED, HEAD_DIM, HEADS, MLP, PATCH, metadata
from vlm2vec_jax.models.projection import Projection
from vlm2vec_jax.models.qwen2_vl.config import VisionConfig
from vlm2vec_jax.models.qwen2_vl.layers import activation, create_stack, linear, scan_stack
from vlm2vec_jax.models.qwen2_vl.rope import apply_rotary, vision_rope

LAYER_NORM_EPS = 1e-6


def layer_norm(dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        scale_metadata=metadata((EMBED,)), bias_metadata=metadata((EMBED,)),
    )


def attention_projections(cfg: VisionConfig, **dims) -> tuple[Projection, Projection]:
    """The tower's fused qkv, (embed) -> (3, heads, head_dim) as the checkpoint orders it, and its
    output projection (heads, head_dim) -> (embed); both biased."""
    heads, hd, e = cfg.num_heads, cfg.head_dim, cfg.embed_dim
    qkv = Projection((e,), (3, heads, hd), (EMBED, FUSED, HEADS, HEAD_DIM), bias=True, **dims)
    return qkv, Projection((heads, hd), (e,), (HEADS, HEAD_DIM, EMBED), bias=True, **dims)


def self_attention(qkv: Projection, proj: Projection, x: jnp.ndarray, mask: SegmentMask, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Fused-qkv attention over packed patches (V, R, D) with the 2-D rope, then the output projection."""
    qkv_out = qkv(x)  # (V, R, 3, heads, head_dim)
    q = apply_rotary(qkv_out[:, :, 0], cos, sin)
    k = apply_rotary(qkv_out[:, :, 1], cos, sin)
    return proj(attention(q, k, qkv_out[:, :, 2], mask))


class VisionBlock(nnx.Module):
    """Pre-norm ViT block: fused qkv attention (with bias) and a two-layer MLP."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        dims = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(cfg.embed_dim, **dims)
        self.norm2 = layer_norm(cfg.embed_dim, **dims)
        self.qkv, self.proj = attention_projections(cfg, **dims)
        self.fc1 = linear(cfg.embed_dim, cfg.mlp_dim, (EMBED, MLP), bias=True, **dims)
        self.fc2 = linear(cfg.mlp_dim, cfg.embed_dim, (MLP, EMBED), bias=True, **dims)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jnp.ndarray, mask: SegmentMask, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
        x = x + self_attention(self.qkv, self.proj, self.norm1(x), mask, cos, sin)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


Norm = Callable[..., nnx.Module]  # (dim, *, dtype, param_dtype, rngs) -> a normalisation layer


class PatchMerger(nnx.Module):
    """A norm (`norm`: LayerNorm here), then each 2x2 block of consecutive patches (block-major
    order) becomes one token of the text width through a GELU MLP. `norm_after_merge`: the norm
    runs over the merged block's concatenated features instead (Qwen3-VL's DeepStack mergers)."""

    def __init__(
        self, cfg: VisionConfig, *, norm: Norm, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
        norm_after_merge: bool = False,
    ):
        dims = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        merged = cfg.embed_dim * cfg.merge_units
        self.ln_q = norm(merged if norm_after_merge else cfg.embed_dim, **dims)
        self.fc1 = linear(merged, merged, (EMBED, MLP), bias=True, **dims)
        self.fc2 = linear(merged, cfg.out_hidden_size, (MLP, EMBED), bias=True, **dims)
        self.merge_units = cfg.merge_units
        self.norm_after_merge = norm_after_merge

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        rows, length, dim = x.shape
        merged = (rows, length // self.merge_units, dim * self.merge_units)
        x = self.ln_q(x.reshape(merged)) if self.norm_after_merge else self.ln_q(x).reshape(merged)
        return self.fc2(activation("gelu")(self.fc1(x)))


class VisionTower(nnx.Module):
    """Patches (V, R, patch_dim) -> merged image tokens (V * R / 4, text hidden). A subclass may
    change the block, the merger's norm and how the blocks run (`run_blocks`)."""

    block: ClassVar[type[nnx.Module]] = VisionBlock
    merger_norm: ClassVar[Norm] = staticmethod(layer_norm)

    def __init__(
        self, cfg: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, remat: bool, attention: str, rngs: nnx.Rngs
    ):
        dims = dict(dtype=dtype, param_dtype=param_dtype)
        # Conv3d with kernel == stride over a flattened patch is exactly this matmul.
        self.patch_embed = linear(cfg.patch_dim, cfg.embed_dim, (PATCH, EMBED), bias=cfg.patch_embed_bias, rngs=rngs, **dims)
        self.blocks = create_stack(lambda r: self.block(cfg, rngs=r, **dims), cfg.depth, rngs)
        self.merger = PatchMerger(cfg, norm=self.merger_norm, rngs=rngs, **dims)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.attention = attention

    def __call__(self, pixel_values: jnp.ndarray, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
        return self.features(pixel_values, patch_positions, segment_ids)[0]

    def features(
        self, pixel_values: jnp.ndarray, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """(merged image tokens (V * R / 4, text hidden), DeepStack features (levels, V * R / 4,
        text hidden) or None for towers without them)."""
        x = self.embed_patches(pixel_values, patch_positions, segment_ids)
        cos, sin = vision_rope(patch_positions, self.cfg.head_dim, self.cfg.rope_theta)
        merged = self.merger(self.run_blocks(x, patch_positions, segment_ids, cos, sin))
        return merged.reshape(-1, merged.shape[-1]), None

    def embed_patches(self, pixel_values: jnp.ndarray, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
        """(V, R, embed_dim): the patch embedding (a subclass may add position embeddings)."""
        del patch_positions, segment_ids  # positions enter through the rotary embedding here
        return self.patch_embed(pixel_values.astype(self.dtype))

    def run_blocks(
        self, x: jnp.ndarray, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray
    ) -> jnp.ndarray:
        """Every block attends block-diagonally: a patch sees the patches of its own image."""
        mask = SegmentMask.build(segment_ids, causal=False, implementation=self.attention)
        return scan_stack(self.blocks, x, mask, cos, sin, remat=self.remat)
