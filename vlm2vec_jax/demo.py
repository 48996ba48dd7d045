"""`make demo`: the default training job on the built-in synthetic benchmark.

Training lands with the training issue; until then this says so instead of pretending.
"""

import sys


def main() -> int:
    print(
        "not yet: `make demo` will train the demo model on the synthetic benchmark once training lands.\n"
        "What works today: `from vlm2vec_jax import Embedder` (see README.md, 'Embedding from Python')."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
