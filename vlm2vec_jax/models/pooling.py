"""From hidden states to one embedding per sequence: VLM2Vec's last-token pooling + L2 norm."""

import jax.numpy as jnp


def last_token_index(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """Index of the last real token of each row; correct for left and right padding alike."""
    length = attention_mask.shape[-1]
    return length - 1 - jnp.argmax(attention_mask[:, ::-1].astype(bool), axis=-1)


def last_token_pool(hidden: jnp.ndarray, attention_mask: jnp.ndarray) -> jnp.ndarray:
    """(B, L, D) -> (B, D): the hidden state of each row's last non-padding token."""
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """Unit vectors in float32 (torch's F.normalize: divide by max(norm, eps))."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def truncate_and_normalize(x: jnp.ndarray, dim: int) -> jnp.ndarray:
    """Matryoshka dimensions: the first `dim` entries of each vector, back to unit length."""
    return l2_normalize(x[..., :dim])


def check_matryoshka_dim(dim: int | None, width: int) -> None:
    """ValueError unless `dim` is None (the full width) or a prefix width in 1..`width`."""
    if dim is not None and not 0 < dim <= width:
        raise ValueError(f"dim={dim}: a Matryoshka dimension must be in 1..{width} (the model's width)")
