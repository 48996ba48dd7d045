"""The job a training config describes, as `python -m vlm2vec_jax.train` and `make demo`
(`vlm2vec_jax.demo`) run it: with `dry_run`, only compile the step for `topology` and report memory
and FLOPs (simulated devices: no cluster to join); otherwise join the cluster and train."""

from __future__ import annotations

import sys

import ml_collections

from vlm2vec_jax.cli_config import REPORTED_ERRORS
from vlm2vec_jax.training.distributed import initialize


def run_job(config: ml_collections.ConfigDict, *, command: str) -> int:
    """Run the job; returns the exit code: 0, or 1 for a failure whose message says all a user needs
    (`REPORTED_ERRORS`), printed as one `<command>: error: ...` line without a traceback."""
    try:
        if config.dry_run:  # compile only, on simulated devices: no cluster to join
            from vlm2vec_jax.training.dry_run import dry_run

            dry_run(config)
        else:
            initialize(config.distributed)
            from vlm2vec_jax.training.loop import Trainer  # after jax.distributed is up

            Trainer(config).run()
    except REPORTED_ERRORS as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 1
    return 0
