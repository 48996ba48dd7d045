"""Which model made a vector: the key under which the embedding cache keeps it.

A vector depends on the weights, the architecture and its numerics (config.json plus compute and
parameter dtypes), the tokenizer, the image-processor settings (pixel bounds, patch and merge
sizes, normalisation), the text length cap, the position-id rule and the prompt layout; the fingerprint hashes all
of them, and nothing that leaves vectors alone (padding side, thread count, where the files are).

Weights are hashed by content, SHA-256 over every parameter's bytes, rather than by the names,
sizes and mtimes of safetensors files: the trainer evaluates in-memory weights that have no files,
a copied checkpoint keeps its cache, and rewritten weights can never alias old vectors. The price
is one pass over the weights (about 1.8 GB/s on this machine: seconds for a 2B model, against
hours of encoding), paid only when a cache is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np
from flax import nnx

from vlm2vec_jax.embedder import Embedder
from vlm2vec_jax.evaluation.parallel import host_local_copy

__all__ = ["FINGERPRINT_VERSION", "describe_model", "model_fingerprint", "weights_digest"]

# Bump when the meaning of a cached vector changes with no change to anything hashed here.
FINGERPRINT_VERSION = 1


def weights_digest(model: nnx.Module) -> str:
    """SHA-256 of every parameter (path, dtype, shape and bytes), in the state's stable order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        array = np.ascontiguousarray(host_local_copy(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}\n".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def describe_model(embedder: Embedder) -> dict[str, Any]:
    """Everything the fingerprint covers, JSON-ready (the cache writes it beside the vectors)."""
    config = dataclasses.asdict(embedder.model.config)
    config.pop("remat")  # rematerialisation changes memory, not values
    tokenizer = embedder.text.tokenizer.backend_tokenizer.to_str()
    layout = {} if embedder.prompt_format == "raw" else {"prompt_format": embedder.prompt_format, "instruction": embedder.instruction}
    return {
        **layout,  # absent for VLM2Vec's raw prompts, so earlier caches stay valid
        "version": FINGERPRINT_VERSION,
        "config": config,
        "image_processor": dataclasses.asdict(embedder.image_config),
        "tokenizer_sha256": hashlib.sha256(tokenizer.encode()).hexdigest(),
        "image_token": embedder.text.image_token,
        "max_len": embedder.text.max_len,
        "position_rule": embedder.position_rule,
        "weights_sha256": weights_digest(embedder.model),
    }


def model_fingerprint(description: dict[str, Any]) -> str:
    """A short stable id of a `describe_model` result (96 bits of its SHA-256)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
