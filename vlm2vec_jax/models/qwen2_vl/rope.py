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


def mrope(
    position_ids: jnp.ndarray, head_dim: int, theta: float, mrope_section: tuple[int, int, int]
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin (B, L, head_dim) from (3, B, L) positions: frequency band i takes its angle from the
    temporal, height or width position according to `mrope_section` (e.g. 16/24/24 of 64)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, B, L, head_dim/2)
    axis_of_band = np.repeat(np.arange(3), mrope_section)  # static: which position drives band i
    angles = jnp.where(axis_of_band == 0, freqs[0], jnp.where(axis_of_band == 1, freqs[1], freqs[2]))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
