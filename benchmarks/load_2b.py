"""Load time and peak memory of `load_pretrained` at the real Qwen2-VL-2B geometry, and one encode.

    .venv/bin/python benchmarks/load_2b.py [--keep DIR] [--shard-bytes N] [--no-encode] [--encode-direct]

Writes a random-weight bfloat16 checkpoint with the 2B geometry, hub layout and hub-sized shards
(`vlm2vec_jax.testing.random_checkpoint`, no torch, never the whole model in memory), the real Qwen
tokenizer and the hub's preprocessor_config.json, into a temporary directory under /tmp (removed at
the end) or into `--keep DIR` (kept, and reused by later runs). Then, each in a fresh interpreter
so its peak RSS is its own:

- write: the checkpoint (skipped when `--keep DIR` already holds one) and the tokenizer check
  (`AutoTokenizer` loads it, `<|image_pad|>` is 151655, pad is `<|endoftext|>`).
- load: `load_pretrained(dir, dtype="bfloat16")`; seconds, parameter bytes, peak RSS
  (`ru_maxrss`) minus the baseline (the same interpreter with jax, flax and the loader imported and
  the CPU backend up, measured just before loading), and the ratio to the parameter bytes (goal:
  below 1.5). A sampler thread also records the peak anonymous and file-backed RSS (memory-mapped
  checkpoint pages count in RSS too).
- encode: `Embedder.from_pretrained(dir, dtype="bfloat16").encode([...], batch_size=1)` on one
  224x224 image (grid [1, 16, 16], 64 merged tokens) with an instruction; first call (with
  compilation) and a second call.
  With `--encode-direct` the model runs directly on a hand-built batch instead.

Linux carries `ru_maxrss` over fork and exec, so a child would inherit its parent's peak: this
parent process therefore imports nothing heavy and does all work in children; VmHWM (reset by exec)
is reported as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 1024**3
TEXT = "<|image_pad|> Represent the given image for classification."


# ------------------------------------------------------------------------------ child processes
def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                name, value, _ = line.split()
                out[name[:-1]] = int(value) * 1024
    return out


class _Sampler:
    """Peak RssAnon / RssFile, sampled every 20 ms (ru_maxrss only gives their peak sum)."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            status = _status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], status.get(key, 0))
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _backend_up() -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx  # noqa: F401

    import vlm2vec_jax.models.hf_import  # noqa: F401

    jnp.zeros(8).block_until_ready()
    return {"baseline_rss": _maxrss_bytes(), "baseline_status": _status(), "device": str(jax.devices()[0])}


def child_load(directory: str) -> dict:
    result = _backend_up()
    import jax
    from flax import nnx

    from vlm2vec_jax.models.hf_import import load_pretrained

    with _Sampler() as sampler:
        start = time.perf_counter()
        model = load_pretrained(directory, dtype="bfloat16")
        params = nnx.state(model, nnx.Param)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
    leaves = jax.tree.leaves(params)
    result.update(
        load_seconds=seconds,
        param_bytes=sum(x.nbytes for x in leaves),
        param_dtypes=sorted({str(x.dtype) for x in leaves}),
        peak_rss=_maxrss_bytes(),
        peak_sampled=sampler.peak,
        final_status=_status(),
    )
    return result


def _image():
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def child_encode(directory: str, batch_size: str = "1", direct: str = "0") -> dict:
    result = _backend_up()
    try:
        from vlm2vec_jax.embedder import Embedder
    except ImportError:
        Embedder = None
    if direct == "1" or Embedder is None or not hasattr(Embedder, "from_pretrained"):
        return {**result, **_encode_direct(directory)}
    import numpy as np

    start = time.perf_counter()
    embedder = Embedder.from_pretrained(directory, dtype="bfloat16")
    load = time.perf_counter() - start
    item = {"image": _image(), "text": TEXT}
    times, vectors = [], []
    for _ in range(2):
        start = time.perf_counter()
        vectors.append(embedder.encode([item], batch_size=int(batch_size)))
        times.append(time.perf_counter() - start)
    v = vectors[-1]
    assert v.shape == (1, 1536) and np.isfinite(v).all(), v
    result.update(
        path=f"Embedder.encode(batch_size={batch_size})", load_seconds=load, first_seconds=times[0], second_seconds=times[1],
        norm=float(np.linalg.norm(v)), same_twice=bool(np.array_equal(vectors[0], vectors[1])), peak_rss=_maxrss_bytes(),
    )
    return result


