"""Crash in the middle of a checkpoint save: `python crash_during_save.py CHECKPOINT_DIR STEP`.

Starts an asynchronous save of a large state as STEP through the project's `Checkpointer` (orbax),
waits until orbax's temporary directory for it exists (the write is under way), then SIGKILLs this
process: what a preemption or OOM kill during a save leaves behind. Exits by the signal; any other
exit means the crash was not staged (a message says why)."""

import os
import signal
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from vlm2vec_jax.training.checkpoint import Checkpointer
from vlm2vec_jax.training.step import TrainState

BIG = 48 * 2**20  # float32 values: 192 MiB of incompressible data, long enough to write to be killed mid-way


def main(directory: Path, step: int) -> None:
    values = np.random.default_rng(0).standard_normal(BIG, dtype=np.float32)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params={"big": jnp.asarray(values)}, opt_state=())
    checkpointer = Checkpointer(directory, keep=2, async_save=True)
    checkpointer.save(step, state, {"data_position": step})
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(f"{step}.") and "tmp" in p.name for p in directory.iterdir()):
        if (directory / str(step)).exists():
            sys.exit(f"step {step} finished before the temporary directory was seen")
        if time.monotonic() > deadline:
            sys.exit("no temporary directory appeared")
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
