"""Where metrics go: `workdir/metrics.jsonl` (one JSON object per step or evaluation) and
TensorBoard event files in `workdir/tensorboard`. Only process 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter


class MetricsLog:
    def __init__(self, workdir: Path, *, enabled: bool = True) -> None:
        self.enabled = enabled
        if enabled:
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        """One line `{"step": step, **values}` and a TensorBoard scalar per numeric value."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for key, value in clean.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _plain(value: Any) -> Any:
    """JSON-safe scalars (NaN and inf as strings, so the file stays valid JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
