"""Tiny *real* Qwen2-VL checkpoints, built offline in well under two seconds, for tests and benchmarks.

A tiny checkpoint is a directory in exactly the layout of a hub checkpoint (``config.json``,
safetensors weights, ``tokenizer.json`` + ``tokenizer_config.json``, ``preprocessor_config.json``)
so the code under test reads it through the same path as Qwen2-VL-2B, and transformers loads it too,
which is what makes parity tests against the PyTorch model possible.

Choices, and why:
- The tokenizer is a byte-level BPE trained on a small built-in corpus with Qwen2's pre-tokenizer,
  normalizer and decoder, and Qwen2-VL's special tokens appended *after* the learned vocabulary (as
  in Qwen, where they sit at 151643+). A few hundred tokens keep the embedding table small while
  real BPE merges still make token counts differ from character counts.
- ``<|image_N|>`` (MMEB's Phi-3 placeholder) is deliberately not a token: the text processor must
  map it to ``<|image_pad|>`` before tokenizing, and a test would hide a missing mapping otherwise.
- Weights are random but not default-initialised: linear weights have std 1/sqrt(fan_in) and
  embeddings std 1, so activations stay O(1) through every layer (the default std 0.02 makes
  attention nearly uniform and hidden states tiny, which hides bugs in masks and rotary
  embeddings); every norm weight and bias is perturbed randomly, because the default ones/zeros
  make a missing or transposed bias or norm scale invisible.
- ``mrope_section`` follows Qwen2-VL's proportions (1/4 temporal, 3/8 height, 3/8 width of
  head_dim/2, i.e. [16, 24, 24] for head_dim 128) so all three axes carry frequencies.
- ``rms_norm_eps`` is 1e-6 as in the released checkpoints (the class default is 1e-5).
- ``max_pixels`` defaults to 56*56*4 (an image is at most 16 merged tokens) so image tests stay fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# Qwen2-VL's special tokens, in Qwen's id order. `<|image_N|>` is not among them on purpose.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split pattern (transformers' `tokenization_qwen2.PRETOKENIZE_REGEX`).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Small English corpus: MMEB-style instructions plus generic captions and questions, so the
# learned merges cover the words the tests and the synthetic benchmark use.
_CORPUS = """\
Represent the given image for classification.
Represent the given image with the following question:
Represent the given image.
Represent the given news image with the following caption for domain classification.
Represent the given image for binary classification to determine whether it constitutes hateful speech or not.
Identify the object shown in the image.
Find me an everyday image that matches the given caption.
Find an image caption describing the given everyday image.
Retrieve an image of this news caption.
Select the portion of the image that isolates the object of the given label.
Represent the class label: Represent the answer: Represent the image caption:
A photo of a dog running on the green grass in the park.
A red car is parked next to a small white house on the street.
Two people are sitting at a wooden table and eating lunch together.
A large black cat sleeps on the sofa near the window.
What color is the bus in the picture? The bus is yellow.
How many birds are flying over the blue sea? There are three birds.
Is there a person riding a bicycle? Yes, a man rides a bicycle down the road.
The chart shows the number of sales for each month of the year.
What is the title of this document? The title is the annual report.
A blue circle above a red square on a gray background.
A small green triangle to the left of a large yellow star.
The quick brown fox jumps over the lazy dog, and the dog does not move.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
In the morning the children walk to school, and in the evening they play football outside.
The weather today is sunny with a few clouds, and the temperature is about twenty degrees.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 100 2024 3.14 50%.
Punctuation and symbols: (a, b) [c; d] {e: f} "quoted" 'single' - _ + = * / \\ | @ # $ & ! ?
"""

# Qwen2-VL's tokenizer_config.json essentials: no BOS, pad <|endoftext|>, nothing added on encode.
QWEN2_TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
    "model_max_length": 32768,
}

_BPE_VOCAB_SIZE = 640  # incl. the 256 byte tokens; training stops earlier if merges run out
_VOCAB_MULTIPLE = 64  # padded vocab size, as Qwen pads its embedding table (151936 = 64 * 2374)


def build_tiny_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = _BPE_VOCAB_SIZE) -> Path:
    """Train a tiny Qwen2-style byte-level BPE and save it so `AutoTokenizer` loads it; returns
    `out_dir`. `corpus` (lines) replaces the built-in one: a vocabulary learned on the texts a model
    will see keeps their sequences short."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() if corpus is None else corpus, trainer=trainer)
    # Appended after training so they get the highest ids, as in Qwen.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(QWEN2_TOKENIZER_CONFIG, indent=2))
    return out