def _encode_direct(directory: str) -> dict:
    """One image + text through the model with a hand-built batch (layout of tests/hf_reference.py)."""
    import jax
    import numpy as np
    from flax import nnx
    from transformers import AutoTokenizer

    from vlm2vec_jax.models.hf_import import load_pretrained

    start = time.perf_counter()
    model = load_pretrained(directory, dtype="bfloat16")
    load = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(directory)
    grid_h = grid_w = 16  # 224 / 14
    merged = grid_h * grid_w // 4
    text_ids = tokenizer(TEXT.replace("<|image_pad|>", ""), add_special_tokens=False)["input_ids"]
    ids = np.array([[model.config.image_token_id] * merged + text_ids], np.int32)
    length = ids.shape[1]
    # Block-major patch order: 2x2 merge blocks, row-major inside a block.
    rows, cols = np.meshgrid(np.arange(grid_h // 2), np.arange(grid_w // 2), indexing="ij")
    di, dj = np.meshgrid(np.arange(2), np.arange(2), indexing="ij")
    patch_rows = (2 * rows[..., None, None] + di).reshape(-1)
    patch_cols = (2 * cols[..., None, None] + dj).reshape(-1)
    positions = np.zeros((3, 1, length), np.int32)
    positions[1, 0, :merged], positions[2, 0, :merged] = rows.reshape(-1), cols.reshape(-1)
    positions[:, 0, merged:] = max(grid_h, grid_w) // 2 + np.arange(len(text_ids))
    index = np.full((1, length), -1, np.int32)
    index[0, :merged] = np.arange(merged)
    batch = dict(
        input_ids=ids, attention_mask=np.ones_like(ids), position_ids=positions, image_token_index=index,
        pixel_values=np.random.default_rng(0).standard_normal((1, grid_h * grid_w, 1176), dtype=np.float32),
        patch_positions=np.stack([patch_rows, patch_cols], -1)[None].astype(np.int32),
        patch_segment_ids=np.ones((1, grid_h * grid_w), np.int32),
    )
    # Parameters are arguments, not closed-over constants (XLA would fold them into the program).
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, b: nnx.merge(graphdef, state)(b))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        v = np.asarray(forward(state, batch))
        times.append(time.perf_counter() - start)
    return dict(path="model (hand-built batch)", load_seconds=load, first_seconds=times[0], second_seconds=times[1],
                norm=float(np.linalg.norm(v.astype(np.float32))), peak_rss=_maxrss_bytes())


def child_write(directory: str, shard_bytes: str) -> dict:
    from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config
    from vlm2vec_jax.testing.random_checkpoint import write_random_checkpoint

    directory = Path(directory)
    result = {"write_seconds": None}
    if _has_checkpoint(directory):
        print(f"reusing the checkpoint in {directory}", file=sys.stderr)
    else:
        print(f"writing a random Qwen2-VL-2B checkpoint (bfloat16) to {directory} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        write_random_checkpoint(qwen2vl_2b_config(), directory, dtype="bfloat16", shard_bytes=int(shard_bytes), processor_files=True)
        result["write_seconds"] = time.perf_counter() - start
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    result.update(
        tokenizer_class=type(tokenizer).__name__,
        image_pad=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        pad=[tokenizer.pad_token, tokenizer.pad_token_id],
        sample_ids=tokenizer("Represent the given image.", add_special_tokens=False)["input_ids"],
    )
    assert result["image_pad"] == 151655, result
    assert result["pad"] == ["<|endoftext|>", 151643], result
    return result


def _run_child(mode: str, *args: object) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, *map(str, args)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def _has_checkpoint(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="write (or reuse) the checkpoint here and keep it")
    parser.add_argument("--shard-bytes", type=int, default=4_000_000_000, help="max bytes per safetensors shard")
    parser.add_argument("--no-encode", action="store_true", help="skip the encode measurement")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument(
        "--encode-batch-size", type=int, default=1,
        help="Embedder.encode batch_size for the one item (batches are padded to this many rows)",
    )
    parser.add_argument("--encode-direct", action="store_true", help="run the model on a hand-built batch, not Embedder")
    parser.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        print(json.dumps({"write": child_write, "load": child_load, "encode": child_encode}[mode](*rest)))
        return

    directory = args.keep or Path(tempfile.mkdtemp(prefix="qwen2vl_2b_random_", dir="/tmp"))
    try:
        written = _run_child("write", directory, args.shard_bytes)
        write_seconds, image_pad = written["write_seconds"], written["image_pad"]
        files = sorted(directory.glob("*.safetensors"))
        disk = sum(f.stat().st_size for f in files)
        load = _run_child("load", directory)
        encode = None if args.no_encode else _run_child("encode", directory, args.encode_batch_size, int(args.encode_direct))
    finally:
        if args.keep is None:
            shutil.rmtree(directory, ignore_errors=True)

    param, base, peak = load["param_bytes"], load["baseline_rss"], load["peak_rss"]
    hwm = load["final_status"]["VmHWM"]
    rows = [
        ("checkpoint", f"{len(files)} shard(s), {disk / GIB:.2f} GiB on disk" + (f", written in {write_seconds:.1f} s" if write_seconds else "")),
        ("tokenizer", f"{written['tokenizer_class']}, real Qwen vocabulary, <|image_pad|> = {image_pad}"),
        ("load_pretrained (bf16)", f"{load['load_seconds']:.1f} s"),
        ("parameter bytes", f"{param / GIB:.3f} GiB ({', '.join(load['param_dtypes'])})"),
        ("baseline RSS (jax up)", f"{base / GIB:.3f} GiB"),
        ("peak RSS (ru_maxrss)", f"{peak / GIB:.3f} GiB  (VmHWM {hwm / GIB:.3f} GiB)"),
        ("peak RSS - baseline", f"{(peak - base) / GIB:.3f} GiB"),
        ("ratio (peak - baseline) / params", f"{(peak - base) / param:.2f}x  (goal < 1.5x; {peak / param:.2f}x without subtracting)"),
        ("sampled peak anon / file RSS", f"{load['peak_sampled']['RssAnon'] / GIB:.2f} / {load['peak_sampled']['RssFile'] / GIB:.2f} GiB"),
        ("RSS after load (anon / file)", f"{load['final_status']['RssAnon'] / GIB:.2f} / {load['final_status']['RssFile'] / GIB:.2f} GiB"),
    ]
    if encode is not None:
        rows += [
            ("encode path", encode["path"]),
            ("  its load (own process)", f"{encode['load_seconds']:.1f} s"),
            ("  1 image 224x224 + text, 1st call", f"{encode['first_seconds']:.2f} s (incl. compilation)"),
            ("  same item, 2nd call", f"{encode['second_seconds']:.2f} s"),
            ("  peak RSS of that process", f"{encode['peak_rss'] / GIB:.2f} GiB"),
        ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps({"write": written, "load": load, "encode": encode}, indent=2))

if __name__ == "__main__":
    main()
