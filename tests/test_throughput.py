"""Model FLOPs counted on the traced program: what the trainer's MFU divides by."""

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from vlm2vec_jax.training.throughput import matmul_flops

X = jax.ShapeDtypeStruct((8, 32), jnp.float32)
W = jax.ShapeDtypeStruct((32, 16), jnp.float32)
ONE_MATMUL = 2 * 8 * 32 * 16


def flops_of(fn, *args) -> float:
    return matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def test_a_matmul_counts_two_flops_per_multiply_add():
    assert flops_of(lambda x, w: x @ w, X, W) == ONE_MATMUL


def test_batched_dot_general_counts_every_batch_element():
    a, b = jax.ShapeDtypeStruct((3, 8, 32), jnp.float32), jax.ShapeDtypeStruct((3, 32, 16), jnp.float32)
    assert flops_of(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 3 * ONE_MATMUL


def test_scan_body_counts_once_per_iteration():
    """XLA's cost_analysis counts a loop body once; the layers and GradCache chunks are loops."""

    def layers(x, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w[:, :32]), None), x, None, length=5)[0]

    wide = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    assert flops_of(layers, X, wide) == 5 * 2 * 8 * 32 * 32


def test_gradient_triples_the_forward_matmul():
    loss = lambda x, w: jnp.sum((x @ w) ** 2)
    assert flops_of(jax.grad(loss, argnums=(0, 1)), X, W) == 3 * ONE_MATMUL


def test_shard_map_body_counts_for_every_device_of_its_mesh():
    mesh = AbstractMesh((4,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    assert flops_of(sharded, X, W) == ONE_MATMUL
