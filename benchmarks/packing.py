"""Packed against padded training steps on MMEB-shaped batches, same model, same batches, same CPU.

The synthetic `mmeb_shape` scale (varied image sizes up to the cap, text-only targets, long
dialogue queries, hard negatives) feeds the real pipeline (`TrainBatchSource`); each batch is run
through the padded step (every sequence at max_len, every image row at the cap: today's fixed
shapes) and, packed by `data/packing.py`, through the packed step, both with GradCache and LoRA
(DoRA, dropout on). Runs are interleaved; medians of examples/s are printed with their ratio, and
the share of padded text and patch slots that hold real tokens. A random-init Qwen2-VL with
benchmarks/forward.py's "small" widths (text 512, 4 layers; vision 256 x 4).

    python benchmarks/packing.py [--batch-size 32] [--gc-chunk 4] [--steps 6]

Timings on a loaded machine are not results: run on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
from common import base  # noqa: E402

from vlm2vec_jax.training.loop import Trainer, device_batch  # noqa: E402

SMALL = dict(text_hidden=512, text_layers=4, heads=8, kv_heads=2, intermediate=1536, vision_dim=256, vision_depth=4,
             vision_heads=4, vocab_size=4096)


def config(args: argparse.Namespace, workdir: Path, packing: bool):
    c = base()
    c.workdir = str(workdir / ("packed" if packing else "padded"))
    c.data.synthetic = "mmeb_shape"
    c.data.synthetic_dir = str(workdir / "data")
    c.data.num_workers = 0
    c.model.architecture = SMALL
    c.model.max_pixels = args.max_pixels
    c.model.max_len = args.max_len
    c.model.target_max_len = args.max_len
    c.train.mode = "lora"
    c.train.batch_size = args.batch_size
    c.train.gc_chunk_size = args.gc_chunk
    c.train.hard_negatives = args.hard_negatives
    c.train.steps = args.steps
    c.train.packing = packing
    c.eval.every = -1
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gc-chunk", type=int, default=4)
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--max-pixels", type=int, default=28 * 28 * 320)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="packing_bench_"))
    runs = {}
    for packing in (False, True):
        trainer = Trainer(config(args, workdir, packing))
        trainer.setup()
        records = trainer._records()
        batches = [device_batch(trainer._pack(_without_report(next(records))), trainer.mesh) for _ in range(args.steps)]
        start = time.perf_counter()
        step_fn, _ = trainer._compile(batches[0])
        runs[packing] = {"trainer": trainer, "step": step_fn, "batches": batches, "compile_s": time.perf_counter() - start, "times": []}
    fill = _fill(runs[False]["batches"], runs[True]["batches"])
    for repeat in range(args.steps):  # interleaved: padded batch k, packed batch k
        for run in runs.values():
            trainer = run["trainer"]
            start = time.perf_counter()
            trainer.state, metrics = run["step"](trainer.state, trainer.frozen, run["batches"][repeat], trainer.key)
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)
    result = {"batch_size": args.batch_size, "gc_chunk": args.gc_chunk, "hard_negatives": args.hard_negatives, **fill}
    for packing, run in runs.items():
        name = "packed" if packing else "padded"
        median = statistics.median(run["times"][1:])  # the first call after compilation warms caches
        result[f"{name}_examples_per_s"] = args.batch_size / median
        result[f"{name}_step_s"] = median
        result[f"{name}_compile_s"] = run["compile_s"]
    result["speedup"] = result["packed_examples_per_s"] / result["padded_examples_per_s"]
    chunks = [np.asarray(b["packed"]["num_chunks"]).tolist() for b in runs[True]["batches"]]
    result["packed_chunks_per_step"] = chunks
    print(json.dumps(result, indent=1))
    print(f"packed {result['packed_examples_per_s']:.1f} examples/s vs padded {result['padded_examples_per_s']:.1f}: "
          f"{result['speedup']:.2f}x; real tokens fill {fill['padded_text_fill']:.0%} of the padded text slots, "
          f"{fill['packed_text_fill']:.0%} of the packed chunks run")


def _without_report(record: dict) -> dict:
    record.pop("bad_data")
    return record


def _fill(padded: list[dict], packed: list[dict]) -> dict[str, float]:
    """Real tokens / patches over the slots each layout computes (packed: the chunks it runs)."""
    real = sum(float(np.sum(np.asarray(b[s]["attention_mask"]))) for b in padded for s in ("query", "target"))
    slots = sum(np.asarray(b[s]["attention_mask"]).size for b in padded for s in ("query", "target"))
    run_slots = 0
    for b in packed:
        mask = np.asarray(b["packed"]["attention_mask"])
        run_slots += int(np.asarray(b["packed"]["num_chunks"]).max()) * mask.shape[0] * mask[0, 0].size
    return {"padded_text_fill": real / slots, "packed_text_fill": real / max(run_slots, 1)}


if __name__ == "__main__":
    main()
