"""The B3 recipe on Qwen2-VL-7B with parameters sharded: FSDP over 8 devices per replica (frozen
bf16 base weights and the adapters both split), ZeRO-2 optimizer state, GradCache chunks of 4
queries per device, remat. Keys: configs/common.py; `--config.dry_run=True` compiles it from
abstract shapes and reports per-device memory (the launch issue).

    python -m vlm2vec_jax.train --config configs/qwen2vl_7b_b3.py \\
        --config.model.init=/path/to/Qwen2-VL-7B-Instruct --config.data.root=/path/to/MMEB-train \\
        --config.data.batch_file=runs/mine_b3/batches.parquet --config.workdir=runs/b3_7b
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen2vl_2b_b3 import get_config as b3_2b_config  # noqa: E402


def get_config():
    c = b3_2b_config()
    c.workdir = "runs/qwen2vl_7b_b3"
    c.model.init = ""  # required: a local Qwen2-VL-7B(-Instruct) Hugging Face directory
    c.model.geometry = "7b"  # what a dry run compiles without model.init
    c.mesh.fsdp = 8
    c.mesh.data = -1  # replicas of the 8-way FSDP group: every further device
    c.train.gc_chunk_size = 4
    return c
