"""The model a run starts from: a Hugging Face directory, a PEFT adapter directory (its base's weights
with the adapter's LoRA/DoRA groups, trainable and initialised from the file), or a randomly
initialised Qwen2-VL-shaped model (the demo) whose tokenizer is learned from the training texts and
written, with config.json and preprocessor_config.json, into the workdir so the run, its export and
`Embedder` read it alike."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from vlm2vec_jax.models.peft_adapter import base_dir, is_adapter_dir, load_adapted, processor_dir
from vlm2vec_jax.models.backbones import build_model, read_config
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.projection import Projection
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel
from vlm2vec_jax.models.model_dir_files import build_tiny_tokenizer, preprocessor_config, tiny_hf_config

RANDOM = "random"
ARCHITECTURE_KEYS = (
    "model_type", "text_hidden", "text_layers", "heads", "kv_heads", "intermediate",
    "vision_dim", "vision_depth", "vision_heads", "vocab_size",
)


def write_random_model_dir(
    out: Path, architecture: Mapping[str, Any], corpus: Iterable[str], *, min_pixels: int, max_pixels: int
) -> Path:
    """Tokenizer (BPE of `architecture['vocab_size']` learned on `corpus`), config.json and
    preprocessor_config.json in `out`; an existing complete directory is reused as it is."""
    if (out / "config.json").is_file():
        return out
    unknown = set(architecture) - set(ARCHITECTURE_KEYS)
    if unknown:
        raise ValueError(f"model.architecture: unknown keys {sorted(unknown)}; valid: {', '.join(ARCHITECTURE_KEYS)}")
    arch = dict(architecture)
    partial = out.with_name(out.name + ".partial")
    build_tiny_tokenizer(partial, corpus=corpus, vocab_size=arch.pop("vocab_size"))
    (partial / "config.json").write_text(json.dumps(tiny_hf_config(partial, **arch), indent=2))
    (partial / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(arch.get("model_type", "qwen2_vl"), min_pixels=min_pixels, max_pixels=max_pixels), indent=2)
    )
    partial.rename(out)
    return out


def scale_init_(model: nnx.Module, seed: int) -> None:
    """Re-draw kernels with std 1/sqrt(fan_in) and embeddings with std 1 (in place).

    transformers' std 0.02 suits a pretrained checkpoint's scale, not training from scratch: in a
    small model it leaves hidden states tiny and attention nearly uniform, and the contrastive loss
    then collapsed here (every embedding equal, loss ln(batch), zero gradient). Fan-in scaling keeps
    activations O(1) through every layer. Each leaf's draw is keyed by its path (`_path_key`)."""
    key = jax.random.key(seed)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Projection):
            variable, std, path = node.kernel, node.fan_in**-0.5, (*path, "kernel")
        elif isinstance(node, nnx.Embed):
            variable, std, path = node.embedding, 1.0, (*path, "embedding")
        else:
            continue
        value = variable[...]
        variable.set_value((std * jax.random.normal(_path_key(key, path), value.shape)).astype(value.dtype))


def _path_key(key: jax.Array, path: tuple[Any, ...]) -> jax.Array:
    """A leaf's key from its path, not its position in the graph: a module that gains an attribute
    (any graph node, a string included) leaves every other leaf's draw as it was."""
    return jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF)


def init_dirs(init: str | Path) -> tuple[Path, Path]:
    """(base weights directory, tokenizer and preprocessor directory) of a Hugging Face or PEFT
    adapter `model.init`: the directory itself twice, or the adapter's base and wherever its
    processor files are (`peft_adapter.processor_dir`)."""
    path = Path(init).expanduser()
    if not is_adapter_dir(path):
        return path, path
    base = base_dir(path)
    return base, processor_dir(path, base)


def init_model(
    init: str,
    model_dir: Path,
    *,
    seed: int,
    dtype: str,
    param_dtype: str,
    remat: bool,
    attention: str = "auto",
    sharding_for: Callable[..., Any] | None = None,
    lora_dropout: float | None = None,
) -> VisionLanguageModel:
    """`init` == "random": a fresh model of `model_dir`'s config.json (seeded); else the weights of
    the Hugging Face directory `model_dir`, or, when `model_dir` is a PEFT adapter directory, its
    base's weights with the adapter applied as `LoRALinear` groups holding the file's values
    (`lora_dropout`, a training choice, replaces the file's)."""
    if init == RANDOM:
        config = read_config(
            model_dir, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention
        )
        model = build_model(config, nnx.Rngs(seed))
        scale_init_(model, seed)
        return model
    options = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, sharding_for=sharding_for)
    if is_adapter_dir(model_dir):
        return load_adapted(model_dir, dropout=lora_dropout, **options)[0]
    return load_pretrained(model_dir, **options)
