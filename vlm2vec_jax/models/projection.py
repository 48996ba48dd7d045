"""A linear layer whose kernel keeps the structure of what it computes: (*in_shape, *out_shape),
every axis named, so tensor parallelism splits it where the model's heads and MLP columns are.

A fused projection holds several of a checkpoint's linears side by side along one *slot* axis
(the output's second-last): the decoder's q|k|v is (embed) -> (kv_heads, q-per-kv + 2, head_dim),
each key/value head next to the query heads that read it, so a split over `kv_heads` gives every
device whole attention groups; gate|up is (embed) -> (2, mlp), so a split over `mlp` gives every
device matching gate and up columns. `groups` names the linears along the slot axis (the names
the checkpoint and PEFT use); LoRA adapts each group on its own, flattened to the 2-D (fan in,
width) matrix the checkpoint stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from vlm2vec_jax.models.logical_axes import param

Group = tuple[str, int]  # (checkpoint name, size along the slot axis)


class Projection(nnx.Module):
    """x (..., *in_shape) -> (..., *out_shape) as one matmul, with transformers' init (normal 0.02
    kernel, zero bias). `groups`: the fused linears along the output's slot axis (second-last), in
    order, or None for a single linear."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
        groups: Sequence[Group] | None = None,
    ):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        if len(axes) != len(self.in_shape) + len(self.out_shape):
            raise ValueError(f"axes {tuple(axes)} do not name the kernel's {self.in_shape} x {self.out_shape} axes")
        if groups is not None and (len(self.out_shape) < 2 or sum(size for _, size in groups) != self.out_shape[-2]):
            raise ValueError(f"groups {list(groups)} do not fill the slot axis of the output {self.out_shape}")
        shape = (*self.in_shape, *self.out_shape)
        self.kernel = param(nnx.initializers.normal(0.02)(rngs.params(), shape, param_dtype), axes)
        out_axes = tuple(axes)[len(self.in_shape):]
        self.bias = param(jnp.zeros(self.out_shape, param_dtype), out_axes) if bias else None
        self.groups = tuple((name, size) for name, size in groups) if groups is not None else None
        self.dtype = dtype

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    def group_layout(self) -> list[tuple[str | None, int, int]]:
        """(name, start, size) of each group along the slot axis; one (None, 0, 0) for a plain linear."""
        if self.groups is None:
            return [(None, 0, 0)]
        layout, start = [], 0
        for name, size in self.groups:
            layout.append((name, start, size))
            start += size
        return layout

    def select(self, array: jax.Array, start: int, size: int) -> jax.Array:
        """A group's part of anything ending in the output's axes (kernel, bias, output)."""
        if self.groups is None:
            return array
        return jax.lax.slice_in_dim(array, start, start + size, axis=array.ndim - 2)

    def join(self, parts: Sequence[jax.Array]) -> jax.Array:
        """The inverse of `select` over every group, in order."""
        if self.groups is None:
            (part,) = parts
            return part
        return jnp.concatenate(parts, axis=parts[0].ndim - 2)

    def flat_kernel(self, kernel: jax.Array) -> jax.Array:
        """A kernel (or a group's part of it), any leading layer axes kept, as (..., fan in, width)."""
        lead = kernel.shape[: kernel.ndim - len(self.in_shape) - len(self.out_shape)]
        return kernel.reshape(*lead, self.fan_in, -1)

    def flat_input(self, x: jax.Array) -> jax.Array:
        """x (..., *in_shape) -> (..., fan in)."""
        return x.reshape(*x.shape[: x.ndim - len(self.in_shape)], self.fan_in)

    def select_tokens(self, query_index: jax.Array) -> None:
        """Keep per-token state for only the tokens `query_index` (B, Q) names, when a layer
        computes just those (the pooled tokens): a plain projection has none (LoRA's dropout keys do)."""
        del query_index

    def __call__(self, x: jax.Array) -> jax.Array:
        """One dot_general contracting the input axes, the kernel never reshaped: a flattening
        reshape of a kernel split along a minor output axis (heads, MLP columns) would make the
        partitioner gather it whole on every device."""
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        n = len(self.in_shape)
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        return y if bias is None else y + bias
