"""Building blocks shared by the vision tower and the decoder: norms, activations, attention core,
and stacked (scanned) layers."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm2vec_jax.models.logical_axes import EMBED, STACKED, param
from vlm2vec_jax.models.projection import Projection

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nnx.Module):
    """Qwen2's RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype, axis: str = EMBED):
        self.weight = param(jnp.ones((dim,), param_dtype), (axis,))
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def linear(
    din: int, dout: int, axes: tuple[str, str], *, bias: bool, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs
) -> Projection:
    """A plain dense layer (in) -> (out), its two axes named `axes`."""
    return Projection((din,), (dout,), axes, bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def create_stack(make_layer: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` layers with every parameter stacked on a leading `layers` axis, so the forward is
    one scan (one compiled layer body, whatever the depth)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=STACKED)
    def create(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return create(rngs)


def _scan_layers(stack: nnx.Module, step: Callable[[nnx.Module, Any, Any], Any], carry: Any, per_layer: Any, remat: bool) -> Any:
    """`lax.scan` over the stacked layers: `carry = step(layer, carry, per_layer slice)` per layer;
    `remat` recomputes each layer's activations in the backward pass instead of storing them."""
    graphdef, state = nnx.split(stack)

    def body(carry: Any, xs: tuple[nnx.State, Any]) -> tuple[Any, None]:
        layer_state, extra = xs
        return step(nnx.merge(graphdef, layer_state), carry, extra), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, (state, per_layer))
    return carry


def scan_stack(stack: nnx.Module, x: jnp.ndarray, *args: Any, remat: bool, per_layer: Any = None) -> jnp.ndarray:
    """Run x through the stacked layers with `lax.scan`: layer i gets `(x, *args)`, and its slice
    of `per_layer` (arrays with a leading layer axis) as a last argument when that is given;
    `remat` recomputes each layer's activations in the backward pass instead of storing them
    (memory for compute)."""

    def step(layer: nnx.Module, h: jnp.ndarray, extra: Any) -> jnp.ndarray:
        return layer(h, *args) if per_layer is None else layer(h, *args, extra)

    return _scan_layers(stack, step, x, per_layer, remat)


def loop_stack(
    stack: nnx.Module, x: jnp.ndarray, count: int, step: Callable[[nnx.Module, Any, jnp.ndarray], Any], *, remat: bool
) -> Any:
    """x through the first `count` layers of a stack: `x = step(layer i, x, i)`, each layer's slice
    read in place by a dynamic index in a `fori_loop` (static bounds: a scan, differentiable).
    Scanning over a slice of the stack would copy the stacked weights first; a trainable stack's
    gradient gathers in one accumulator of its size instead. `remat` as in `scan_stack`."""
    graphdef, state = nnx.split(stack)

    def body(i: jnp.ndarray, h: Any) -> Any:
        return step(_layer_of(graphdef, state, i), h, i)

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.fori_loop(0, count, body, x)


def layer_at(stack: nnx.Module, index: int) -> nnx.Module:
    """Layer `index` of a stack as a module of its own (fresh variables: its slice of every array)."""
    return _layer_of(*nnx.split(stack), index)


def _layer_of(graphdef: nnx.GraphDef, state: nnx.State, index: int | jnp.ndarray) -> nnx.Module:
    """The layer at `index` (static or traced) of a split stack: a dynamic index of every array."""
    return nnx.merge(graphdef, jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, index, keepdims=False), state))


def scan_stack_capturing(
    stack: nnx.Module, x: jnp.ndarray, *args: Any, remat: bool, capture: tuple[int, ...]
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`scan_stack`, also returning the outputs of the layers `capture` names, stacked
    (len(capture), *x.shape): a buffer in the scan's carry that each captured layer writes its
    slot of, so the other layers' outputs are never kept."""
    depth = jax.tree.leaves(nnx.state(stack))[0].shape[0]
    slot_of_layer = np.full(depth, -1, np.int32)
    slot_of_layer[list(capture)] = np.arange(len(capture))

    def step(layer: nnx.Module, carry: tuple[jnp.ndarray, jnp.ndarray], slot: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        h, captured = carry
        h = layer(h, *args)
        index = jnp.maximum(slot, 0)
        kept = jnp.where(slot >= 0, h, jax.lax.dynamic_index_in_dim(captured, index, keepdims=False))
        return h, jax.lax.dynamic_update_index_in_dim(captured, kept, index, 0)

    # zeros_like keeps x's sharding and, inside shard_map, its varying axes (a scan carry must)
    empty = jnp.broadcast_to(jnp.zeros_like(x), (len(capture), *x.shape))
    return _scan_layers(stack, step, (x, empty), jnp.asarray(slot_of_layer), remat)
