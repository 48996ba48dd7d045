"""`python -m vlm2vec_jax.train --config configs/<name>.py [--config.key=value ...]`: contrastive
training (keys documented in configs/common.py). A run restarted in the same workdir resumes.
`--config.dry_run=True` only compiles the step for `topology` and reports memory and FLOPs."""

import sys

import ml_collections

from vlm2vec_jax.cli_config import run_cli
from vlm2vec_jax.training.job import run_job


def main(config: ml_collections.ConfigDict) -> int:
    return run_job(config, command="vlm2vec_jax.train")


if __name__ == "__main__":
    sys.exit(run_cli(main, command="vlm2vec_jax.train", example_config="configs/demo.py"))
