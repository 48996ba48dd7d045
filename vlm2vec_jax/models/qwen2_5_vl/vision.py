"""The Qwen2.5-VL vision tower: Qwen2-VL's patch embedding, 2-D rope and merger, with RMSNorm, a
biased SwiGLU MLP and window attention.

transformers reorders the patches so each window is contiguous, attends per window, and restores
the order after the merger. Here the order never changes: a window layer's mask joins patches of
the same image *and* the same window (from each patch's (row, column), on the device), which is
the same attention, and the merged tokens come out where the host put them. Window and full
masks are built once; each scanned block picks its own with a per-layer flag.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm2vec_jax.models.attention import SegmentMask
from vlm2vec_jax.models.qwen2_5_vl.config import WindowVisionConfig
from vlm2vec_jax.models.logical_axes import EMBED, FUSED, MLP
from vlm2vec_jax.models.projection import Projection
from vlm2vec_jax.models.qwen2_vl.layers import RMSNorm, activation, linear, scan_stack
from vlm2vec_jax.models.qwen2_vl.vision import VisionTower, attention_projections, self_attention

NORM_EPS = 1e-6
# Window ids pack (image segment, window row, window column) into one int32: bits 20+, 10-19, 0-9.
WINDOW_AXIS_BITS = 10


def rms_norm(dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs) -> RMSNorm:
    del dtype, rngs  # RMSNorm computes in float32 and casts back; it draws nothing
    return RMSNorm(dim, NORM_EPS, param_dtype=param_dtype)


def window_segment_ids(segment_ids: jnp.ndarray, patch_positions: jnp.ndarray, window: int) -> jnp.ndarray:
    """(V, R) ids equal exactly for patches of one image and one `window` x `window` patch window
    (padding stays 0). Rows hold fewer than 2048 images, images fewer than 1024 windows a side."""
    row, col = patch_positions[..., 0] // window, patch_positions[..., 1] // window
    ids = (segment_ids << (2 * WINDOW_AXIS_BITS)) | (row << WINDOW_AXIS_BITS) | col
    return jnp.where(segment_ids > 0, ids, 0)


class WindowVisionBlock(nnx.Module):
    """Pre-RMSNorm ViT block: fused qkv attention over its window or its image, SwiGLU MLP (biased)."""

    def __init__(self, cfg: WindowVisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        dims = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = rms_norm(cfg.embed_dim, **dims)
        self.norm2 = rms_norm(cfg.embed_dim, **dims)
        self.qkv, self.proj = attention_projections(cfg, **dims)
        self.gate_up_proj = Projection(
            (cfg.embed_dim,), (2, cfg.intermediate_size), (EMBED, FUSED, MLP), bias=True,
            groups=(("gate_proj", 1), ("up_proj", 1)), **dims,
        )
        self.down_proj = linear(cfg.intermediate_size, cfg.embed_dim, (MLP, EMBED), bias=True, **dims)
        self.act = activation(cfg.hidden_act)

    def __call__(
        self, x: jnp.ndarray, image: SegmentMask, window: SegmentMask, cos: jnp.ndarray, sin: jnp.ndarray, full: jnp.ndarray
    ) -> jnp.ndarray:
        """`full` (a traced boolean): this block attends over whole images, else over windows."""
        x = x + self_attention(self.qkv, self.proj, self.norm1(x), image.where(full, window), cos, sin)
        gate_up = self.gate_up_proj(self.norm2(x))
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        return x + self.down_proj(self.act(gate) * up)


class WindowVisionTower(VisionTower):
    """Patches (V, R, patch_dim) -> merged image tokens (V * R / 4, text hidden)."""

    block = WindowVisionBlock
    merger_norm = staticmethod(rms_norm)

    def run_blocks(
        self, x: jnp.ndarray, patch_positions: jnp.ndarray, segment_ids: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray
    ) -> jnp.ndarray:
        cfg = self.cfg
        image = SegmentMask.build(segment_ids, causal=False, implementation=self.attention)
        windows = window_segment_ids(segment_ids, patch_positions, cfg.window_patches)
        window = SegmentMask.build(windows, causal=False, implementation=self.attention)
        full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
        return scan_stack(self.blocks, x, image, window, cos, sin, remat=self.remat, per_layer=jnp.asarray(full))
