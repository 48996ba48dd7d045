"""vlm2vec_jax: universal multimodal embeddings (VLM2Vec) with B3 batch mining, in JAX/Flax."""
