"""The PyTorch peers of our benchmarks: transformers' Qwen2-VL + PEFT as a VLM2Vec user runs it.

- `TorchPeft`: transformers' Qwen2VLForConditionalGeneration with PEFT LoRA/DoRA on the language
  model's projections, adapters copied from ours (identical weights at step 0), torch AdamW +
  `clip_grad_norm_`; `step` without GradCache, `gradcache_step` with it, the originals' way
  (pass 1: no-grad forwards of every chunk, RNG state kept; loss and its gradient w.r.t. the
  representations; pass 2: each chunk re-forwarded with grad under the same RNG state and
  back-propagated with its cached representation gradient).
- `torch_side` / `torch_gradcache_batch`: a padded training record's sequences as the tensors of
  VLM2Vec's collator (per-batch dynamic padding: the longest real sequence of the batch, right
  padding; the images' normalised patches concatenated with `image_grid_thw`), in GradCache chunks.
- `TorchEncoder`: inference through transformers' image processor, tokenizer and model (last-token
  pooling, L2 norm).

Used by benchmarks/train_step.py and benchmarks/packing.py (run as scripts: this folder is on
sys.path).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch

from vlm2vec_jax.models.lora import HF_TARGETS
from vlm2vec_jax.processing.image import ImageProcessorConfig, normalize_patches

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def adapter_arrays(params: Any) -> dict[str, dict[str, np.ndarray]]:
    """{hf target: {a, b, magnitude}} stacked over layers, from our LoRA parameters (host copies:
    take them before a step donates the state)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        out.setdefault(names[-2], {})[names[-1]] = np.array(leaf)
    return out


def infonce(q: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, temperature: float,
            keys: torch.Tensor | None = None) -> torch.Tensor:
    """VLM2Vec's loss: cross-entropy of each query over every target, its positive at `labels`;
    with `keys`, copies of a query's positive are no negatives of it (train.mask_duplicate_targets)."""
    logits = q @ t.T / temperature
    if keys is not None:
        duplicate = keys[None, :] == keys[labels][:, None]
        duplicate[torch.arange(len(labels)), labels] = False
        logits = logits.masked_fill(duplicate, torch.finfo(logits.dtype).min)
    return torch.nn.functional.cross_entropy(logits, labels)


