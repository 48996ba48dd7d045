"""Qwen2-VL geometry, read from (and written back to) a Hugging Face `config.json`.

Two layouts exist in the wild and both are read: the hub's files (Qwen2-VL-2B-Instruct) keep the
text geometry at the top level with `rope_scaling: {type: mrope, ...}`, while transformers 5.x
nests it under `text_config` with `rope_parameters`. Values are always taken from the file: for
example `rms_norm_eps` is 1e-6 in the released checkpoints but 1e-5 as a class default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from vlm2vec_jax.models.attention import IMPLEMENTATIONS

ARCHITECTURE = "Qwen2VLForConditionalGeneration"
MODEL_TYPE = "qwen2_vl"


class ConfigError(ValueError):
    """A config.json that does not describe a Qwen2-VL model this port can run."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower: ViT over 14x14x2 patches, merged 2x2 into the text width."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 1536
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_units(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal (t, h, w) rotary embeddings."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    num_layers: int = 28
    num_heads: int = 12
    num_kv_heads: int = 2
    intermediate_size: int = 8960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        # transformers' Qwen2-VL attention uses hidden // heads and ignores any `head_dim` key.
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Geometry, special token ids and run-time numerics (dtypes, rematerialisation, attention kernel)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Run-time options, not part of the checkpoint.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"  # the attention kernel (models/attention.py): auto, dense, xla, splash

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> Qwen2VLConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json", **options: Any) -> Qwen2VLConfig:
        """Parse either config.json layout; `options` sets dtype, param_dtype, remat, attention."""
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type != MODEL_TYPE and ARCHITECTURE not in architectures:
            raise ConfigError(
                f"{source}: model_type={model_type!r}, architectures={architectures!r}; this port runs "
                f"Qwen2-VL only (model_type {MODEL_TYPE!r}, {ARCHITECTURE}). Point it at a Qwen2-VL checkpoint."
            )
        text_raw = dict(raw)
        if isinstance(raw.get("text_config"), dict):
            text_raw.update(raw["text_config"])
        rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
        vision_raw = raw.get("vision_config") or {}
        try:
            text = TextConfig(
                vocab_size=int(text_raw["vocab_size"]),
                hidden_size=int(text_raw["hidden_size"]),
                num_layers=int(text_raw["num_hidden_layers"]),
                num_heads=int(text_raw["num_attention_heads"]),
                num_kv_heads=int(text_raw.get("num_key_value_heads") or text_raw["num_attention_heads"]),
                intermediate_size=int(text_raw["intermediate_size"]),
                rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope.get("rope_theta", text_raw.get("rope_theta", 1_000_000.0))),
                mrope_section=tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24))),
                hidden_act=str(text_raw.get("hidden_act", "silu")),
                tie_word_embeddings=bool(
                    raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))
                ),
            )
            vision_rope = vision_raw.get("rope_parameters") or {}
            vision = VisionConfig(
                depth=int(vision_raw["depth"]),
                embed_dim=int(vision_raw["embed_dim"]),
                num_heads=int(vision_raw["num_heads"]),
                mlp_ratio=float(vision_raw.get("mlp_ratio", 4)),
                hidden_act=str(vision_raw.get("hidden_act", "quick_gelu")),
                in_channels=int(vision_raw.get("in_channels", vision_raw.get("in_chans", 3))),
                patch_size=int(vision_raw.get("patch_size", 14)),
                temporal_patch_size=int(vision_raw.get("temporal_patch_size", 2)),
                spatial_merge_size=int(vision_raw.get("spatial_merge_size", 2)),
                out_hidden_size=int(vision_raw.get("hidden_size", text.hidden_size)),
                rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
            )
        except KeyError as missing:
            raise ConfigError(f"{source}: required key {missing} is missing from the Qwen2-VL config") from None
        config = cls(
            vision=vision,
            text=text,
            image_token_id=int(raw.get("image_token_id", 151655)),
            video_token_id=int(raw.get("video_token_id", 151656)),
            vision_start_token_id=int(raw.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(raw.get("vision_end_token_id", 151653)),
            **options,
        )
        config.validate(source)
        return config

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, **options: Any) -> Qwen2VLConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file} not found: a Hugging Face model directory needs config.json")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file} is not valid JSON ({err})") from None
        return cls.from_hf_dict(raw, source=str(file), **options)

    def validate(self, source: str = "config") -> None:
        """Reject geometries the kernels cannot run, with the reason."""
        t, v = self.text, self.vision
        problems = []
        if self.attention not in IMPLEMENTATIONS:
            problems.append(f"attention {self.attention!r} is not one of {', '.join(IMPLEMENTATIONS)}")
        if t.hidden_size % t.num_heads:
            problems.append(f"hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_heads}")
        if t.num_heads % t.num_kv_heads:
            problems.append(f"num_attention_heads {t.num_heads} is not a multiple of num_key_value_heads {t.num_kv_heads}")
        if 2 * sum(t.mrope_section) != t.head_dim:
            problems.append(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.embed_dim % v.num_heads or v.head_dim % 4:
            problems.append(f"vision embed_dim {v.embed_dim} / num_heads {v.num_heads} must give a head_dim divisible by 4")
        if v.out_hidden_size != t.hidden_size:
            problems.append(f"vision hidden_size {v.out_hidden_size} must equal the text hidden_size {t.hidden_size}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers 5.x layout, loadable by `Qwen2VLForConditionalGeneration.from_pretrained`."""
        t, v = self.text, self.vision
        rope = {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)}
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
            "dtype": self.param_dtype,
            "text_config": {
                "model_type": "qwen2_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "num_key_value_heads": t.num_kv_heads,
                "intermediate_size": t.intermediate_size,
                "rms_norm_eps": t.rms_norm_eps,
                "hidden_act": t.hidden_act,
                "rope_parameters": rope,
                "tie_word_embeddings": t.tie_word_embeddings,
                "dtype": self.param_dtype,
            },
            "vision_config": {
                "model_type": "qwen2_vl_vision",
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "num_heads": v.num_heads,
                "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
                "hidden_act": v.hidden_act,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "hidden_size": v.out_hidden_size,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
                "dtype": self.param_dtype,
            },
        }
