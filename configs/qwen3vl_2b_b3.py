"""B3 on Qwen3-VL-2B: the B3 recipe (configs/qwen2vl_2b_b3.py: DoRA r 8, vision frozen, batch 1024
of mined batches, lr 1e-4 with 10% warmup, tau 0.02, bf16, GradCache, remat) on the backbone of
Qwen3-VL-Embedding-2B. Qwen3-VL's patches are 16 px and a merged token 32 px, so the resize cap
that gives Qwen2-VL 1280 image tokens is 1280 x 32 x 32 pixels here. Prompts are VLM2Vec's raw
ones. Keys: configs/common.py.

    python -m vlm2vec_jax.train --config configs/qwen3vl_2b_b3.py \\
        --config.model.init=/path/to/Qwen3-VL-2B-Instruct --config.data.root=/path/to/MMEB-train \\
        --config.data.batch_file=runs/mine_b3/batches.parquet --config.workdir=runs/b3_qwen3vl_2b

    # will it fit, and how long will a step take (no weights, no data):
    python -m vlm2vec_jax.train --config configs/qwen3vl_2b_b3.py --config.dry_run=True
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen2vl_2b_b3 import get_config as b3_config  # noqa: E402


def get_config():
    c = b3_config()
    c.workdir = "runs/qwen3vl_2b_b3"
    c.model.init = ""  # required: a local Qwen3-VL-2B(-Instruct) Hugging Face directory
    c.model.geometry = "qwen3vl-2b"  # what a dry run compiles without model.init
    c.model.max_pixels = 1280 * 32 * 32  # up to 1280 image tokens, as the Qwen2-VL recipes allow
    return c
