"""Embeddings on disk, so a rerun encodes nothing and a changed model encodes everything again.

Layout, one directory per model fingerprint (`fingerprint.py`):

    <root>/<fingerprint>/model.json          what the fingerprint covers, for people
    <root>/<fingerprint>/<id>.npy            float32 (n, D) vectors of one write
    <root>/<fingerprint>/<id>.keys.json      their n item keys, in row order

Each write adds a shard; its keys file is renamed into place after its vectors, so a shard without
a keys file is incomplete (a crash) and ignored, and concurrent runs never write the same file.
Vectors are memory-mapped when read.

An item key hashes the side's text and image path and the image file's size and modification time:
a rewritten image changes them. Image contents are not hashed: that would read every image on a
rerun, the very cost the cache exists to remove.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vlm2vec_jax.data.records import Side
from vlm2vec_jax.embedder import Embedder
from vlm2vec_jax.evaluation.fingerprint import describe_model, model_fingerprint

__all__ = ["EmbeddingCache", "ImageStamp", "item_key"]

MODEL_JSON = "model.json"
KEYS_SUFFIX = ".keys.json"

ImageStamp = tuple[int, int]  # (size in bytes, mtime in ns) of an image file


def item_key(side: Side, image: ImageStamp | None) -> str:
    """The cache key of one side; `image` is its image file's stamp (None without an image)."""
    raw = json.dumps([side.text, side.image, image], ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


class EmbeddingCache:
    """The cached vectors of one model, in `directory`."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, tuple[str, int]] = {}  # key -> (shard id, row)
        self._shards: dict[str, np.ndarray] = {}
        for keys_file in sorted(self.directory.glob(f"*{KEYS_SUFFIX}")):
            shard = keys_file.name.removesuffix(KEYS_SUFFIX)
            try:
                keys = json.loads(keys_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"embedding cache file {keys_file} is unreadable ({e}); delete it") from e
            self._where.update((key, (shard, row)) for row, key in enumerate(keys))

    @classmethod
    def for_embedder(cls, root: str | os.PathLike, embedder: Embedder) -> EmbeddingCache:
        """The cache of `embedder`'s model under `root` (its fingerprint's directory)."""
        description = describe_model(embedder)
        directory = Path(root) / model_fingerprint(description)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / MODEL_JSON).exists():
            text = json.dumps(description, indent=2, sort_keys=True)
            _write_atomic(directory / MODEL_JSON, lambda p: p.write_text(text, encoding="utf-8"))
        return cls(directory)

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, keys: Sequence[str], out: np.ndarray) -> np.ndarray:
        """Copy the cached vectors of `keys` into the matching rows of `out` (len(keys), D);
        returns the bool mask of the keys found."""
        hits = [self._where.get(key) for key in keys]
        by_shard: dict[str, tuple[list[int], list[int]]] = {}
        for position, hit in enumerate(hits):
            if hit is not None:
                positions, rows = by_shard.setdefault(hit[0], ([], []))
                positions.append(position)
                rows.append(hit[1])
        for shard, (positions, rows) in by_shard.items():
            vectors = self._vectors(shard)
            if vectors.shape[1:] != out.shape[1:]:
                raise ValueError(f"embedding cache shard {self.directory / shard}.npy holds vectors of shape "
                                 f"{vectors.shape[1:]}, not {out.shape[1:]}; delete it and its keys file")
            out[positions] = vectors[rows]
        return np.array([hit is not None for hit in hits], dtype=bool)

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Add `vectors` (one row per key) as a new shard."""
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        if not len(keys):
            return
        shard = uuid.uuid4().hex
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        _write_atomic(self.directory / f"{shard}.npy", lambda p: _save_npy(p, array))
        keys_text = json.dumps(list(keys))
        _write_atomic(self.directory / f"{shard}{KEYS_SUFFIX}", lambda p: p.write_text(keys_text, encoding="utf-8"))
        self._where.update((key, (shard, row)) for row, key in enumerate(keys))

    def _vectors(self, shard: str) -> np.ndarray:
        if shard not in self._shards:
            file = self.directory / f"{shard}.npy"
            try:
                self._shards[shard] = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(f"embedding cache file {file} is unreadable ({e}); delete it and its keys file") from e
        return self._shards[shard]
