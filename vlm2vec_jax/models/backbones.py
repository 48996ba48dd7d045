"""The backbones this port runs, keyed by the `model_type` of a checkpoint's config.json.

A backbone is a config class (parses and writes config.json), a model class (the Flax modules) and
its checkpoint table (`tensor_rules.TensorRule`s). Adding one is a folder under `models/` and a
line in `BACKBONES`; loading, export, training, mining and evaluation find it here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm2vec_jax.models.qwen2_5_vl import checkpoint_keys as qwen2_5_vl_keys
from vlm2vec_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlm2vec_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from vlm2vec_jax.models.qwen2_vl import checkpoint_keys as qwen2_vl_keys
from vlm2vec_jax.models.qwen2_vl.config import ConfigError, Qwen2VLConfig
from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config, qwen2vl_7b_config
from vlm2vec_jax.models.qwen2_vl.model import Qwen2VL
from vlm2vec_jax.models.qwen3_vl import checkpoint_keys as qwen3_vl_keys
from vlm2vec_jax.models.qwen3_vl.config import Qwen3VLConfig
from vlm2vec_jax.models.qwen3_vl.geometries import qwen3vl_2b_config, qwen3vl_8b_config
from vlm2vec_jax.models.qwen3_vl.model import Qwen3VL
from vlm2vec_jax.models.tensor_rules import TensorRule, stored_key
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel

# Any backbone's config: `Qwen2VLConfig` or a subclass of it.
ModelConfig = Qwen2VLConfig


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One supported architecture: how to read its config, build its model, map its tensors."""

    config: type[ModelConfig]
    model: type[VisionLanguageModel]
    checkpoint_rules: Callable[[Any], list[TensorRule]]

    @property
    def model_type(self) -> str:
        return self.config.MODEL_TYPE

    @property
    def architecture(self) -> str:
        """The transformers class this backbone equals (and its exports load into)."""
        return self.config.ARCHITECTURE

    @property
    def transformers_module(self) -> str:
        """The transformers module defining `architecture` (PEFT's `auto_mapping.parent_library`)."""
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"


BACKBONES: dict[str, Backbone] = {
    b.model_type: b
    for b in (
        Backbone(Qwen2VLConfig, Qwen2VL, qwen2_vl_keys.checkpoint_rules),
        Backbone(Qwen2_5_VLConfig, Qwen2_5_VL, qwen2_5_vl_keys.checkpoint_rules),
        Backbone(Qwen3VLConfig, Qwen3VL, qwen3_vl_keys.checkpoint_rules),
    )
}

# The real geometries by name, for dry runs (`model.geometry`) and benchmarks at real scale.
GEOMETRIES: dict[str, Callable[..., ModelConfig]] = {
    "2b": qwen2vl_2b_config, "7b": qwen2vl_7b_config,  # Qwen2-VL
    "qwen3vl-2b": qwen3vl_2b_config, "qwen3vl-8b": qwen3vl_8b_config,
}


def backbone_for(model_type: str | None, architectures: list[str] | None = None, source: str = "config.json") -> Backbone:
    """The backbone of a `model_type` (or, without one, of a listed transformers architecture)."""
    if model_type in BACKBONES:
        return BACKBONES[model_type]
    by_architecture = {b.architecture: b for b in BACKBONES.values()}
    for name in architectures or []:
        if model_type is None and name in by_architecture:
            return by_architecture[name]
    supported = ", ".join(f"{t} ({b.architecture})" for t, b in BACKBONES.items())
    raise ConfigError(
        f"{source}: model_type={model_type!r} (architectures={architectures!r}) is not a supported backbone; "
        f"supported model types: {supported}"
    )


def backbone_of(config: ModelConfig) -> Backbone:
    return BACKBONES[config.MODEL_TYPE]


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json", **options: Any) -> ModelConfig:
    """The backbone config a parsed config.json describes; `options` sets dtype, param_dtype,
    remat, attention."""
    backbone = backbone_for(raw.get("model_type"), raw.get("architectures"), source)
    return backbone.config.from_hf_dict(raw, source=source, **options)


def read_config(directory: str | Path, **options: Any) -> ModelConfig:
    """The config of a Hugging Face model directory (its config.json), whichever backbone it names."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file} not found: a Hugging Face model directory needs config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file} is not valid JSON ({err})") from None
    return config_from_hf_dict(raw, source=str(file), **options)


def build_model(config: ModelConfig, rngs: Any) -> VisionLanguageModel:
    """A freshly initialised model of `config`'s backbone."""
    return backbone_of(config).model(config, rngs=rngs)


def checkpoint_rules(config: ModelConfig) -> list[TensorRule]:
    return backbone_of(config).checkpoint_rules(config)


def stored_tensor_specs(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(key as the backbone's checkpoints store it, HF shape) of every tensor, in table order (no LM head)."""
    layout = config.CHECKPOINT_LAYOUT
    return [(stored_key(key, layout), shape) for rule in checkpoint_rules(config) for key, shape, _, _ in rule.hf_keys()]
