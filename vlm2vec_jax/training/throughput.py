"""Model FLOPs utilisation: the compiled step's FLOPs over the devices' peak.

Peaks of accelerators are their published dense bf16 figures; a CPU's peak is measured once, as the
rate of a large float32 matmul (what its GEMM kernels reach), so MFU on CPU reads as a share of
what the machine can actually do.
"""

from __future__ import annotations

import functools
import time

import jax
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


def device_peak_flops(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device: published for known accelerators, measured on CPUs."""
    device = device or jax.devices()[0]
    for name, peak in PUBLISHED_PEAKS:
        if name.lower() in device.device_kind.lower():
            return peak
    return measured_matmul_peak()


def compiled_flops(compiled: jax.stages.Compiled) -> float:
    """FLOPs of one execution of a compiled program (XLA's cost analysis, summed over devices)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per device program
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))
