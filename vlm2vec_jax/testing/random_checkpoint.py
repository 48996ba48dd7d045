"""Random-weight checkpoints of any backbone and geometry (up to the real 2B), written without torch.

For memory and speed benchmarks and dry runs at real scale, where the values do not matter but the
files must be exactly what the hub ships: the backbone's key layout, safetensors shards of at most
`shard_bytes` with `model.safetensors.index.json`, a config.json transformers accepts, and
optionally the real Qwen tokenizer and the backbone's preprocessor_config.json.

The model is never materialised: tensors are generated one at a time from the import/export key
table (`backbones.stored_tensor_specs`) and only one shard is held in memory while it is written.
Values: std 0.02 normal for matrices, embeddings and biases; 1 + 0.02 normal for norm scales.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from vlm2vec_jax.models.backbones import ModelConfig, stored_tensor_specs
from vlm2vec_jax.models.safetensors_files import write_checkpoint_files
from vlm2vec_jax.models.model_dir_files import write_qwen2vl_processor_files

# Hub checkpoints are cut at about 4 GB per shard (Qwen2-VL-2B-Instruct: 3.99 GB + 0.43 GB).
DEFAULT_SHARD_BYTES = 4_000_000_000
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


def _random_tensor(key: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    value = rng.standard_normal(shape, dtype=np.float32)
    value *= 0.02
    if len(shape) == 1 and key.endswith(".weight"):  # LayerNorm / RMSNorm scales
        value += 1.0
    return value.astype(dtype, copy=False)


def write_random_checkpoint(
    config: ModelConfig,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    processor_files: bool = False,
) -> Path:
    """Write config.json and random safetensors weights (sharded with an index above `shard_bytes`)
    in the backbone's key layout; with `processor_files`, also the real Qwen tokenizer and the
    backbone's preprocessor_config.json (see `write_qwen2vl_processor_files`). Returns `out_dir`.

    A tensor's values depend only on `seed` and its position in the table, not on the sharding.
    Peak memory is about twice the largest shard (safetensors serialises a shard to bytes).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(_DTYPES[dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = stored_tensor_specs(config)
    sizes = [(key, int(np.prod(shape)) * np_dtype.itemsize) for key, shape in specs]
    tensors = (
        (key, _random_tensor(key, shape, np_dtype, np.random.default_rng([seed, i]))) for i, (key, shape) in enumerate(specs)
    )
    write_checkpoint_files(out, sizes, tensors, shard_bytes)
    (out / "config.json").write_text(json.dumps(config.replace(param_dtype=dtype).to_hf_dict(), indent=2))
    if processor_files:
        write_qwen2vl_processor_files(out, model_type=config.MODEL_TYPE)
    return out


def iter_random_tensors(config: ModelConfig, *, dtype: str = "bfloat16", seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors `write_random_checkpoint` writes, one at a time (same values for the same seed)."""
    np_dtype = np.dtype(_DTYPES[dtype])
    for i, (key, shape) in enumerate(stored_tensor_specs(config)):
        yield key, _random_tensor(key, shape, np_dtype, np.random.default_rng([seed, i]))
