"""Model FLOPs counted on the traced program: what the trainer's MFU divides by."""

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import numpy as np

from vlm2vec_jax.training.packed_gradcache import executed_trips
from vlm2vec_jax.training.throughput import StepFlops, matmul_flops

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


def test_while_body_counts_the_trips_the_caller_gives():
    """The packed step's chunk loops have a traced trip count (a while loop): its FLOPs are the
    fixed part plus the per-trip part times the chunks a batch fills."""

    def chunks(x, w, trips):
        return jax.lax.fori_loop(0, trips, lambda _, h: jnp.tanh(h @ w[:, :32]), x)

    wide = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x, w, n: (x @ w).sum() + chunks(x, w, n).sum())(X, wide, 3).jaxpr
    per_trip = 2 * 8 * 32 * 32
    assert matmul_flops(jaxpr, while_trips=3) == per_trip + 3 * per_trip
    flops = StepFlops.of(jaxpr)
    assert (flops.fixed, flops.per_trip, flops.at(5)) == (per_trip, per_trip, 6 * per_trip)


def test_executed_trips_follow_the_slowest_shard_of_each_device():
    counts = np.array([1, 3, 2, 2])
    assert executed_trips(counts, devices=2, per_device_loops=True) == 2.5  # devices run 3 and 2
    assert executed_trips(counts, devices=4, per_device_loops=True) == 2.0
    assert executed_trips(counts, devices=4, per_device_loops=False) == 3.0  # one program, the largest
