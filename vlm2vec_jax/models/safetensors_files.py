"""Reading the safetensors files of a checkpoint directory, tensor by tensor, zero-copy.

safetensors' numpy reader cannot return bfloat16, the dtype most checkpoints ship in; the format
is a JSON header followed by raw little-endian data, so a memory map with ml_dtypes reads any
tensor without loading the file. Pages of a memory map that were read count in the process's RSS
until unmapped, so each tensor's pages are released (madvise DONTNEED; the data stays in the page
cache and is re-read from the file if touched again) once the consumer moves on: reading a 4 GB
shard then costs one tensor of RSS, not the shard.
"""

import itertools
import json
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or tensors, or holds tensors of the wrong shape."""


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a directory: the single file, or the shards its index lists."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; a Hugging Face checkpoint directory holds its "
            "weights as safetensors (convert .bin weights with transformers' save_pretrained first)"
        )
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in {index} but does not exist: the download is incomplete")
    return files


def iter_tensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, read-only memory-mapped array) for every tensor of one safetensors file.

    A yielded array stays valid, but its pages leave this process's RSS when the next tensor is
    requested: copy what you need before advancing (reading it again re-reads the file)."""
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        try:
            header = json.loads(handle.read(header_len))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    header.pop("__metadata__", None)
    base = 8 + header_len
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = (base + offset for offset in info["data_offsets"])
        if end > len(mapped):
            raise CheckpointError(f"{file}: tensor {name} ends at byte {end} but the file has {len(mapped)}: the file is truncated")
        if end > start:
            tensor = np.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)
        else:
            tensor = np.empty(0, dtype)
        try:
            yield name, tensor.reshape(info["shape"])
        finally:
            _release(mapped, start, end)


def _release(mapped: mmap.mmap, start: int, end: int) -> None:
    """Drop the pages of [start, end) from this process's RSS (not from the page cache)."""
    if end <= start or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = start - start % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, first, end - first)


# Weight files `write_checkpoint_files` produces; those of an earlier write are removed first.
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def _shard_plan(sizes: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Keys grouped in order into shards of at most `shard_bytes` (a larger tensor stands alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes:
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_checkpoint_files(
    out_dir: Path, sizes: list[tuple[str, int]], tensors: Iterator[tuple[str, np.ndarray]], shard_bytes: int
) -> None:
    """Write tensors as the hub does: one model.safetensors, or shards plus an index above
    `shard_bytes`. `sizes` (key, bytes) plans the shards up front, so `tensors` (yielding the same
    keys in the same order) is consumed a shard at a time and host memory stays near one shard."""
    from safetensors.numpy import save_file

    plan = _shard_plan(sizes, shard_bytes)
    names = [SINGLE_FILE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    # A stale index or shards of an earlier write would be read instead of (or with) these files.
    for old in out_dir.iterdir():
        if (old.name == INDEX_FILE or _WEIGHT_FILE.match(old.name)) and old.name not in names:
            old.unlink()
    for name, keys in zip(names, plan):
        shard = dict(itertools.islice(tensors, len(keys)))
        if list(shard) != keys:
            raise RuntimeError(f"tensors arrived out of the planned order while writing {name}")
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        del shard
    if len(plan) > 1:
        weight_map = {key: name for name, keys in zip(names, plan) for key in keys}
        total = sum(nbytes for _, nbytes in sizes)
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
