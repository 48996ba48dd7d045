"""`make demo`: the default training job, `python -m vlm2vec_jax.train --config configs/demo.py`.

A small randomly initialised Qwen2-VL-shaped model learns the built-in synthetic benchmark (generated
on first use, reused after) on the CPU, evaluated with the MMEB protocol as it goes. Extra arguments
are config overrides, e.g. `python -m vlm2vec_jax.demo --config.train.steps=100`.
"""

import sys
from pathlib import Path

import ml_collections

from vlm2vec_jax.cli_config import run_cli
from vlm2vec_jax.training.job import run_job

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.py"


def _train(config: ml_collections.ConfigDict) -> int:
    return run_job(config, command="vlm2vec_jax.demo")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if not DEMO_CONFIG.is_file():
        print(f"vlm2vec_jax.demo: {DEMO_CONFIG} is missing; run the demo from a checkout of the repository")
        return 1
    return run_cli(_train, [argv[0], f"--config={DEMO_CONFIG}", *argv[1:]], command="vlm2vec_jax.demo",
                   example_config="configs/demo.py")


if __name__ == "__main__":
    sys.exit(main())
