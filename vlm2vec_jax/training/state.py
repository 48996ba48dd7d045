"""The training state's layout: where each parameter and optimizer-state array lives (parameters by
`sharding.param_spec`, optimizer state ZeRO-2), the abstract state a step compiles for, and the
state at step 0. Which parameters train is `trainable.py`'s."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax import nnx

from vlm2vec_jax.models.logical_axes import axes_of
from vlm2vec_jax.training.sharding import param_spec, zero2_spec
from vlm2vec_jax.training.step import TrainState


def leaf_names(path: tuple) -> tuple[str, ...]:
    """The dict keys along a pytree path (nnx Variables add attribute keys, dropped here)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """Parameter layout (`sharding.param_spec`, from each variable's logical axes) for every
    variable of an nnx State: the same tree, each variable holding its NamedSharding."""

    def sharding(path: tuple, variable: nnx.Variable) -> nnx.Variable:
        axes = axes_of(variable)
        if axes is None:
            raise ValueError(
                f"{'/'.join(leaf_names(path))} carries no logical axes: make every model variable with "
                "models/logical_axes.param (or flax's out_sharding metadata)"
            )
        return variable.replace(NamedSharding(mesh, param_spec(axes, variable.get_value().shape, mesh)))

    return jax.tree_util.tree_map_with_path(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_train_state(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs with shardings for the state: parameters by `param_shardings`, optimizer
    state sharded ZeRO-2 over the batch axes, the step replicated."""
    shardings = param_shardings(params, mesh)
    abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    opt_shapes = jax.eval_shape(optimizer.init, abstract_params)
    abstract_opt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, zero2_spec(x.shape, mesh))),
        opt_shapes,
    )
    step = jax.ShapeDtypeStruct((), jax.numpy.int32, sharding=NamedSharding(mesh, P()))
    return TrainState(step=step, params=abstract_params, opt_state=abstract_opt)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, abstract: TrainState) -> TrainState:
    """The state at step 0, placed as `abstract` says (parameters copied in float32)."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)

    def build(params: Any) -> TrainState:
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=optimizer.init(params))

    return jax.jit(build, out_shardings=shardings)(params)

