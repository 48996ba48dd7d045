"""Items encoded per second by the MMEB evaluation path against transformers' PyTorch Qwen2-VL.

Same checkpoint (a random Qwen2-VL written by transformers, so both sides load the very same
weights), same data (every distinct side of the synthetic benchmark's eval datasets), same batch
size, same CPU. Runs are interleaved so drifting machine load hits both sides; medians reported.

- ours: `vlm2vec_jax.evaluation.evaluate` with no cache: dedup, length-bucketed batches prepared
  on host threads while earlier ones run, data-parallel over the local devices, and the scoring;
- peer: what a transformers user writes: `AutoModel` (Qwen2VLModel) under torch.inference_mode,
  the Qwen2-VL PIL image processor and tokenizer, batch by batch in dataset order, left padding,
  last-token pooling, L2 norm. (`AutoProcessor` needs torchvision, absent here; the peer does its
  two steps itself: process the images, expand each `<|image_pad|>` to the image's token count.)

Our first pass compiles and is reported apart; the peer gets a warm-up pass too.

    python benchmarks/eval.py [--model small|tiny] [--scale small|default] [--batch-size 16] [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm2vec_jax import Embedder
from vlm2vec_jax.data.mmeb_eval import read_mmeb_eval
from vlm2vec_jax.data.synthetic import generate
from vlm2vec_jax.evaluation import evaluate
from vlm2vec_jax.evaluation.encoding import side_item
from vlm2vec_jax.evaluation.sides import index_queries
from vlm2vec_jax.processing.text import with_image_placeholder
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint

IMAGE_TOKEN = "<|image_pad|>"
# The "small" geometry of benchmarks/forward.py; the synthetic 84x84 scenes keep their size.
MODELS = {
    "small": dict(text_hidden=512, text_layers=8, heads=8, kv_heads=2, intermediate=1536,
                  vision_dim=256, vision_depth=4, vision_heads=4),
    "tiny": {},
}


class TorchEncoder:
    """transformers' Qwen2-VL as an embedding model: image processor, tokenizer, forward, pooling."""

    def __init__(self, directory: str):
        from transformers import AutoModel, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.model = AutoModel.from_pretrained(directory).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.tokenizer.padding_side = "left"  # the last position is every row's last token
        self.images = Qwen2VLImageProcessorPil.from_pretrained(directory)
        self.image_id = self.model.config.image_token_id

    def embed(self, items: list) -> np.ndarray:
        texts, images = [], []
        for item in items:
            text, path = (item, None) if isinstance(item, str) else (item["text"], item.get("image"))
            texts.append(with_image_placeholder(text, path is not None, IMAGE_TOKEN))
            if path is not None:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
        inputs = {}
        if images:
            vision = self.images(images=images, return_tensors="pt")
            counts = iter((vision["image_grid_thw"].prod(-1) // 4).tolist())
            texts = [_expand(t, counts) for t in texts]
            inputs.update(vision)
        text = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs.update(text, mm_token_type_ids=(text["input_ids"] == self.image_id).long())
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state[:, -1]
            return torch.nn.functional.normalize(hidden.float(), dim=-1).numpy()

    def encode(self, items: list, batch_size: int) -> np.ndarray:
        return np.concatenate([self.embed(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


def _expand(text: str, counts) -> str:
    """Each image placeholder repeated to its image's token count (what Qwen2VLProcessor does)."""
    first, *rest = text.split(IMAGE_TOKEN)
    return first + "".join(IMAGE_TOKEN * next(counts) + part for part in rest)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=sorted(MODELS))
    parser.add_argument("--scale", default="small", choices=["small", "default"], help="synthetic benchmark scale")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_tiny_checkpoint(Path(tmp) / "model", max_pixels=224 * 224, **MODELS[args.model])
        generate(Path(tmp) / "bench", seed=0, scale=args.scale)
        queries = read_mmeb_eval(Path(tmp) / "bench" / "eval")
        items = [side_item(s) for name, rows in queries.items() for s in index_queries(name, rows).table.sides]
        embedder = Embedder.from_pretrained(checkpoint)
        peer = TorchEncoder(str(checkpoint))

        def ours() -> dict:
            return evaluate(embedder, queries, batch_size=args.batch_size, show_progress=False)

        compile_s = timed(ours)
        assert sum(s.num_encoded for s in ours().values()) == len(items)
        ours_vectors = embedder.encode(items, batch_size=args.batch_size)
        peer_vectors = peer.encode(items, args.batch_size)  # also the peer's warm-up
        agreement = float(np.min(np.sum(ours_vectors * peer_vectors, axis=1)))

        timings: dict[str, list[float]] = {"ours (evaluate)": [], "transformers": []}
        for _ in range(args.repeats):
            timings["ours (evaluate)"].append(timed(ours))
            timings["transformers"].append(timed(lambda: peer.encode(items, args.batch_size)))
        med = {name: statistics.median(values) for name, values in timings.items()}

    print(f"{args.model} Qwen2-VL, synthetic '{args.scale}' eval: {len(items)} distinct items in {len(queries)} "
          f"datasets, batch {args.batch_size}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"first evaluate (incl. compile): {compile_s:.1f} s; min cosine ours vs transformers: {agreement:.6f}")
    print(f"{'':18} {'seconds':>9} {'items/s':>9}")
    for name, seconds in med.items():
        print(f"{name:18} {seconds:9.3f} {len(items) / seconds:9.1f}")
    print(f"speed-up: {med['transformers'] / med['ours (evaluate)']:.2f}x")


if __name__ == "__main__":
    main()
