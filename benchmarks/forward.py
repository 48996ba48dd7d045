"""Embeddings per second: vlm2vec_jax's Embedder against transformers' PyTorch model of the same
backbone (Qwen2-VL, Qwen2.5-VL or Qwen3-VL: `--backbone`), same CPU.

The "small" geometry of the foundation issue (text 512 x 8 layers, 8 heads / 2 kv; vision 256 x 4;
224x224 images, ~64 text tokens, batch 8) with the backbone's other choices, random weights
written by transformers, so both sides load the very same checkpoint. Two comparisons, runs interleaved, medians reported:
- pipeline: items in, unit vectors out (PyTorch: tokenizer + Qwen2VLImageProcessorPil + forward
  under torch.inference_mode, batch by batch, as a user would write it; ours: Embedder.encode);
- model: the forward pass alone on identical preprocessed batches.

    python benchmarks/forward.py [--backbone qwen2_vl] [--batches 4] [--repeats 5] [--dtype float32]
"""

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from vlm2vec_jax import Embedder
from vlm2vec_jax.models.backbones import BACKBONES
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint, tiny_image

TEXT = "Represent the given image with the following question: what is shown in the picture, and how many objects are there? "


def build_small_checkpoint(directory: str, model_type: str) -> None:
    build_tiny_checkpoint(
        directory, text_hidden=512, text_layers=8, heads=8, kv_heads=2, intermediate=1536,
        vision_dim=256, vision_depth=4, vision_heads=4, min_pixels=224 * 224, max_pixels=224 * 224, model_type=model_type,
    )


def make_items(count: int, text_tokens: int, tokenizer) -> list[dict]:
    words = (TEXT * 20).split(" ")
    items = []
    for i in range(count):
        text = "<|image_pad|>\n" + " ".join(words[i % 7 :])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: text_tokens + 1]
        items.append({"image": tiny_image(224, 224, seed=i), "text": tokenizer.decode(ids)})
    return items


class TorchPipeline:
    """What a transformers user writes: processor, tokenizer, forward, last-token pooling."""

    def __init__(self, directory: str):
        import json
        from pathlib import Path

        import transformers
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        architecture = json.loads((Path(directory) / "config.json").read_text())["architectures"][0]
        self.model = getattr(transformers, architecture).from_pretrained(directory).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.tokenizer.padding_side = "left"  # last position = last token
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        self.image_id = self.model.config.image_token_id

    def preprocess(self, items: list[dict]) -> dict:
        vision = self.processor(images=[it["image"] for it in items], return_tensors="pt")
        n_tokens = int(vision["image_grid_thw"][0].prod()) // 4
        texts = [it["text"].replace("<|image_pad|>", "<|image_pad|>" * n_tokens) for it in items]
        text = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return dict(**text, **vision, mm_token_type_ids=(text["input_ids"] == self.image_id).long())

    def forward(self, inputs: dict) -> np.ndarray:
        with torch.inference_mode():
            hidden = self.model.model(**inputs).last_hidden_state[:, -1]
            return torch.nn.functional.normalize(hidden.float(), dim=-1).numpy()

    def encode(self, items: list[dict], batch_size: int) -> np.ndarray:
        return np.concatenate([self.forward(self.preprocess(items[i : i + batch_size])) for i in range(0, len(items), batch_size)])


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="batches of 8 per timed run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backbone", default="qwen2_vl", choices=sorted(BACKBONES), help="the model_type to build")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as directory:
        build_small_checkpoint(directory, args.backbone)
        peer = TorchPipeline(directory)
        ours = Embedder.from_pretrained(directory, dtype=args.dtype)
        items = make_items(args.batches * args.batch_size, args.text_tokens, peer.tokenizer)
        n = len(items)

        start = time.perf_counter()
        ours_vectors = ours.encode(items, batch_size=args.batch_size)  # compiles
        compile_s = time.perf_counter() - start
        peer_vectors = peer.encode(items, args.batch_size)
        agreement = float(np.min(np.sum(ours_vectors * peer_vectors, axis=1)))

        # model only: identical preprocessed batch, both sides
        batch_items = items[: args.batch_size]
        torch_inputs = peer.preprocess(batch_items)
        ((_, jax_batch),) = ours.batches(batch_items, args.batch_size)
        jax_forward = lambda: ours.embed_batch(jax_batch).block_until_ready()  # noqa: E731
        jax_forward()

        timings = {"ours pipeline": [], "torch pipeline": [], "ours model": [], "torch model": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
            timings["ours pipeline"].append(median_time(lambda: ours.encode(items, batch_size=args.batch_size), 1))
            timings["torch pipeline"].append(median_time(lambda: peer.encode(items, args.batch_size), 1))
            timings["ours model"].append(median_time(jax_forward, 1))
            timings["torch model"].append(median_time(lambda: peer.forward(torch_inputs), 1))
        med = {k: statistics.median(v) for k, v in timings.items()}

    print(f"small {args.backbone}, {n} items (224x224 image + {args.text_tokens} text tokens), batch {args.batch_size}, "
          f"dtype {args.dtype}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"first encode (incl. compile): {compile_s:.1f} s; min cosine ours vs torch: {agreement:.6f}")
    print(f"{'':18} {'seconds':>9} {'items/s':>9}")
    for name in ("ours pipeline", "torch pipeline"):
        print(f"{name:18} {med[name]:9.3f} {n / med[name]:9.1f}")
    for name in ("ours model", "torch model"):
        print(f"{name:18} {med[name]:9.3f} {args.batch_size / med[name]:9.1f}")
    print(f"speed-up pipeline: {med['torch pipeline'] / med['ours pipeline']:.2f}x   "
          f"model forward: {med['torch model'] / med['ours model']:.2f}x")


if __name__ == "__main__":
    main()
