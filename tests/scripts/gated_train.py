"""`python -m vlm2vec_jax.train` held at a known step, so a test can signal a run there however
fast its steps are (no race between a few-millisecond step and the signal).

GATE_STEP=N GATE_DIR=d: right after the run logs step N to metrics.jsonl (before it checks for
SIGTERM and before it saves step N), it creates d/reached and waits until d/open exists. A
signal sent meanwhile is handled by the trainer as usual: SIGKILL leaves checkpoint N-1 as the
latest; SIGTERM makes it save step N and exit once the gate opens."""

import os
import runpy
import sys
import time
from pathlib import Path

from vlm2vec_jax.training.metrics_log import MetricsLog

GATE_STEP, GATE_DIR = int(os.environ["GATE_STEP"]), Path(os.environ["GATE_DIR"])
_write = MetricsLog.write


def gated_write(self, step, values):
    _write(self, step, values)
    if step == GATE_STEP:
        GATE_DIR.mkdir(parents=True, exist_ok=True)
        (GATE_DIR / "reached").touch()
        while not (GATE_DIR / "open").exists():
            time.sleep(0.005)


MetricsLog.write = gated_write
sys.argv = ["vlm2vec_jax.train", *sys.argv[1:]]
runpy.run_module("vlm2vec_jax.train", run_name="__main__", alter_sys=True)
