"""Qwen3-VL's geometry (dense 2B / 4B / 8B): the Qwen3 decoder (no q/k/v bias, per-head q/k
RMSNorm, an explicit `head_dim`, interleaved M-RoPE) and a ViT over 16-px patches with learned
position embeddings resampled to each image's grid and DeepStack features from the blocks
`deepstack_visual_indexes` names. config.json spells the tower's width `hidden_size` and the
merger's output `out_hidden_size`; its checkpoints store transformers 5's in-memory key layout."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from vlm2vec_jax.models.qwen2_vl.config import (
    ConfigError,
    Qwen2VLConfig,
    TextConfig,
    VisionConfig,
    mrope_section_for,
    parse_text_config,
    sized_tower_geometry,
    sized_tower_geometry_hf_dict,
)


@dataclasses.dataclass(frozen=True)
class DeepStackVisionConfig(VisionConfig):
    """The Qwen3-VL tower (defaults: Qwen3-VL-2B)."""

    depth: int = 24
    embed_dim: int = 1024
    hidden_act: str = "gelu_pytorch_tanh"
    patch_size: int = 16
    out_hidden_size: int = 2048
    intermediate_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)

    patch_embed_bias: ClassVar[bool] = True

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    @property
    def position_grid_side(self) -> int:
        """The learned position table is a square grid of this many entries a side."""
        return int(round(self.num_position_embeddings**0.5))


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(Qwen2VLConfig):
    MODEL_TYPE: ClassVar[str] = "qwen3_vl"
    ARCHITECTURE: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    CHECKPOINT_LAYOUT: ClassVar[str] = "in_memory"
    IMAGE_MEAN: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)
    IMAGE_STD: ClassVar[tuple[float, float, float]] = (0.5, 0.5, 0.5)

    vision: DeepStackVisionConfig = DeepStackVisionConfig()
    text: TextConfig = TextConfig(
        hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144, rope_theta=5_000_000.0,
        mrope_section=(24, 20, 20), attention_bias=False, qk_norm=True, explicit_head_dim=128, mrope_interleaved=True,
    )

    @classmethod
    def parse_text_config(cls, text_raw: dict[str, Any], raw: dict[str, Any]) -> TextConfig:
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        return dataclasses.replace(
            parse_text_config(text_raw, raw),
            attention_bias=bool(text_raw.get("attention_bias", False)),
            qk_norm=True,
            explicit_head_dim=int(text_raw.get("head_dim") or int(text_raw["hidden_size"]) // int(text_raw["num_attention_heads"])),
            mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        )

    def text_hf_dict(self) -> dict[str, Any]:
        t = self.text
        out = super().text_hf_dict()
        out["rope_parameters"]["mrope_interleaved"] = t.mrope_interleaved
        return {**out, "head_dim": t.head_dim, "attention_bias": t.attention_bias}

    @classmethod
    def small_text(cls, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab_size: int,
                   tie_word_embeddings: bool) -> TextConfig:
        """Qwen3's choices at a small size, with heads twice as wide as hidden / heads, so that the
        attention width differs from the hidden size as in Qwen3-VL-4B."""
        head_dim = 2 * hidden // heads
        return TextConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
            intermediate_size=intermediate, rope_theta=5_000_000.0, mrope_section=mrope_section_for(head_dim),
            tie_word_embeddings=tie_word_embeddings, attention_bias=False, qk_norm=True, explicit_head_dim=head_dim,
            mrope_interleaved=True,
        )

    @classmethod
    def small_vision(cls, dim: int, depth: int, heads: int, out_hidden_size: int) -> DeepStackVisionConfig:
        """A 4 x 4 learned position grid (so images are resampled up and down) and DeepStack from
        the first and the last block."""
        return DeepStackVisionConfig(
            depth=depth, embed_dim=dim, num_heads=heads, out_hidden_size=out_hidden_size, intermediate_size=2 * dim,
            num_position_embeddings=16, deepstack_visual_indexes=tuple(sorted({0, depth - 1})),
        )

    @classmethod
    def parse_vision_config(cls, vision_raw: dict[str, Any], text: TextConfig) -> DeepStackVisionConfig:
        geometry = sized_tower_geometry(vision_raw, text, "gelu_pytorch_tanh")
        return DeepStackVisionConfig(
            num_position_embeddings=int(vision_raw["num_position_embeddings"]),
            deepstack_visual_indexes=tuple(int(i) for i in vision_raw.get("deepstack_visual_indexes", ())),
            **{**geometry, "patch_size": int(vision_raw.get("patch_size", 16))},
        )

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        v, t = self.vision, self.text
        problems = []
        if v.position_grid_side**2 != v.num_position_embeddings:
            problems.append(f"vision num_position_embeddings {v.num_position_embeddings} is not a square grid")
        outside = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
        if outside:
            problems.append(f"vision deepstack_visual_indexes {outside} are not blocks of a depth-{v.depth} tower")
        if len(v.deepstack_visual_indexes) > t.num_layers:
            problems.append(f"{len(v.deepstack_visual_indexes)} DeepStack levels need as many decoder layers (has {t.num_layers})")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))

    def vision_hf_dict(self) -> dict[str, Any]:
        v = self.vision
        return {
            **sized_tower_geometry_hf_dict(v),
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
        }
