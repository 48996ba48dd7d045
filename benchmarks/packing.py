"""Packed training and encoding against padded steps and transformers + PEFT, same model, same data, same CPU.

The synthetic `mmeb_shape` scale (varied image sizes up to the cap, text-only targets, long
dialogue queries, hard negatives) feeds the real pipeline (`TrainBatchSource`). A random-init
Qwen2-VL with benchmarks/forward.py's "small" widths (text 512, 4 layers; vision 256 x 4), written
once as a Hugging Face checkpoint (our random init, tokenizer learned from the training texts,
exported with `save_pretrained`) that every side loads: our Trainers (`model.init` = that
directory) and transformers.

1. Training, one step per batch, runs interleaved (padded k, packed k, profiled k, torch k), medians of
   examples/s (the first timed step of each is dropped), GradCache and LoRA (DoRA, dropout on)
   everywhere:
   - padded: our fixed-shape step (every sequence at max_len, every image row at the cap);
   - packed: the same batch packed by `data/packing.py` (`train.packing`), chunks sized to cover
     a padded chunk (the default without a profile);
   - profiled: the same, chunks sized from a profile of the benchmark's own training set
     (`data.profile=train`: the Trainer profiles it at setup);
   - torch + PEFT (`--skip-torch` drops it): transformers' Qwen2-VL + PEFT DoRA, the PyTorch
     originals' way (benchmarks/torch_peer.py): VLM2Vec/B3's collator pads each side of the batch
     to its longest sequence (right padding), images are their normalised patches concatenated
     with `image_grid_thw`; GradCache splits each side into chunks of `--gc-chunk` rows (VLM2Vec's
     gc_q_chunk_size = gc_p_chunk_size), runs no-grad forwards of every chunk, the loss and its
     gradient w.r.t. the representations, then re-forwards each chunk with grad (same RNG state)
     and back-propagates the cached gradients; AdamW + clip_grad_norm_. Its tensors are built
     from the very records our steps see (the rows the bad-data policy kept, as a collator sees
     them). Every side's batches are built before timing (our packing and device transfer, the
     torch tensors): the timings are the steps alone.
   Before timing, with dropout off and identical adapters (ours copied into PEFT), the losses of
   batch 0 must agree: padded, packed, profiled and torch (`loss_check`, |diff| <= 1e-4 in float32, else a
   warning; `--skip-check` skips it).
   Reported per variant: examples/s, `<variant>_over_torch` (issue 14's goal >= 2x),
   `<variant>_over_padded` (goal >= 2.5x), the share of text slots that hold real tokens, and the
   packed budget and chunks per step.
2. Encoding (`--encode-items N`, 0 skips it): the queries and positives of N/2 training rows spread
   over every subset (text + image paths), through `Embedder.from_pretrained(checkpoint).encode`
   and through transformers (benchmarks/torch_peer.py's `TorchEncoder`: image processor and
   tokenizer per batch as Qwen2VLProcessor runs them, per-batch dynamic padding, last-token
   pooling, L2 norm; items sorted by an estimate of their token count first, so its batches carry
   little padding too). Both include image decoding and
   preprocessing. One untimed pass each first (our compilations; the vectors must agree, max |diff|
   reported), then `--encode-repeats` timed passes interleaved; medians of items/s and their ratio
   (goal >= 2x).

    python benchmarks/packing.py [--batch-size 32] [--gc-chunk 4] [--steps 6] [--encode-items 256]
    python benchmarks/packing.py --batch-size 4 --steps 2 --max-len 128 --max-pixels $((28*28*64)) --encode-items 16  # smoke

Prints one JSON object with every figure, then one summary line per comparison.
Timings on a loaded machine are not results: run on a quiet one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
from common import base  # noqa: E402

from vlm2vec_jax.data.prompts import IMAGE_TOKEN, to_backbone_text  # noqa: E402
from vlm2vec_jax.embedder import Embedder  # noqa: E402
from vlm2vec_jax.models.lora import HF_TARGETS  # noqa: E402
from vlm2vec_jax.models.hf_export import save_pretrained  # noqa: E402
from vlm2vec_jax.processing.image import resized_size  # noqa: E402
from vlm2vec_jax.processing.text import with_image_placeholder  # noqa: E402
from vlm2vec_jax.training import data_setup  # noqa: E402
from vlm2vec_jax.training.compiled_step import compile_step  # noqa: E402
from vlm2vec_jax.training.loop import Trainer  # noqa: E402
from vlm2vec_jax.training.model_init import RANDOM, init_model, write_random_model_dir  # noqa: E402
from vlm2vec_jax.training.placement import device_batch  # noqa: E402

from accelerator_step import SMALL  # noqa: E402  (the "small" widths both benchmarks run)
from torch_peer import TorchEncoder, TorchPeft, adapter_arrays, torch_gradcache_batch  # noqa: E402

# Our variants: name -> (train.packing, chunks sized from a profile of the benchmark's own training set).
VARIANTS = {"padded": (False, False), "packed": (True, False), "profiled": (True, True)}
LOSS_TOLERANCE = 1e-4  # float32, same weights, dropout off


def config(args: argparse.Namespace, workdir: Path, variant: str = "padded", init: str = RANDOM):
    packing, profiled = VARIANTS[variant]
    c = base()
    c.workdir = str(workdir / variant)
    c.data.synthetic = "mmeb_shape"
    c.data.synthetic_dir = str(workdir / "data")
    c.data.num_workers = 0
    c.model.init = init
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
    if profiled:
        c.data.profile = "train"  # the Trainer profiles its own training set (python -m vlm2vec_jax.data.profile's rule)
    return c


def write_checkpoint(args: argparse.Namespace, workdir: Path) -> tuple[Path, Any]:
    """(the Hugging Face directory every side loads, the training set): the Trainer's random init
    (`model.init=random`: tokenizer learned from the training texts, fan-in scaled weights), written
    out with our exporter because the Trainer's `model_init` directory holds no weights."""
    c = config(args, workdir)
    train_set = data_setup.load_train_set(c, data_setup.data_roots(c)[0])
    corpus = (side.text for pair in train_set for side in (pair.query, pair.positive))
    model_init = write_random_model_dir(workdir / "model_init", c.model.architecture.to_dict(), corpus,
                                        min_pixels=c.model.min_pixels, max_pixels=c.model.max_pixels)
    model = init_model(RANDOM, model_init, seed=c.seed, dtype="float32", param_dtype="float32", remat=False)
    out = save_pretrained(model, workdir / "checkpoint", source_dir=model_init)
    return out, train_set