def mrope_section_for(head_dim: int) -> list[int]:
    """Qwen2-VL's (t, h, w) split of the head_dim/2 rotary frequencies: 1/4, 3/8, 3/8."""
    half = head_dim // 2
    if head_dim % 2 or half < 4:
        raise ValueError(f"head_dim must be even and >= 8 for M-RoPE, got {head_dim}")
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _randomize_(model: object, seed: int) -> None:
    """Overwrite every parameter with seeded values that keep activations O(1) (see module doc)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                new = 0.2 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 1:  # RMSNorm / LayerNorm scales
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                new = torch.randn(p.shape, generator=gen)
            else:  # Linear (out, in) and the patch Conv3d (out, c, t, h, w)
                new = torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(new.to(p.dtype))


def tiny_hf_config(
    tokenizer_dir: str | Path,
    *,
    text_hidden: int,
    text_layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vision_dim: int,
    vision_depth: int,
    vision_heads: int,
    tie_word_embeddings: bool = True,
) -> dict:
    """A Qwen2-VL config.json (as a dict) for the tokenizer in `tokenizer_dir`: its special-token
    ids, and its vocabulary padded to a multiple of 64."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-tokenizer.get_vocab_size() // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    if text_hidden % heads or heads % kv_heads:
        raise ValueError("text_hidden must divide by heads and heads by kv_heads")
    return {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": text_hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": mrope_section_for(text_hidden // heads),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": {
            "depth": vision_depth,
            "embed_dim": vision_dim,
            "hidden_size": text_hidden,  # the merger projects into the text stream
            "num_heads": vision_heads,
            "mlp_ratio": 4,
        },
        # Top level too: transformers' Qwen2VLConfig otherwise fills in the real Qwen vocabulary's ids.
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
    }


def build_tiny_checkpoint(
    out_dir: str | Path,
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_dim: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    dtype: str = "float32",
    min_pixels: int = 56 * 56,
    max_pixels: int = 56 * 56 * 4,
    sharded: bool = False,
) -> Path:
    """Write a random tiny Qwen2-VL checkpoint (weights, config, tokenizer, image processor); returns `out_dir`.

    `sharded=True` saves with a small `max_shard_size` so the multi-file layout with
    `model.safetensors.index.json` is produced, as for real multi-GB checkpoints.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = build_tiny_tokenizer(out_dir)
    config = Qwen2VLConfig(
        **tiny_hf_config(
            out, text_hidden=text_hidden, text_layers=text_layers, heads=heads, kv_heads=kv_heads,
            intermediate=intermediate, vision_dim=vision_dim, vision_depth=vision_depth,
            vision_heads=vision_heads, tie_word_embeddings=tie_word_embeddings,
        )
    )
    torch_dtype = getattr(torch, dtype)
    model = Qwen2VLForConditionalGeneration(config)
    _randomize_(model, seed)
    model.to(torch_dtype)
    model.config.dtype = torch_dtype
    model.save_pretrained(out, **({"max_shard_size": "200KB"} if sharded else {}))
    # Writes the transformers 5.x spelling `size: {shortest_edge, longest_edge}`.
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    return out


def tiny_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A seeded random RGB uint8 image (H, W, 3), the kind of input tests feed the image processor."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
