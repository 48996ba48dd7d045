"""The VLM2Vec recipe (paper v1, Qwen2-VL-2B): DoRA r 8 on the language model's q/k/v/o and
gate/up/down, vision tower frozen, global batch 1024 of random one-task batches, InfoNCE at
temperature 0.02, lr 2e-5 linear after 100 warmup steps, 2000 steps, bf16 compute with float32
master weights, GradCache. Keys: configs/common.py.

    python -m vlm2vec_jax.train --config configs/qwen2vl_2b_vlm2vec.py \\
        --config.model.init=/path/to/Qwen2-VL-2B-Instruct --config.data.root=/path/to/MMEB-train \\
        --config.eval.root=/path/to/MMEB-eval --config.workdir=runs/vlm2vec_2b
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base  # noqa: E402


def get_config():
    c = base()
    c.workdir = "runs/qwen2vl_2b_vlm2vec"
    c.model.init = ""  # required: a local Qwen2-VL-2B(-Instruct) Hugging Face directory
    c.model.geometry = "2b"  # what a dry run compiles without model.init
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # frozen base weights; the adapters train in float32
    c.model.remat = True
    c.model.min_pixels = 3136
    c.model.max_pixels = 1280 * 28 * 28  # VLM2Vec's resize cap for Qwen2-VL
    c.model.max_len = 1536  # fixed shapes pad every sequence: the largest image (1280 tokens) + 256 text tokens
    c.train.mode = "lora"
    c.train.freeze_vision = True
    c.train.steps = 2000
    c.train.batch_size = 1024
    c.train.gc_chunk_size = 8  # per device; the step's memory is that of 8 queries + 8 targets
    c.train.temperature = 0.02
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 100
    c.train.schedule = "linear"
    c.data.root = ""  # required: MMEB-train (parquet per subset + images)
    c.data.max_rows_per_subset = 100_000
    c.data.homogeneous = True
    c.eval.every = 500
    c.eval.max_queries = 1000
    c.checkpoint.every = 250
    return c