# ------------------------------------------------------------------------------------------ train
def peer_args(c) -> SimpleNamespace:
    """TorchPeft's settings from our config (lr is constant there; the timing does not care)."""
    if {t.strip() for t in c.lora.targets.split(",")} != set(HF_TARGETS):
        raise ValueError(f"the torch peer adapts {HF_TARGETS}; lora.targets is {c.lora.targets}")
    t = c.train
    return SimpleNamespace(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout, no_dora=not c.lora.dora,
                           temperature=t.temperature, learning_rate=t.learning_rate, clip_norm=t.clip_norm,
                           weight_decay=t.weight_decay, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)


def loss_check(runs: dict, peer: TorchPeft | None, torch_batch: dict | None) -> dict[str, Any]:
    """Batch 0's loss with dropout off and the initial weights: padded, packed and torch."""
    losses = {}
    for name, run in runs.items():
        trainer = run["trainer"]
        c = trainer.config.copy_and_resolve_references()
        c.lora.dropout = 0.0
        step = compile_step(c, trainer.graphdef, trainer.schedule, trainer.optimizer, trainer.mesh, trainer.abstract,
                            trainer.frozen, run["batches"][0], trainer.key, trainer.image_config).compiled
        trainer.state, metrics = step(trainer.state, trainer.frozen, run["batches"][0], trainer.key)
        losses[name] = float(metrics["loss"])
    if peer is not None:
        losses["torch"] = peer.gradcache_step(torch_batch["query"], torch_batch["target"], torch_batch["labels"],
                                              torch_batch["keys"], train=False)
    reference = losses["padded"]
    diff = max(abs(v - reference) for v in losses.values())
    if diff > LOSS_TOLERANCE:
        print(f"WARNING: batch 0's losses differ by {diff:.1e} (> {LOSS_TOLERANCE}): {losses}; the timings below "
              "compare steps that do not compute the same thing", flush=True)
    return {"losses": losses, "max_abs_diff": diff, "agree": diff <= LOSS_TOLERANCE}


