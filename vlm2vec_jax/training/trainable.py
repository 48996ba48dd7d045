"""What a run trains: the adapters it adds (`train.mode=lora`), the split of the model into trainable
parameters and a frozen rest (`train.mode`, `train.freeze_vision`), and the float32 master copy of
the trainable ones that the optimizer updates. The Trainer, the dry run and the benchmarks split alike."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vlm2vec_jax.models.lora import LoRAConfig, LoRAParam, apply_lora, has_lora, merge_lora
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel

MODES = ("lora", "full")


def trainable_filter(mode: str, freeze_vision: bool, vision: nnx.filterlib.Filter) -> nnx.filterlib.Filter:
    """LoRA: the adapters; full: every parameter; plus (or minus) the vision tower's parameters
    (`vision`, as the model declares them)."""
    if mode not in MODES:
        raise ValueError(f"train.mode must be one of {MODES}, got {mode!r}")
    if mode == "lora":
        return LoRAParam if freeze_vision else nnx.Any(LoRAParam, vision)
    return nnx.All(nnx.Param, nnx.Not(vision)) if freeze_vision else nnx.Param


def add_adapters(model: VisionLanguageModel, config: ml_collections.ConfigDict) -> None:
    """LoRA/DoRA adapters as `config.lora` says, in place, when `train.mode` is "lora". A model that
    came with adapters (`model.init` a PEFT adapter directory) keeps them for "lora" (the file, not
    `lora.*`, sets rank, alpha, targets and DoRA) and has them merged in for "full"."""
    if has_lora(model):
        if config.train.mode != "lora":
            merge_lora(model)
        return
    if config.train.mode == "lora":
        lora = config.lora
        targets = tuple(t.strip() for t in lora.targets.split(",") if t.strip())
        apply_lora(model, LoRAConfig(lora.rank, lora.alpha, lora.dropout, targets, lora.dora), nnx.Rngs(config.seed + 1))


def split_for_training(model: VisionLanguageModel, mode: str, freeze_vision: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable parameters, frozen rest) as `train.mode` and `train.freeze_vision` say
    (`trainable_filter`); the trainable ones still in the model's dtype (`master_weights` casts them)."""
    return nnx.split(model, trainable_filter(mode, freeze_vision, model.VISION_PARAMETERS), ...)


def master_weights(params: Any) -> Any:
    """The float32 master copy the optimizer updates (compute may run in bfloat16)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
