"""The packed training step on one accelerator at the 2B geometry: MFU, memory, step time, beside
the projection the dry run makes from the same FLOP count.

A random-weight Qwen2-VL-2B checkpoint (the real geometry and tokenizer, bf16, written without
torch by `testing.random_checkpoint`) trains through the real `Trainer` on the `mmeb_shape`
synthetic scale: DoRA r 8 on the language model, vision frozen, bf16 compute with float32 master
weights, remat, GradCache and packing (the defaults with GradCache), the VLM2Vec recipe's keys
(configs/qwen2vl_2b_vlm2vec.py) at a batch one device holds. The trainer logs each step's time,
its MFU (the step's matmul FLOPs at the chunks it ran, over the device's published bf16 peak) and
the chunks run; this script prints their medians over the steps after the first, the device's
peak memory (`memory_stats()`), and the step time the same FLOPs project at `--mfu` (what the
dry run reports for a device: FLOPs / (peak x MFU)).

    python benchmarks/accelerator_step.py                    # one GPU/TPU: the 2B geometry
    python benchmarks/accelerator_step.py --geometry small   # any machine: a 4-layer model, to try it

One command of a few minutes on an H100/H200 (checkpoint ~1 min, synthetic data ~15 s, compile
1-2 min, steps). Nothing here is measured on a CPU: there it only shows the script runs.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
from qwen2vl_2b_vlm2vec import get_config as recipe  # noqa: E402

from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config  # noqa: E402
from vlm2vec_jax.testing.random_checkpoint import write_random_checkpoint  # noqa: E402
from vlm2vec_jax.training.loop import Trainer  # noqa: E402
from vlm2vec_jax.training.throughput import peak_flops  # noqa: E402

SMALL = dict(text_hidden=512, text_layers=4, heads=8, kv_heads=2, intermediate=1536, vision_dim=256, vision_depth=4,
             vision_heads=4, vocab_size=4096)


def config(args: argparse.Namespace, workdir: Path, model_dir: Path | None):
    c = recipe()
    c.workdir = str(workdir / "run")
    c.model.init = str(model_dir) if model_dir else "random"
    if model_dir is None:
        c.model.architecture = SMALL
        c.model.dtype = c.model.param_dtype = "float32"
    c.model.max_len = args.max_len
    c.model.max_pixels = args.max_pixels
    c.data.synthetic = "mmeb_shape"
    c.data.synthetic_dir = str(workdir / "data")
    c.data.root = ""
    c.data.num_workers = args.workers
    c.train.batch_size = args.batch_size
    c.train.gc_chunk_size = args.gc_chunk
    c.train.hard_negatives = args.hard_negatives
    c.train.packing = True
    c.train.steps = args.steps
    c.train.log_every = 1
    c.eval.every = -1
    c.export.at_end = False
    c.checkpoint.every = 10**9
    c.checkpoint.async_save = False
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=("2b", "small"), default="2b")
    parser.add_argument("--batch-size", type=int, default=64, help="queries per step (one device)")
    parser.add_argument("--gc-chunk", type=int, default=8)
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=1536)
    parser.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--mfu", type=float, default=0.4, help="the dry run's assumed MFU, for the projection")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x {jax.device_count()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="accelerator_step_") as tmp:
        workdir = Path(tmp)
        model_dir = None
        if args.geometry == "2b":
            start = time.perf_counter()
            model_dir = write_random_checkpoint(qwen2vl_2b_config(), workdir / "qwen2vl_2b", processor_files=True)
            print(f"random 2B checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
        trainer = Trainer(config(args, workdir, model_dir))
        start = time.perf_counter()
        trainer.run()
        total = time.perf_counter() - start
        lines = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "step_time_s" in line][1:]  # the first step after compile warms caches
    if not steps:
        raise SystemExit("no timed steps: raise --steps")
    step_s = statistics.median(line["step_time_s"] for line in steps)
    mfu = statistics.median(line["mfu"] for line in steps)
    peak = peak_flops()
    flops = mfu * step_s * peak  # the executed matmul FLOPs the trainer divided by
    stats = device.memory_stats() or {}
    result = {
        "device": device.device_kind, "geometry": args.geometry, "batch_size": args.batch_size, "gc_chunk": args.gc_chunk,
        "hard_negatives": args.hard_negatives, "max_len": args.max_len, "max_pixels": args.max_pixels,
        "step_s": step_s, "examples_per_s": args.batch_size / step_s, "mfu": mfu,
        "packed_chunks": statistics.median(line.get("packed_chunks", 0) for line in steps),
        "flops_per_step": flops, "projected_step_s": flops / (peak * args.mfu), "projection_mfu": args.mfu,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "memory_limit_gib": stats.get("bytes_limit", 0) / 2**30, "run_s": total,
    }
    print(json.dumps(result, indent=1))
    print(f"{device.device_kind}: {step_s:.2f} s per step ({result['examples_per_s']:.1f} examples/s), MFU {mfu:.1%}, "
          f"peak memory {result['peak_memory_gib']:.1f} of {result['memory_limit_gib']:.1f} GiB; the same FLOPs project "
          f"{result['projected_step_s']:.2f} s at {args.mfu:.0%} MFU")


if __name__ == "__main__":
    main()
