"""Qwen2.5-VL's geometry: Qwen2-VL's decoder and special tokens, and a vision tower with RMSNorm,
a SwiGLU MLP of its own width and window attention (`window_size` pixels a side) in every block
but `fullatt_block_indexes`. config.json spells the tower's width `hidden_size` and the merger's
output `out_hidden_size` (Qwen2-VL: `embed_dim` and `hidden_size`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from vlm2vec_jax.models.qwen2_vl.config import (
    ConfigError,
    Qwen2VLConfig,
    TextConfig,
    VisionConfig,
    sized_tower_geometry,
    sized_tower_geometry_hf_dict,
)


@dataclasses.dataclass(frozen=True)
class WindowVisionConfig(VisionConfig):
    """The Qwen2.5-VL tower (defaults: Qwen2.5-VL-3B)."""

    hidden_act: str = "silu"
    out_hidden_size: int = 2048
    intermediate_size: int = 3420
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size

    mlp_matrices: ClassVar[int] = 3  # gate, up, down

    def attended_patches(self, patches: np.ndarray) -> np.ndarray:
        """The whole image in full-attention blocks, one window (at most `window_patches`**2
        patches; fewer at an image's edges, not counted) in the others. The tower computes the
        windows as masks over the image, so what it executes is the full count in every block."""
        p = np.asarray(patches, np.float64)
        full = len(self.fullatt_block_indexes)
        return full * p + (self.depth - full) * np.minimum(p, self.window_patches**2)

    @property
    def window_patches(self) -> int:
        """A window's side in patches: whole merged tokens, as transformers rounds it
        (`window_size // merge // patch` merged tokens)."""
        return self.window_size // self.spatial_merge_size // self.patch_size * self.spatial_merge_size


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(Qwen2VLConfig):
    MODEL_TYPE: ClassVar[str] = "qwen2_5_vl"
    ARCHITECTURE: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"

    vision: WindowVisionConfig = WindowVisionConfig()

    @classmethod
    def small_vision(cls, dim: int, depth: int, heads: int, out_hidden_size: int) -> WindowVisionConfig:
        """Windows of 2 x 2 merged tokens and full attention in the last block only, so that small
        images span several windows and both kinds of block run."""
        return WindowVisionConfig(
            depth=depth, embed_dim=dim, num_heads=heads, out_hidden_size=out_hidden_size, intermediate_size=2 * dim,
            window_size=56, fullatt_block_indexes=(depth - 1,),
        )

    @classmethod
    def parse_vision_config(cls, vision_raw: dict[str, Any], text: TextConfig) -> WindowVisionConfig:
        return WindowVisionConfig(
            window_size=int(vision_raw.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in vision_raw.get("fullatt_block_indexes", (7, 15, 23, 31))),
            **sized_tower_geometry(vision_raw, text, "silu"),
        )

    def validate(self, source: str = "config") -> None:
        super().validate(source)
        v = self.vision
        if v.window_patches < v.spatial_merge_size:
            raise ConfigError(f"{source}: vision window_size {v.window_size} is smaller than one merged token "
                              f"({v.spatial_merge_size * v.patch_size} pixels)")
        outside = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
        if outside:
            raise ConfigError(f"{source}: vision fullatt_block_indexes {outside} are not blocks of a depth-{v.depth} tower")

    def vision_hf_dict(self) -> dict[str, Any]:
        v = self.vision
        return {
            **sized_tower_geometry_hf_dict(v),
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
        }
