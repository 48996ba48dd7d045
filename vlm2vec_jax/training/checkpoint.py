"""Checkpoints with orbax: the trainable parameters, optimizer state and step (sharded arrays, each
host writing its shards), plus JSON metadata (data position, config, metrics) — asynchronous, the
newest `keep` kept.

orbax writes a step into a temporary directory and renames it into place when complete, so a crash
during a save leaves the previous checkpoint the latest one. Frozen weights are not saved: they are
re-read from `model.init` (or re-created from the seed) on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from vlm2vec_jax.training.step import TrainState


class Checkpointer:
    """Save and restore `TrainState` + metadata under `directory` (one subdirectory per step)."""

    def __init__(self, directory: Path, *, keep: int, async_save: bool = True) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, metadata: dict[str, Any]) -> None:
        """Start saving (returns while the write continues in the background when async)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state at `step`, placed as `abstract_state`'s shardings say (any mesh), and its metadata."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["metadata"]

    def wait(self) -> None:
        """Block until a pending asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