def train_benchmark(args: argparse.Namespace, workdir: Path, checkpoint: Path) -> dict[str, Any]:
    runs = {}
    for variant in VARIANTS:
        trainer = Trainer(config(args, workdir, variant, init=str(checkpoint)))
        trainer.setup()
        records = trainer._records()
        host = [_without_report(next(records)) for _ in range(args.steps)]
        batches = [device_batch(trainer._pack(r), trainer.mesh) for r in host]
        start = time.perf_counter()
        step_fn, _ = trainer._compile(batches[0])
        runs[variant] = {"trainer": trainer, "step": step_fn, "batches": batches, "host": host,
                         "compile_s": time.perf_counter() - start, "times": []}
    padded = runs["padded"]
    c = padded["trainer"].config
    peer, torch_batches = None, []
    if not args.skip_torch:
        trainer = padded["trainer"]
        peer = TorchPeft(str(checkpoint), peer_args(c), adapter_arrays(trainer.state.params))  # before any step
        torch_batches = [torch_gradcache_batch(r, args.gc_chunk, trainer.image_config, _image_token_id(checkpoint),
                                               c.train.mask_duplicate_targets) for r in padded["host"]]
    result: dict[str, Any] = {}
    if not args.skip_check:
        result["loss_check"] = loss_check(runs, peer, torch_batches[0] if peer else None)
    fill = {f"{name}_text_fill": _fill(padded["batches"], run["batches"]) for name, run in runs.items()}
    torch_times: list[float] = []
    for repeat in range(args.steps):  # interleaved: padded batch k, packed batch k, torch batch k
        for run in runs.values():
            trainer = run["trainer"]
            start = time.perf_counter()
            trainer.state, metrics = run["step"](trainer.state, trainer.frozen, run["batches"][repeat], trainer.key)
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)
        if peer is not None:
            b = torch_batches[repeat]
            start = time.perf_counter()
            peer.gradcache_step(b["query"], b["target"], b["labels"], b["keys"])
            torch_times.append(time.perf_counter() - start)
    result.update(batch_size=args.batch_size, gc_chunk=args.gc_chunk, hard_negatives=args.hard_negatives,
                  steps=args.steps, **fill)
    timed = {name: run["times"] for name, run in runs.items()}
    if peer is not None:
        timed["torch"] = torch_times
        result["torch_threads"] = torch.get_num_threads()
        result["torch_trainable"] = peer.trainable
        lengths = [{s: int(b[s][0]["input_ids"].shape[1]) for s in ("query", "target")} for b in torch_batches]
        result["torch_padded_lengths"] = lengths
    for name, times in timed.items():
        median = statistics.median(times[1:] or times)  # the first call after compilation warms caches
        result[f"{name}_examples_per_s"] = args.batch_size / median
        result[f"{name}_step_s"] = median
        result[f"{name}_step_s_all"] = times
    for name, run in runs.items():
        result[f"{name}_compile_s"] = run["compile_s"]
        result[f"{name}_over_padded"] = result[f"{name}_examples_per_s"] / result["padded_examples_per_s"]
        if peer is not None:
            result[f"{name}_over_torch"] = result[f"{name}_examples_per_s"] / result["torch_examples_per_s"]
        if name != "padded":
            result[f"{name}_chunks_per_step"] = [np.asarray(b["packed"]["num_chunks"]).tolist() for b in run["batches"]]
            result[f"{name}_budget"] = dataclasses.asdict(run["trainer"].packing)
    return result


