"""Write the Flax model back as a Hugging Face model directory of its backbone (the key layout its
released checkpoints use, safetensors),
so transformers and `Embedder.from_pretrained` load it as they load the original."""

import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from vlm2vec_jax.models.backbones import checkpoint_rules, stored_tensor_specs
from vlm2vec_jax.models.tensor_rules import stored_key
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel
from vlm2vec_jax.models.safetensors_files import checkpoint_files, iter_tensors, write_checkpoint_files

log = logging.getLogger(__name__)

# Everything but weights and config that a model directory carries: tokenizer, image processor.
SIDECAR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
DEFAULT_SHARD_BYTES = 2 * 1024**3


def _hf_tensors(model: VisionLanguageModel) -> Iterator[tuple[str, np.ndarray]]:
    """Every HF tensor of the model, split out of our (fused, stacked, transposed) leaves, one
    leaf on the host at a time."""
    state = nnx.state(model, nnx.Param)
    leaves = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}
    layout = model.config.CHECKPOINT_LAYOUT
    for rule in checkpoint_rules(model.config):
        leaf = np.asarray(jax.device_get(leaves[rule.path]))
        for key, shape, layer, part in rule.hf_keys():
            value = rule.part_of(leaf if layer is None else leaf[layer], part)
            value = value.reshape(-1, shape[0]).T if rule.is_kernel else value
            yield stored_key(key, layout), np.ascontiguousarray(value.reshape(shape))


def _source_lm_head(source_dir: Path | None) -> np.ndarray | None:
    if source_dir is None:
        return None
    for file in checkpoint_files(source_dir):
        for name, tensor in iter_tensors(file):
            if name == "lm_head.weight":
                return np.array(tensor)
    return None


def save_pretrained(model: VisionLanguageModel, out_dir: str | Path, *, source_dir: str | Path | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write config.json, safetensors (sharded above `shard_bytes`, with an index) and the source
    directory's tokenizer and preprocessor files. An untied LM head is copied from `source_dir`;
    without one the export is marked tied (the head is unused for embeddings). Tensors are
    produced and written a shard at a time, so host memory stays near one shard."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_dir = Path(source_dir) if source_dir is not None else None
    config = model.config.to_hf_dict()
    itemsize = model.config.parameter_dtype.itemsize
    sizes = [(key, itemsize * int(np.prod(shape))) for key, shape in stored_tensor_specs(model.config)]
    tensors: Iterator[tuple[str, np.ndarray]] = _hf_tensors(model)
    if not config["tie_word_embeddings"]:
        lm_head = _source_lm_head(source_dir)
        if lm_head is None:
            log.warning("untied LM head not found in %s: exporting with tie_word_embeddings=true", source_dir)
            config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
        else:
            lm_head = lm_head.astype(model.config.parameter_dtype)
            sizes.append(("lm_head.weight", lm_head.nbytes))
            tensors = itertools.chain(tensors, [("lm_head.weight", lm_head)])
    write_checkpoint_files(out_dir, sizes, tensors, shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if source_dir is not None:
        for name in SIDECAR_FILES:
            if (source_dir / name).is_file() and source_dir.resolve() != out_dir.resolve():
                shutil.copy2(source_dir / name, out_dir / name)
    return out_dir
