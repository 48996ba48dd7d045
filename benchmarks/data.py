"""Training input speed: the grain pipeline (0, 1, 2 workers) against transformers' image processor.

Same PNG files from disk on both sides, 84x84 and 224x224, with max_pixels = the image's area on
both sides (no resizing; the pipeline's fixed vision rows are then as small as the data allows,
as a training config would set them). Per image size:
- transformers: `Image.open` + `Qwen2VLImageProcessorPil` on batches, in this process: the image
  preprocessing a transformers training loop runs for each batch;
- ours, `process_image` alone, in this process: the same work, function for function;
- ours, the whole pipeline (`make_train_iterator` over `TrainBatchSource`): decode, patchify,
  tokenize, pack and pad fixed-shape query + target batches (query = image + instruction,
  target = a label), with 0, 1 and 2 worker processes. Rates are steady state, from the first
  record to the last (worker start-up, a few seconds of imports, is reported apart; prefetch 1, so
  at most one record per worker was ready in advance).
Runs are interleaved and medians reported; compare on a quiet machine (the CPU is shared).

    python benchmarks/data.py [--images 256] [--batch-size 32] [--epochs 2] [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from vlm2vec_jax.data.batch_plan import RandomBatchPlan
from vlm2vec_jax.data.pipeline import TrainBatchSource, make_train_iterator
from vlm2vec_jax.data.records import Side, TrainPair
from vlm2vec_jax.models.model_dir_files import build_tiny_tokenizer
from vlm2vec_jax.processing.image import ImageProcessorConfig, process_image
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

SIZES = (84, 224)
WORKERS = (0, 1, 2)


def write_images(directory: Path, size: int, count: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [str(directory / f"{i}.png") for i in range(count)]
    for i, path in enumerate(paths):
        Image.fromarray(tiny_image(size, size, seed=i)).save(path)
    return paths


def transformers_run(processor, paths: list[str], batch_size: int) -> Callable[[], float]:
    """Images per second of open + Qwen2VLImageProcessorPil, batch by batch."""

    def run() -> float:
        start = time.perf_counter()
        for i in range(0, len(paths), batch_size):
            processor(images=[Image.open(p) for p in paths[i : i + batch_size]], return_tensors="np")
        return len(paths) / (time.perf_counter() - start)

    return run


def process_image_run(paths: list[str], config: ImageProcessorConfig) -> Callable[[], float]:
    """Images per second of our `process_image` (load + patchify), one image at a time."""

    def run() -> float:
        start = time.perf_counter()
        for path in paths:
            process_image(path, config)
        return len(paths) / (time.perf_counter() - start)

    return run


def pipeline_run(source: TrainBatchSource, workers: int, startups: list[float]) -> Callable[[], float]:
    """Steady-state images per second of the pipeline; appends the time to the first record to `startups`."""

    def run() -> float:
        start = time.perf_counter()
        it = make_train_iterator(source, num_workers=workers, prefetch=1)
        try:
            next(it)
            first = time.perf_counter()
            records = len(source) - 1
            for _ in range(records):  # not to exhaustion: the end signal waits on worker shutdown
                next(it)
            elapsed = time.perf_counter() - first
        finally:
            it.close()
        startups.append(first - start)
        return records * source.per_host / elapsed

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="PNG files per size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the files per pipeline run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with tempfile.TemporaryDirectory() as tmp:
        processor_dir = build_tiny_tokenizer(Path(tmp) / "processor")
        print(f"{args.images} PNGs per size, batch {args.batch_size}, median of {args.repeats} interleaved runs")
        print(f"{'size':>5} {'what':<28} {'images/s':>9} {'batches/s':>9} {'vs HF':>6} {'start-up s':>10}")
        for size in SIZES:
            hf = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=size * size)
            hf.save_pretrained(processor_dir)
            config = ImageProcessorConfig.from_pretrained_dir(processor_dir)
            paths = write_images(Path(tmp) / str(size), size, args.images)
            pairs = [
                TrainPair("bench", i, Side("Represent the given image.", path), Side(f"label {i}"))
                for i, path in enumerate(paths)
            ]
            plan = RandomBatchPlan(["bench"] * len(pairs), args.batch_size, seed=0, homogeneous=True)
            source = TrainBatchSource(
                pairs, plan, processor_dir, max_len=128, num_steps=args.epochs * plan.steps_per_epoch
            )
            startups: dict[int, list[float]] = {w: [] for w in WORKERS}
            runs = {
                "transformers PIL processor": transformers_run(hf, paths, args.batch_size),
                "process_image (1 process)": process_image_run(paths, config),
                **{f"pipeline, {w} workers": pipeline_run(source, w, startups[w]) for w in WORKERS},
            }
            rates: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    rates[name].append(run())
            baseline = statistics.median(rates["transformers PIL processor"])
            for name, values in rates.items():
                rate = statistics.median(values)
                workers = next((w for w in WORKERS if name == f"pipeline, {w} workers"), None)
                startup = f"{statistics.median(startups[workers]):10.1f}" if workers is not None else ""
                batches = rate / args.batch_size
                print(f"{size:>5} {name:<28} {rate:9.0f} {batches:9.1f} {rate / baseline:5.2f}x {startup}")


if __name__ == "__main__":  # the guard grain's spawned workers need
    main()
