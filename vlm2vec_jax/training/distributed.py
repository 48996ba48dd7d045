"""Joining a multi-process JAX run: `jax.distributed.initialize` from explicit settings, or from the
environment JAX detects by itself (TPU pods, SLURM, Open MPI), or not at all (one process)."""

from __future__ import annotations

import os

import jax
import ml_collections

AUTO = "auto"
# Environment variables that mean a cluster launcher started this process.
CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(settings: ml_collections.ConfigDict) -> None:
    """`settings.coordinator` ("host:port") with `num_processes` and `process_id`: an explicit
    multi-process run (e.g. `launch/local.sh`); "auto": JAX detects everything (a Cloud TPU VM
    slice answers from its metadata server, which no environment variable announces:
    `launch/tpu_pod.sh` passes it); empty: auto-detection when a cluster launcher's environment is
    present, else a single process. `local_devices` sets the CPU device count."""
    if settings.local_devices:
        jax.config.update("jax_num_cpu_devices", int(settings.local_devices))
    if settings.coordinator == AUTO:
        jax.distributed.initialize()
    elif settings.coordinator:
        if settings.num_processes < 1 or not 0 <= settings.process_id < settings.num_processes:
            raise ValueError(
                f"distributed.coordinator is set: give distributed.num_processes >= 1 and distributed.process_id "
                f"in [0, num_processes), got {settings.num_processes} and {settings.process_id}"
            )
        jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id)
    elif any(v in os.environ for v in CLUSTER_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        jax.distributed.initialize()
