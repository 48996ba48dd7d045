"""vlm2vec_jax: universal multimodal embeddings (VLM2Vec) with B3 batch mining, in JAX/Flax."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlm2vec_jax.embedder import Embedder

__all__ = ["Embedder"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import vlm2vec_jax.processing...` in data workers does not pull in JAX and Flax.
    if name == "Embedder":
        from vlm2vec_jax.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'vlm2vec_jax' has no attribute {name!r}")
