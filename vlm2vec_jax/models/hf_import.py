"""Load a local Hugging Face model directory (any backbone of `models/backbones.py`) into the Flax model, streamed tensor by tensor.

The model is built abstractly (no memory), each checkpoint tensor is memory-mapped, converted to the
parameter dtype and written straight into its slot of the stacked leaf, and a finished leaf goes to
the device before its host buffer is dropped: peak memory stays near one copy of the parameters.
On the CPU backend the device adopts the host buffer without a copy (buffers are 64-byte aligned
for that); elsewhere each leaf's transfer completes before the next, so at most one leaf is held
twice.
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from vlm2vec_jax.models.backbones import ModelConfig, backbone_of, checkpoint_rules, read_config
from vlm2vec_jax.models.safetensors_files import CheckpointError, checkpoint_files, iter_tensors
from vlm2vec_jax.models.tensor_rules import IGNORED_KEYS, Path as LeafPath, TensorRule, canonical_key
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel

ShardingFor = Callable[[LeafPath], jax.sharding.Sharding | None]
# XLA's CPU client aliases (instead of copying) host arrays aligned to this many bytes.
_ALIGNMENT = 64
# Kernels are transposed while copied; square tiles of this size keep that cache-friendly.
_TILE = 256


def _show(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _nested(flat: Mapping[LeafPath, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = _ALIGNMENT) -> np.ndarray:
    """An uninitialised array whose data is `alignment`-byte aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _assign(target: np.ndarray, value: np.ndarray) -> None:
    """`target[...] = value` with `value` reshaped (row-major) to `target`'s structured shape, tile
    by tile when `value` is a transposed (non-contiguous) matrix: about 3x faster than numpy's
    element-strided copy for the large kernels."""
    if target.shape != value.shape:
        flat = target.reshape(value.shape)
        if np.shares_memory(flat, target):  # a view: write through it
            _assign(flat, value)
        else:  # a fused leaf's strided part: transpose into a contiguous matrix first
            contiguous = np.empty(value.shape, target.dtype)
            _assign(contiguous, value)
            target[...] = contiguous.reshape(target.shape)
        return
    if value.ndim != 2 or value.flags.c_contiguous:
        target[...] = value
        return
    rows, cols = value.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            target[i : i + _TILE, j : j + _TILE] = value[i : i + _TILE, j : j + _TILE]


def _read_into_buffers(directory: Path, config: ModelConfig, leaf_shapes: Mapping[LeafPath, tuple[int, ...]]) -> dict[LeafPath, np.ndarray]:
    """Fill one host buffer per leaf from the checkpoint, checking every name and shape."""
    sources: dict[str, tuple[TensorRule, tuple[int, ...], int | None, int]] = {
        key: (rule, shape, layer, part) for rule in checkpoint_rules(config) for key, shape, layer, part in rule.hf_keys()
    }
    dtype = config.parameter_dtype
    buffers: dict[LeafPath, np.ndarray] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in checkpoint_files(directory):
        for name, tensor in iter_tensors(file):
            key = canonical_key(name)
            if key not in sources:
                if not IGNORED_KEYS.search(key):
                    unexpected.append(f"{name} ({file.name})")
                continue
            rule, shape, layer, part = sources[key]
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{file}: tensor {name} has shape {tuple(tensor.shape)} but config.json implies {shape}; "
                    "the weights and config.json come from different models"
                )
            if rule.path not in buffers:
                buffers[rule.path] = _aligned_empty(leaf_shapes[rule.path], dtype)
            target = rule.part_of(buffers[rule.path] if layer is None else buffers[rule.path][layer], part)
            _assign(target, tensor.reshape(shape[0], -1).T if rule.is_kernel else tensor)
            seen.add(key)
    if unexpected:
        raise CheckpointError(
            f"{directory}: tensors that are not part of {config.ARCHITECTURE}: {_show(unexpected)}; "
            "is this a checkpoint of another architecture?"
        )
    missing = sorted(set(sources) - seen)
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} tensors missing from the checkpoint: {_show(missing)}")
    return buffers


def load_pretrained(
    directory: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    remat: bool = False,
    attention: str = "auto",
    sharding_for: ShardingFor | None = None,
) -> VisionLanguageModel:
    """The directory's backbone (its config.json's model_type) with the directory's weights. `param_dtype` (default: `dtype`) is the storage
    dtype the tensors are converted to while loading, `attention` the kernel (`models/attention.py`);
    `sharding_for(path)` may place each leaf
    (e.g. sharded over a mesh, on one host or many); by default leaves go to the default device."""
    directory = Path(directory)
    config = read_config(
        directory, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat, attention=attention
    )
    abstract = nnx.eval_shape(lambda: backbone_of(config).model(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    leaf_shapes = {tuple(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(abstract_state)}
    buffers = _read_into_buffers(directory, config, leaf_shapes)
    arrays: dict[LeafPath, jax.Array] = {}
    for path in list(buffers):
        host = buffers.pop(path)
        sharding = sharding_for(path) if sharding_for else None
        if sharding is None:
            # device_put, not jnp.asarray (which always copies): zero-copy on CPU.
            arrays[path] = jax.device_put(host, may_alias=True)
        else:
            arrays[path] = jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index])
        # Transfers are asynchronous: without waiting, every host buffer would stay alive next to
        # its device copy until the end.
        arrays[path].block_until_ready()
        del host
    nnx.replace_by_pure_dict(abstract_state, _nested(arrays))
    return nnx.merge(graphdef, abstract_state)
