"""The B3 recipe (Qwen2-VL-2B): the VLM2Vec recipe trained on batches mined by
`python -m vlm2vec_jax.mine` (configs/mine_b3.py) instead of random ones, lr 1e-4 with 10% warmup,
B3's positive-side prompts; `train.hard_negatives=5` for B3++ (the mined file must carry them).
Keys: configs/common.py.

    python -m vlm2vec_jax.train --config configs/qwen2vl_2b_b3.py \\
        --config.model.init=/path/to/Qwen2-VL-2B-Instruct --config.data.root=/path/to/MMEB-train \\
        --config.data.batch_file=runs/mine_b3/batches.parquet --config.workdir=runs/b3_2b
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen2vl_2b_vlm2vec import get_config as vlm2vec_config  # noqa: E402


def get_config():
    c = vlm2vec_config()
    c.workdir = "runs/qwen2vl_2b_b3"
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 200  # 10% of 2000
    c.data.batch_file = ""  # required: the mined batches.parquet (batch size 1024 = 32 clusters of 32)
    c.data.positive_prompts = True
    c.train.hard_negatives = 0  # 5 for B3++
    return c