def _image_token_id(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["image_token_id"]


def _without_report(record: dict) -> dict:
    record.pop("bad_data")
    return record


def _fill(padded: list[dict], batches: list[dict]) -> float:
    """Real text tokens over the text slots a variant computes (packed: the chunks it runs)."""
    real = sum(float(np.sum(np.asarray(b[s]["attention_mask"]) > 0)) for b in padded for s in ("query", "target"))
    if "packed" not in batches[0]:
        return real / sum(np.asarray(b[s]["attention_mask"]).size for b in batches for s in ("query", "target"))
    slots = 0
    for b in batches:
        mask = np.asarray(b["packed"]["attention_mask"])
        slots += int(np.asarray(b["packed"]["num_chunks"]).max()) * mask.shape[0] * mask[0, 0].size
    return real / max(slots, 1)


# --------------------------------------------------------------------------------------- encode
def encode_items(train_set: Any, count: int) -> list[dict[str, str]]:
    """Queries and positives of `count // 2` training rows spread evenly over the set (every
    subset), each as {"text", "image"}: the backbone's text with its image placeholder."""
    rows = np.linspace(0, len(train_set) - 1, max(count // 2, 1)).round().astype(int)
    items = []
    for row in rows:
        pair = train_set[int(row)]
        for side in (pair.query, pair.positive):
            text = with_image_placeholder(to_backbone_text(side.text), side.image is not None, IMAGE_TOKEN)
            items.append({"text": text, **({"image": side.image} if side.image else {})})
    return items[:count]


def token_estimate(item: dict[str, str], image_config: Any) -> int:
    """About how many tokens `item` becomes (its text's characters / 4 plus its image's merged
    tokens from the file header): the torch loop's length sort."""
    from PIL import Image

    tokens = len(item["text"]) // 4
    if "image" in item:
        with Image.open(item["image"]) as image:
            height, width = resized_size(image.width, image.height, image_config)
        tokens += height * width // (image_config.patch_size * image_config.merge_size) ** 2
    return tokens


def encode_benchmark(args: argparse.Namespace, checkpoint: Path, train_set: Any) -> dict[str, Any]:
    items = encode_items(train_set, args.encode_items)
    ours = Embedder.from_pretrained(checkpoint)
    runs: dict[str, Any] = {"ours": lambda: ours.encode(items, batch_size=args.encode_batch)}
    result: dict[str, Any] = {"encode_items": len(items), "encode_batch": args.encode_batch,
                              "encode_images": sum("image" in i for i in items)}
    first = {}
    start = time.perf_counter()
    first["ours"] = runs["ours"]()
    result["ours_encode_first_s"] = time.perf_counter() - start  # with compilations
    if not args.skip_torch:
        peer = TorchEncoder(str(checkpoint))

        runs["torch"] = lambda: peer.encode(items, args.encode_batch, length=lambda i: token_estimate(i, ours.image_config))
        start = time.perf_counter()
        first["torch"] = runs["torch"]()
        result["torch_encode_first_s"] = time.perf_counter() - start
        result["encode_max_abs_diff"] = float(np.max(np.abs(first["ours"] - first["torch"])))
        print(f"encode check: max |ours - torch| over {len(items)} vectors = {result['encode_max_abs_diff']:.2e}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.encode_repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        result[f"{name}_items_per_s"] = len(items) / statistics.median(t)
        result[f"{name}_encode_s_all"] = t
    if "torch" in runs:
        result["encode_speedup"] = result["ours_items_per_s"] / result["torch_items_per_s"]
    return result


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gc-chunk", type=int, default=4)
    parser.add_argument("--hard-negatives", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--max-pixels", type=int, default=28 * 28 * 320)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-torch", action="store_true", help="no transformers + PEFT peer (training and encoding)")
    parser.add_argument("--skip-check", action="store_true", help="no loss check before timing (saves two compilations)")
    parser.add_argument("--encode-items", type=int, default=256, help="items for the encoding comparison; 0 skips it")
    parser.add_argument("--encode-batch", type=int, default=16)
    parser.add_argument("--encode-repeats", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="packing_bench_"))
    checkpoint, train_set = write_checkpoint(args, workdir)
    result: dict[str, Any] = {"workdir": str(workdir), "train": train_benchmark(args, workdir, checkpoint)}
    if args.encode_items > 0:
        result["encode"] = encode_benchmark(args, checkpoint, train_set)
    print(json.dumps(result, indent=1))
    report(result["train"], result.get("encode"))


def report(train: dict[str, Any], encode: dict[str, Any] | None) -> None:
    if "loss_check" in train:
        losses = train["loss_check"]["losses"]
        print("loss check, batch 0, dropout off, same weights: "
              + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()) + f"; max |diff| {train['loss_check']['max_abs_diff']:.1e}")
    for name in VARIANTS:
        line = (f"training, {name}: {train[f'{name}_examples_per_s']:.2f} examples/s, {train[f'{name}_over_padded']:.2f}x "
                f"padded (goal >= 2.5x)")
        if "torch_examples_per_s" in train:
            line += f", {train[f'{name}_over_torch']:.2f}x transformers + PEFT (goal >= 2x)"
        print(line + f"; real tokens fill {train[f'{name}_text_fill']:.0%} of the text slots computed")
    if "torch_examples_per_s" in train:
        print(f"training, transformers + PEFT (dynamic padding, GradCache): {train['torch_examples_per_s']:.2f} examples/s")
    if encode is not None:
        line = f"encoding {encode['encode_items']} items: Embedder.encode {encode['ours_items_per_s']:.1f} items/s"
        if "torch_items_per_s" in encode:
            line += (f" vs transformers {encode['torch_items_per_s']:.1f}: {encode['encode_speedup']:.2f}x (goal >= 2x); "
                     f"max |diff| of the vectors {encode['encode_max_abs_diff']:.1e}")
        print(line)


if __name__ == "__main__":
    main()
