"""`python -m vlm2vec_jax.train --config configs/<name>.py [--config.key=value ...]`: contrastive
training (keys documented in configs/common.py). A run restarted in the same workdir resumes.
`--config.dry_run=True` only compiles the step for `topology` and reports memory and FLOPs."""

import sys

import ml_collections

from vlm2vec_jax.cli_config import REPORTED_ERRORS, run_cli
from vlm2vec_jax.training.distributed import initialize


def main(config: ml_collections.ConfigDict) -> int:
    try:
        if config.dry_run:  # compile only, on simulated devices: no cluster to join
            from vlm2vec_jax.training.dry_run import dry_run

            dry_run(config)
        else:
            initialize(config.distributed)
            from vlm2vec_jax.training.loop import Trainer  # after jax.distributed is up

            Trainer(config).run()
    except REPORTED_ERRORS as err:
        print(f"vlm2vec_jax.train: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, command="vlm2vec_jax.train", example_config="configs/demo.py"))
