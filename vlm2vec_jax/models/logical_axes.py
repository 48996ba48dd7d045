"""The logical axis names every parameter carries, and how a parameter is made with them.

A parameter says what each of its axes *is* (MaxText's `kernel_axes`, flax's `out_sharding`
metadata): the token embedding is (vocab, embed), a fused q|k|v kernel (embed, kv_heads, qkv,
head_dim), a stacked layer's leaf gains `layers` in front when the stack is built. Where an axis
lives on a device mesh is a separate table (`training/sharding.py`'s `LOGICAL_AXIS_RULES`), so the
model knows nothing of meshes and the trainer matches no leaf names.

Parameters are created unplaced (`eager_sharding=False`): the model is built abstractly or on the
host, and the trainer (or the checkpoint loader) places each leaf.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

LAYERS = "layers"  # the scanned layer (or block, or DeepStack level) index: never split
VOCAB = "vocab"
EMBED = "embed"  # a model width: the decoder's hidden size, the vision tower's embedding
HEADS = "heads"  # attention heads (the query heads of grouped-query attention)
KV_HEADS = "kv_heads"  # key/value heads; a fused q|k|v kernel is grouped by them
HEAD_DIM = "head_dim"
MLP = "mlp"  # an MLP's hidden width
FUSED = "fused"  # the slot axis of a fused projection (q|k|v within a kv group, gate|up, q|k|v of the tower)
PATCH = "patch"  # a flattened pixel patch (channels x frames x rows x columns)
POSITIONS = "positions"  # a learned position table's entries
LORA_RANK = "lora_rank"
BATCH = "batch"  # per-example state (LoRA dropout keys), never a parameter's
LENGTH = "length"

# The transform metadata that stacks a module's parameters under a leading `layers` axis.
STACKED = {nnx.PARTITION_NAME: LAYERS}

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Sequence[str | None], kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A variable of `kind` holding `value`, its axes named `axes` (one name, or None, per axis)."""
    axes = tuple(axes)
    if len(axes) != len(value.shape):
        raise ValueError(f"logical axes {axes} name {len(axes)} axes of a value shaped {tuple(value.shape)}")
    return kind(value, out_sharding=axes, eager_sharding=False)


def axes_of(variable: nnx.Variable) -> Axes | None:
    """The logical axes a variable was made with, or None."""
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes is not None else None


def metadata(axes: Sequence[str | None]) -> dict:
    """The keyword metadata flax's layers (`nnx.Embed`, `nnx.LayerNorm`) take for their parameters."""
    return {"out_sharding": tuple(axes), "eager_sharding": False}
