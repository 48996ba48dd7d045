"""Rotary position embeddings: the vision tower's 2-D rope and the decoder's M-RoPE.

Angles are always computed in float32 (as transformers does); the rotation is applied in float32
and cast back, so bfloat16 runs lose no position precision.
"""

import jax.numpy as jnp
import numpy as np


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x (..., seq, heads, head_dim) by angles given as cos/sin (..., seq, head_dim)."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def vision_rope(patch_positions: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin (..., head_dim) for patches at (row, col): half the frequencies follow the row,
    half the column, then the pair is doubled over the head (rotate_half convention)."""
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))
    pos = patch_positions.astype(jnp.float32)
    angles = jnp.concatenate([pos[..., 0:1] * inv_freq, pos[..., 1:2] * inv_freq], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def mrope_bands(half: int, mrope_section: tuple[int, int, int], interleaved: bool) -> np.ndarray:
    """Which position (0 temporal, 1 height, 2 width) drives each of the `half` frequency bands:
    contiguous runs of `mrope_section` (Qwen2-VL), or interleaved t, h, w, t, h, w, ... with height
    on bands 1, 4, ... below 3 * section[1], width on 2, 5, ... below 3 * section[2] and the rest
    temporal (Qwen3-VL's `mrope_interleaved`)."""
    if not interleaved:
        return np.repeat(np.arange(3), mrope_section)
    band = np.arange(half)
    axis = np.zeros(half, np.int64)
    for dim in (1, 2):
        axis[(band % 3 == dim) & (band < 3 * mrope_section[dim])] = dim
    return axis


def mrope(
    position_ids: jnp.ndarray, head_dim: int, theta: float, mrope_section: tuple[int, int, int], interleaved: bool = False
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin (B, L, head_dim) from (3, B, L) positions: frequency band i takes its angle from the
    temporal, height or width position according to `mrope_bands`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, L, head_dim/2)
    axis_of_band = mrope_bands(head_dim // 2, mrope_section, interleaved)  # static
    angles = jnp.where(axis_of_band == 0, freqs[0], jnp.where(axis_of_band == 1, freqs[1], freqs[2]))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