class TorchPeft:
    """What a transformers + PEFT user writes for VLM2Vec's step. `args` carries rank, alpha,
    dropout, no_dora, temperature, learning_rate, clip_norm (and optionally weight_decay, b1, b2, eps)."""

    def __init__(self, directory: str, args: Any, adapters: dict):
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen2VLForConditionalGeneration

        base = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
        config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, use_dora=not args.no_dora,
                            target_modules=LM_TARGETS, init_lora_weights=True)
        self.model = get_peft_model(base, config)
        self._load_adapters(adapters)
        self.temperature = args.temperature
        self.clip_norm = args.clip_norm
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(
            trainable, lr=args.learning_rate, betas=(getattr(args, "b1", 0.9), getattr(args, "b2", 0.999)),
            eps=getattr(args, "eps", 1e-8), weight_decay=getattr(args, "weight_decay", 0.0),
        )

    def _load_adapters(self, adapters: dict) -> None:
        """Our initial A, B and DoRA magnitudes into PEFT's modules: identical weights at step 0."""
        copied = 0
        with torch.no_grad():
            for name, module in self.model.named_modules():
                if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                    continue
                target, layer = name.rsplit(".", 1)[-1], int(name.split(".layers.")[1].split(".")[0])
                ours = adapters[target]
                module.lora_A["default"].weight.copy_(torch.from_numpy(ours["a"][layer].T.copy()))
                module.lora_B["default"].weight.copy_(torch.from_numpy(ours["b"][layer].T.copy()))
                if "magnitude" in ours:
                    module.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(ours["magnitude"][layer].copy()))
                copied += 1
        if copied != len(HF_TARGETS) * len(adapters[HF_TARGETS[0]]["a"]):
            raise RuntimeError(f"copied {copied} adapters into PEFT's model; expected one per target and layer")

    def embed(self, inputs: dict) -> torch.Tensor:
        hidden = self.model.base_model.model.model(**inputs, use_cache=False).last_hidden_state
        last = inputs["attention_mask"].sum(dim=1) - 1  # VLM2Vec's pooling for right padding
        return torch.nn.functional.normalize(hidden[torch.arange(hidden.shape[0]), last], dim=-1)

    def step(self, batch: dict, train: bool = True) -> float:
        """One step without GradCache on {"query", "target"} tensors (positive of query i: target
        i * targets / queries)."""
        self.model.train(train)
        q, t = self.embed(batch["query"]), self.embed(batch["target"])
        loss = infonce(q, t, torch.arange(q.shape[0]) * (t.shape[0] // q.shape[0]), self.temperature)
        loss.backward()
        self._update()
        return float(loss.detach())

    def gradcache_step(self, query_chunks: Sequence[dict], target_chunks: Sequence[dict], labels: torch.Tensor,
                       keys: torch.Tensor | None = None, train: bool = True) -> float:
        """One GradCache step (module docstring) over chunks of the batch's queries and targets."""
        self.model.train(train)
        chunks = [*query_chunks, *target_chunks]
        states, reps = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(torch.get_rng_state())  # GradCache's RandContext: pass 2 replays dropout
                reps.append(self.embed(chunk))
        n = len(query_chunks)
        q = torch.cat(reps[:n]).requires_grad_()
        t = torch.cat(reps[n:]).requires_grad_()
        loss = infonce(q, t, labels, self.temperature, keys)
        loss.backward()
        grads = [*q.grad.split([len(r) for r in reps[:n]]), *t.grad.split([len(r) for r in reps[n:]])]
        for chunk, state, grad in zip(chunks, states, grads):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(state)
                self.embed(chunk).backward(grad)
        self._update()
        return float(loss.detach())

    def _update(self) -> None:
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------- padded record -> torch tensors
def torch_side(inputs: dict[str, np.ndarray], rows: Sequence[int], length: int, image_config: ImageProcessorConfig,
               image_token_id: int) -> dict[str, torch.Tensor]:
    """Sequences `rows` of a padded record side (right padding; aligned vision rows: row i holds
    sequence i's image, uint8 patches) as transformers' tensors, padded to `length` tokens."""
    rows = np.asarray(rows)
    ids = torch.from_numpy(inputs["input_ids"][rows, :length].astype(np.int64))
    out = dict(input_ids=ids, attention_mask=torch.from_numpy(inputs["attention_mask"][rows, :length] > 0).long(),
               mm_token_type_ids=(ids == image_token_id).long())
    segments = inputs["patch_segment_ids"]
    patches, grids = [], []
    for row in rows if segments.shape[0] else []:
        where = np.flatnonzero(segments[row] > 0)
        if len(where):
            position = inputs["patch_positions"][row, where]
            grids.append((1, int(position[:, 0].max()) + 1, int(position[:, 1].max()) + 1))
            patches.append(inputs["pixel_values"][row, where])
    if patches:  # the image processor's layout: every image's float patches, flattened
        out["pixel_values"] = torch.from_numpy(normalize_patches(np.concatenate(patches), image_config))
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return out


def torch_gradcache_batch(record: dict[str, Any], chunk_size: int, image_config: ImageProcessorConfig,
                          image_token_id: int, mask_duplicates: bool = False) -> dict[str, Any]:
    """A padded training record as VLM2Vec's collator + GradCache see it: per side, the valid
    sequences padded to the side's longest, split into chunks of `chunk_size` rows (0: one chunk);
    the labels (each query's positive among the kept targets) and the targets' content keys."""
    out: dict[str, Any] = {}
    kept = {}
    for side, valid in (("query", record["valid"]), ("target", record["target_valid"])):
        inputs = record[side]
        rows = np.flatnonzero(valid)
        kept[side] = rows
        length = int(inputs["attention_mask"][rows].astype(bool).sum(axis=1).max())
        size = chunk_size or len(rows)
        out[side] = [torch_side(inputs, rows[i : i + size], length, image_config, image_token_id)
                     for i in range(0, len(rows), size)]
    per_query = len(record["target_valid"]) // len(record["valid"])
    position = {int(r): k for k, r in enumerate(kept["target"])}
    out["labels"] = torch.tensor([position[int(i) * per_query] for i in kept["query"]], dtype=torch.long)
    out["keys"] = torch.from_numpy(record["target_key"][kept["target"]].astype(np.int64)) if mask_duplicates else None
    return out


# ------------------------------------------------------------------------------------ inference
class TorchEncoder:
    """transformers' inference as a VLM2Vec user writes it: the image processor and tokenizer on
    each batch (each image placeholder expanded to its image's tokens, as Qwen2VLProcessor does;
    per-batch dynamic padding, right side), the model without its LM head, last-token pooling, L2."""

    def __init__(self, directory: str, *, min_pixels: int | None = None, max_pixels: int | None = None):
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        model = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
        self.model = model.model.eval()
        pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        # Not Qwen2VLProcessor: building it loads a video processor, which needs torchvision.
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory, **pixels)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.tokenizer.padding_side = "right"
        self.image_token_id = model.config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def inputs(self, texts: Sequence[str], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """One batch's model inputs, Qwen2VLProcessor's way."""
        out: dict[str, torch.Tensor] = {}
        if images:
            out.update(self.image_processor(images=list(images), return_tensors="pt"))
            merge = self.image_processor.merge_size**2
            counts = iter([int(g.prod()) // merge for g in out["image_grid_thw"]])
            texts = [re.sub(re.escape(self.image_token), lambda _: self.image_token * next(counts), t) for t in texts]
        text = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        ids = text["input_ids"]
        return {**out, "input_ids": ids, "attention_mask": text["attention_mask"],
                "mm_token_type_ids": (ids == self.image_token_id).long()}

    @torch.no_grad()
    def encode(self, items: Sequence[dict], batch_size: int, length: Callable[[dict], int] | None = None) -> np.ndarray:
        """(N, D) unit vectors of `items` ({"text", optional "image" path}), in the order given;
        with `length` (an item's estimated tokens) batches are formed longest first."""
        from PIL import Image

        order = sorted(range(len(items)), key=lambda i: -length(items[i])) if length else list(range(len(items)))
        out = np.empty((len(items), self.model.config.text_config.hidden_size), np.float32)
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            images = [Image.open(items[i]["image"]).convert("RGB") for i in rows if items[i].get("image")]
            inputs = self.inputs([items[i]["text"] for i in rows], images)
            hidden = self.model(**inputs, use_cache=False).last_hidden_state
            last = inputs["attention_mask"].sum(dim=1) - 1
            out[rows] = torch.nn.functional.normalize(hidden[torch.arange(len(rows)), last], dim=-1).numpy()
        return out
