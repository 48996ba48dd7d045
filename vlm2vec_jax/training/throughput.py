"""Model FLOPs utilisation: the traced step's matmul FLOPs over the devices' peak.

Peaks of accelerators are their published dense bf16 figures; a CPU's peak is measured once, as the
rate of a large float32 matmul (what its GEMM kernels reach), so MFU on CPU reads as a share of
what the machine can actually do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.extend.core
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device, by substrings of `device_kind` (first match wins).
PUBLISHED_PEAKS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)
CPU_MATMUL_SIZE = 2048


@functools.cache
def measured_matmul_peak(size: int = CPU_MATMUL_SIZE, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` (size x size) float32 matmuls on the default device."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops() -> float:
    """Peak FLOP/s of all devices of the run: published figures for known accelerators; on CPUs the
    measured matmul rate of each host (simulated CPU devices share one host's cores)."""
    device = jax.devices()[0]
    for name, peak in PUBLISHED_PEAKS:
        if name.lower() in device.device_kind.lower():
            return peak * jax.device_count()
    return measured_matmul_peak() * jax.process_count()


def matmul_flops(jaxpr: jax.extend.core.Jaxpr, while_trips: float = 1.0) -> float:
    """Model FLOPs of a traced program: 2 x MACs of every dot_general and convolution over the
    global batch. Why not XLA's `cost_analysis()`: it counts a loop body once, and the model's
    layers and GradCache's chunks are loops. Scan bodies count `length` times, a cond its largest
    branch, a shard_map body once per device of its mesh, and a while loop (a data-dependent trip
    count: the packed step's chunk loops) `while_trips` times, which the caller knows per batch."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (_, contracted), (_, batched) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            kept = (d for i, d in enumerate(rhs) if i not in contracted and i not in batched)
            total += 2.0 * math.prod(lhs) * math.prod(kept)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        subs = [p for v in eqn.params.values() for p in (v if isinstance(v, (tuple, list)) else (v,))
                if isinstance(p, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))]
        counts = [matmul_flops(getattr(sub, "jaxpr", sub), while_trips) for sub in subs]
        if name == "scan":
            total += eqn.params["length"] * sum(counts)
        elif name == "cond":
            total += max(counts, default=0.0)
        elif name == "while":  # body_jaxpr runs while_trips times; cond_jaxpr holds no matmuls
            total += while_trips * sum(counts)
        elif name == "shard_map":
            total += eqn.params["mesh"].size * sum(counts)
        else:
            total += sum(counts)
    return total


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of a compiled step as `fixed + per_trip * trips`: `trips` is how many times its
    while loops run (0 for a step without any; the packed step's chunk count, known per batch)."""

    fixed: float
    per_trip: float

    @classmethod
    def of(cls, jaxpr: jax.extend.core.Jaxpr) -> StepFlops:
        fixed = matmul_flops(jaxpr, while_trips=0.0)
        return cls(fixed, matmul_flops(jaxpr, while_trips=1.0) - fixed)

    def at(self, trips: float = 0.0) -> float:
        return self.fixed + self.per_trip * trips
