"""The training step: GradCache's cost, its memory, and a transformers + PEFT peer, same CPU.

A "small" Qwen2-VL with benchmarks/forward.py's widths (text 512, 8 heads / 2 kv, MLP 1536; vision
256 x 4) but 4 decoder layers instead of 8 by default, so a step takes ~1-3 s on 2 cores (every
size is a flag: `--text-layers 8` is forward.py's depth, ~2x the time). Random weights written by
transformers, so both sides load the very same checkpoint. The batch is VLM2Vec-shaped: each query is an image (112x112 by default: 16 merged
tokens) + an instruction, each target a text; built once with our processing (right padding,
aligned vision rows) and fed to PyTorch as the equivalent tensors. Both sides train
LoRA/DoRA r=8, alpha 64, dropout 0.1 on the language model's q/k/v/o/gate/up/down, vision frozen,
AdamW (+ global-norm clip 1.0) on InfoNCE over the batch (temperature 0.02, last-token pooling,
L2 norm). Runs are interleaved and medians reported.

1. GradCache cost: our jitted step with one chunk (gc_chunk_size = per-device batch) against
   gc_chunk_size = batch / 8, and gc_chunk_size = 0 (no caching: one forward, one backward).
2. Memory: `compiled.memory_analysis()` of the step at a fixed chunk for global batches
   64 ... 512 (compiled, never run). The goal (<= +10% over batch 64) is judged on temp bytes:
   arguments grow with the batch by construction (the batch itself is an argument).
3. Ours against transformers' PyTorch Qwen2-VL + PEFT (eager, `model.model(...)` without the LM
   head, use_cache=False, torch AdamW + clip_grad_norm_), both without GradCache. Before timing,
   identical weights (our adapters are copied into PEFT's) and dropout off: the losses of two
   consecutive steps must agree (the second one checks gradients and the AdamW update too).
4. MFU: the step's FLOPs over its median time against `measured_matmul_peak()`. FLOPs are the
   matmuls of the traced step (`throughput.matmul_flops`, what the trainer logs; scan bodies times
   their length, which XLA's cost analysis would count once). MFU uses the no-cache step's FLOPs for every row (GradCache's second forward is
   recomputation, not model work; torch runs the same math); HFU uses each step's executed FLOPs.

    python benchmarks/train_step.py [--batch-size 16] [--repeats 5] [--memory-batches 64,128,256,512]

Timings on a loaded machine are not results: run on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
import optax
import torch
from flax import nnx

from vlm2vec_jax.models.lora import HF_TARGETS, LoRAConfig, apply_lora
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.processing.batching import Batcher, BucketSpec, Example
from vlm2vec_jax.processing.image import ImageProcessorConfig, process_image
from vlm2vec_jax.processing.text import TextProcessor
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint, tiny_image
from vlm2vec_jax.training.chunks import row_axis
from vlm2vec_jax.training.forward import make_embed_factory
from vlm2vec_jax.training.optimizer import make_optimizer
from vlm2vec_jax.training.placement import device_batch, place
from vlm2vec_jax.training.sharding import batch_sharding, make_mesh
from vlm2vec_jax.training.state import abstract_train_state, init_train_state, param_shardings
from vlm2vec_jax.training.step import MASKS, SIDES, StepOptions, make_train_step
from vlm2vec_jax.training.trainable import split_for_training
from vlm2vec_jax.training.throughput import matmul_flops, measured_matmul_peak

from torch_peer import TorchPeft, adapter_arrays  # benchmarks/torch_peer.py (this folder is sys.path[0])

INSTRUCTION = "Represent the given image with the following question: what is shown in the picture, and how many objects are there? "
CAPTION = "A photo of a dog running on the green grass in the park. A red car is parked next to a small white house on the street. "


# ------------------------------------------------------------------------------------------- data
def build_checkpoint(directory: str, args: argparse.Namespace) -> None:
    pixels = args.image_size * args.image_size
    build_tiny_checkpoint(
        directory, text_hidden=args.text_hidden, text_layers=args.text_layers, heads=args.heads, kv_heads=args.kv_heads,
        intermediate=args.intermediate, vision_dim=args.vision_dim, vision_depth=args.vision_depth,
        vision_heads=args.vision_heads, min_pixels=pixels, max_pixels=pixels,
    )


def _clip(text: TextProcessor, sentence: str, tokens: int, offset: int) -> str:
    words = (sentence * 20).split(" ")
    ids = text.tokenizer(" ".join(words[offset % 7 :]), add_special_tokens=False)["input_ids"][:tokens]
    return text.tokenizer.decode(ids)


def _bucket(n: int) -> int:
    return -(-n // 16) * 16


def build_batch(directory: str, args: argparse.Namespace, queries: int) -> tuple[dict, dict]:
    """(our batch in the pipeline's layout, the same batch as transformers' tensors per side)."""
    text = TextProcessor.from_pretrained_dir(directory)
    image_config = ImageProcessorConfig.from_pretrained_dir(directory)
    images = [process_image(tiny_image(args.image_size, args.image_size, seed=i), image_config) for i in range(queries)]
    query_ids = [text.encode(f"{text.image_token}\n" + _clip(text, INSTRUCTION, args.query_text_tokens, i), [im.num_tokens]) for i, im in enumerate(images)]
    target_ids = [text.encode(_clip(text, CAPTION, args.target_text_tokens, i)) for i in range(queries)]
    patches = images[0].patches.shape[0]

    def batcher(ids: list[np.ndarray]) -> Batcher:
        spec = BucketSpec((_bucket(max(map(len, ids))),), (patches,), (queries,), batch_size=queries)
        return Batcher.from_text_processor(text, spec, aligned=True)

    batch = {
        "query": batcher(query_ids)([Example(ids, (im,), "hf5") for ids, im in zip(query_ids, images)]),
        "target": batcher(target_ids)([Example(ids, (), "hf5") for ids in target_ids]),
        "valid": np.ones(queries, bool),
        "target_valid": np.ones(queries, bool),
        "target_key": np.arange(queries, dtype=np.int32),
    }

    def torch_side(inputs: dict, side_images: list) -> dict:
        ids = torch.tensor(inputs["input_ids"], dtype=torch.long)
        out = dict(input_ids=ids, attention_mask=torch.tensor(inputs["attention_mask"], dtype=torch.long),
                   mm_token_type_ids=(ids == text.image_token_id).long())
        if side_images:  # the image processor's layout: every image's patches, flattened
            out["pixel_values"] = torch.from_numpy(np.concatenate([im.patches for im in side_images]))
            out["image_grid_thw"] = torch.tensor([im.grid_thw for im in side_images], dtype=torch.long)
        return out

    return batch, {"query": torch_side(batch["query"], images), "target": torch_side(batch["target"], [])}


def abstract_batch(batch: dict, mesh: jax.sharding.Mesh, queries: int) -> dict:
    """ShapeDtypeStructs of `batch` scaled to `queries` rows (for compile-only memory analysis)."""
    rows = batch["valid"].shape[0]

    def scale(key: str, x: np.ndarray) -> jax.ShapeDtypeStruct:
        shape = list(x.shape)
        shape[row_axis(key)] = shape[row_axis(key)] * queries // rows
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=batch_sharding(mesh, key, x.ndim))

    out = {side: {k: scale(k, v) for k, v in batch[side].items()} for side in SIDES}
    return {**out, **{m: scale(m, batch[m]) for m in MASKS}}


# ---------------------------------------------------------------------------------------- ours
class Ours:
    def __init__(self, directory: str, args: argparse.Namespace):
        self.args = args
        model = load_pretrained(directory, dtype="float32")
        self.image_config = ImageProcessorConfig.from_pretrained_dir(directory)
        self.lora = LoRAConfig(args.rank, args.alpha, args.dropout, HF_TARGETS, use_dora=not args.no_dora)
        apply_lora(model, self.lora, nnx.Rngs(args.seed + 1))
        self.graphdef, params, frozen = split_for_training(model, "lora", freeze_vision=True)
        # On the host: every fresh state gets its own buffers (the step donates the state).
        self.params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        self.mesh = make_mesh(-1, 1, 1)
        self.schedule = optax.constant_schedule(args.learning_rate)
        self.optimizer = make_optimizer(self.schedule, weight_decay=0.0, clip_norm=args.clip_norm, b1=0.9, b2=0.999, eps=1e-8)
        self.abstract = abstract_train_state(self.params, self.optimizer, self.mesh)
        self.frozen_shardings = param_shardings(frozen, self.mesh)
        self.frozen = place(frozen, self.frozen_shardings)
        self.key = jax.random.key(args.seed)

    def fresh_state(self):
        placed = place(self.params, jax.tree.map(lambda a: a.sharding, self.abstract.params))
        return init_train_state(placed, self.optimizer, self.abstract)

    def step_fn(self, chunk: int, batch_example: dict, dropout: bool = True):
        return make_train_step(
            make_embed_factory(self.graphdef, dropout=dropout and self.args.dropout > 0, image_config=self.image_config),
            self.optimizer, self.schedule,
            StepOptions(self.args.temperature, chunk), self.mesh, self.abstract, self.frozen_shardings, batch_example,
        )

    def compile(self, chunk: int, batch: dict, dropout: bool = True):
        """(compiled step, compile seconds, jaxpr matmul FLOPs)."""
        step = self.step_fn(chunk, batch, dropout)
        start = time.perf_counter()
        traced = step.trace(self.abstract, self.frozen, batch, self.key)
        compiled = traced.lower().compile()
        seconds = time.perf_counter() - start
        return compiled, seconds, matmul_flops(traced.jaxpr.jaxpr)

    def adapters(self) -> dict[str, dict[str, np.ndarray]]:
        """{hf target: {a, b, magnitude}} stacked over layers, from the initial parameters."""
        return adapter_arrays(self.params)


# ---------------------------------------------------------------------------------------- main
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def describe_memory(m: Any) -> dict[str, int]:
    return dict(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
                output=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--text-hidden", type=int, default=512)
    g.add_argument("--text-layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=1536)
    g.add_argument("--vision-dim", type=int, default=256)
    g.add_argument("--vision-depth", type=int, default=4)
    g.add_argument("--vision-heads", type=int, default=4)
    g = parser.add_argument_group("data")
    g.add_argument("--batch-size", type=int, default=16, help="global queries per step (one CPU device: = per-device batch)")
    g.add_argument("--image-size", type=int, default=112, help="square query images (multiple of 28)")
    g.add_argument("--query-text-tokens", type=int, default=40)
    g.add_argument("--target-text-tokens", type=int, default=24)
    g = parser.add_argument_group("training")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=64.0)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--no-dora", action="store_true", help="plain LoRA instead of DoRA")
    g.add_argument("--temperature", type=float, default=0.02)
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--clip-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--chunks", type=int, default=8, help="chunked variant: gc_chunk_size = batch / chunks")
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--memory-chunk", type=int, default=8)
    g.add_argument("--memory-batches", default="64,128,256,512", help="comma-separated global batches; empty = skip")
    g.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()
    if args.batch_size % args.chunks:
        parser.error(f"--chunks {args.chunks} must divide --batch-size {args.batch_size}")
    run_start = time.perf_counter()
    results: dict[str, Any] = {"config": vars(args), "devices": jax.device_count(), "torch_threads": torch.get_num_threads()}
    b = args.batch_size
    variants = {"no cache (chunk 0)": 0, f"one chunk (chunk {b})": b, f"{args.chunks} chunks (chunk {b // args.chunks})": b // args.chunks}

    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(directory, args)
        batch, torch_batch = build_batch(directory, args, b)
        ours = Ours(directory, args)
        jax_batch = device_batch(batch, ours.mesh)
        shapes = {s: {k: list(v.shape) for k, v in batch[s].items()} for s in SIDES}
        results["batch_shapes"] = shapes
        print(f"batch: query input_ids {shapes['query']['input_ids']}, pixel_values {shapes['query']['pixel_values']}; "
              f"target input_ids {shapes['target']['input_ids']}", flush=True)

        # ---- apples to apples: identical weights, dropout off, two steps each
        if not args.skip_torch:
            peer = TorchPeft(directory, args, ours.adapters())
            check, seconds, _ = ours.compile(0, jax_batch, dropout=False)
            state = ours.fresh_state()
            ours_losses = []
            for _ in range(2):
                state, metrics = check(state, ours.frozen, jax_batch, ours.key)
                ours_losses.append(float(metrics["loss"]))
            torch_losses = [peer.step(torch_batch, train=False) for _ in range(2)]
            del check, state
            results["loss_check"] = {"ours": ours_losses, "torch": torch_losses,
                                     "max_abs_diff": max(abs(a - c) for a, c in zip(ours_losses, torch_losses))}
            n_ours = sum(x.size for x in jax.tree.leaves(ours.params))
            print(f"trainable adapter values: ours {n_ours}, PEFT {peer.trainable}")
            print(f"loss, dropout off, same weights: step 1 ours {ours_losses[0]:.6f} torch {torch_losses[0]:.6f}; "
                  f"step 2 ours {ours_losses[1]:.6f} torch {torch_losses[1]:.6f}", flush=True)

        # ---- compile the timed variants (dropout on)
        compiled, flops = {}, {}
        for name, chunk in variants.items():
            compiled[name], seconds, flops[name] = ours.compile(chunk, jax_batch)
            print(f"compiled {name} in {seconds:.1f} s", flush=True)
            results.setdefault("compile_s", {})[name] = seconds
        state = ours.fresh_state()

        def run(name: str):
            nonlocal state
            state, metrics = compiled[name](state, ours.frozen, jax_batch, ours.key)
            jax.block_until_ready(metrics)

        for name in variants:  # warm-up
            run(name)
        if not args.skip_torch:
            for _ in range(2):
                peer.step(torch_batch)
        timings: dict[str, list[float]] = {name: [] for name in variants}
        if not args.skip_torch:
            timings["torch + PEFT"] = []
        for _ in range(args.repeats):  # interleaved: drifting load hits every variant alike
            for name in variants:
                timings[name].append(timed(lambda: run(name)))
            if not args.skip_torch:
                timings["torch + PEFT"].append(timed(lambda: peer.step(torch_batch)))
        med = {k: statistics.median(v) for k, v in timings.items()}
        results["step_s"] = med
        results["step_s_all"] = timings

        # ---- FLOPs / MFU
        peak = measured_matmul_peak()
        results["peak_flops"] = peak
        results["flops"] = flops
        del compiled, state

        # ---- memory at a fixed chunk over growing batches (compile only)
        memory = {}
        for size in [int(s) for s in args.memory_batches.split(",") if s.strip()]:
            example = abstract_batch(batch, ours.mesh, size)
            step = ours.step_fn(args.memory_chunk, example)
            start = time.perf_counter()
            c = step.lower(ours.abstract, ours.frozen, example, ours.key).compile()
            inputs = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(example))
            memory[size] = {**describe_memory(c.memory_analysis()), "batch_inputs": int(inputs)}
            print(f"compiled batch {size} (chunk {args.memory_chunk}) in {time.perf_counter() - start:.1f} s", flush=True)
            del c
        results["memory"] = memory

    results["runtime_s"] = time.perf_counter() - run_start
    report(results, variants, args)


def report(results: dict, variants: dict, args: argparse.Namespace) -> None:
    med, flops, peak = results["step_s"], results["flops"], results["peak_flops"]
    b = args.batch_size
    names = list(variants)
    model_flops = flops[names[0]]  # the no-cache step's: GradCache's second forward is recomputation
    results["mfu"] = {n: model_flops / t / peak for n, t in med.items()}
    results["hfu"] = {n: flops.get(n, model_flops) / t / peak for n, t in med.items()}
    print()
    print(f"small Qwen2-VL (text {args.text_hidden} x {args.text_layers}, vision {args.vision_dim} x {args.vision_depth}), "
          f"batch {b} queries ({args.image_size}x{args.image_size} image + ~{args.query_text_tokens} tokens) + {b} text targets, "
          f"{'DoRA' if not args.no_dora else 'LoRA'} r={args.rank}, float32, {results['devices']} device(s), "
          f"torch threads {results['torch_threads']}, median of {args.repeats}")
    if "loss_check" in results:
        lc = results["loss_check"]
        print(f"loss check (dropout off, same weights, 2 steps): ours {[round(x, 6) for x in lc['ours']]} "
              f"torch {[round(x, 6) for x in lc['torch']]} max |diff| {lc['max_abs_diff']:.1e}")
    print(f"{'step':24} {'seconds':>8} {'queries/s':>9} {'GFLOP':>7} {'MFU':>6} {'HFU':>6}")
    for n in med:
        print(f"{n:24} {med[n]:8.3f} {b / med[n]:9.1f} {flops.get(n, model_flops) / 1e9:7.1f} "
              f"{results['mfu'][n]:6.1%} {results['hfu'][n]:6.1%}")
    print(f"  GFLOP: matmul FLOPs executed, counted on the step's jaxpr (torch: same math as our no-cache step). MFU: no-cache FLOPs / time / peak; HFU: executed FLOPs / time / peak; "
          f"peak: measured float32 matmul {peak / 1e9:.1f} GFLOP/s")
    gc_ratio = med[names[2]] / med[names[1]]
    cache_ratio = med[names[1]] / med[names[0]]
    results["gradcache_ratio"], results["one_chunk_over_no_cache"] = gc_ratio, cache_ratio
    print(f"GradCache: {names[2]} / {names[1]} = {gc_ratio:.2f}x (goal <= 1.4x); one chunk / no cache = {cache_ratio:.2f}x")
    if "torch + PEFT" in med:
        speedup = med["torch + PEFT"] / med[names[0]]
        results["speedup_vs_torch"] = speedup
        print(f"speed-up over torch + PEFT (both without GradCache): {speedup:.2f}x (goal >= 1.5x)")
    memory = results["memory"]
    if memory:
        first = min(memory)
        base = memory[first]
        mib = 2.0**20
        print(f"memory of the step at chunk {args.memory_chunk}, MiB, growth vs batch {first} (goal <= +10%, judged on temp):")
        print(f"{'batch':>6} {'temp':>8} {'growth':>7} {'batch in':>9} {'argument':>9} {'output':>7} {'temp+arg+out':>12} {'growth':>7}")
        for size, m in memory.items():
            total, base_total = (x["temp"] + x["argument"] + x["output"] for x in (m, base))
            m["growth_temp"], m["growth_total"] = m["temp"] / base["temp"] - 1, total / base_total - 1
            print(f"{size:6d} {m['temp'] / mib:8.1f} {m['growth_temp']:+7.1%} {m['batch_inputs'] / mib:9.1f} "
                  f"{m['argument'] / mib:9.1f} {m['output'] / mib:7.1f} {total / mib:12.1f} {m['growth_total']:+7.1%}")
        print("  batch in: the batch's own bytes, an argument of the step (chunks are read from it in place).")
    print(f"runtime: {results['runtime_s']:.0f} s")
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    sys.exit(main())
