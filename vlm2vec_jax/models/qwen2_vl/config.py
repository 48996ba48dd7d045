"""Qwen2-VL geometry, read from (and written back to) a Hugging Face `config.json`.

Two layouts exist in the wild and both are read: the hub's files (Qwen2-VL-2B-Instruct) keep the
text geometry at the top level with `rope_scaling: {type: mrope, ...}`, while transformers 5.x
nests it under `text_config` with `rope_parameters`. Values are always taken from the file: for
example `rms_norm_eps` is 1e-6 in the released checkpoints but 1e-5 as a class default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from vlm2vec_jax.models.attention import IMPLEMENTATIONS


class ConfigError(ValueError):
    """A config.json that does not describe a model this port can run."""


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

    # The MLP's matrices of `embed_dim` x `mlp_dim` (fc1, fc2), for FLOP counts.
    mlp_matrices: ClassVar[int] = 2
    patch_embed_bias: ClassVar[bool] = False

    def attended_patches(self, patches: np.ndarray) -> np.ndarray:
        """Patches each patch of an image of `patches` attends to, summed over the blocks (FLOP
        counts): the whole image in every block."""
        return self.depth * np.asarray(patches, np.float64)


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
    # Where decoders of later backbones differ (Qwen3: no q/k/v bias, RMSNorm of q and k per head,
    # an explicit head_dim, interleaved M-RoPE bands).
    attention_bias: bool = True
    qk_norm: bool = False
    explicit_head_dim: int = 0  # 0: hidden_size // num_heads
    mrope_interleaved: bool = False

    @property
    def head_dim(self) -> int:
        # transformers' Qwen2-VL attention uses hidden // heads and ignores any `head_dim` key.
        return self.explicit_head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Geometry, special token ids and run-time numerics (dtypes, rematerialisation, attention kernel)."""

    MODEL_TYPE: ClassVar[str] = "qwen2_vl"
    ARCHITECTURE: ClassVar[str] = "Qwen2VLForConditionalGeneration"  # the transformers class it equals
    # How the backbone's released checkpoints name tensors: "hub" (`visual.*`, `model.*`) or
    # "in_memory" (transformers 5's `model.visual.*`, `model.language_model.*`); exports follow it.
    CHECKPOINT_LAYOUT: ClassVar[str] = "hub"
    # The image processor's normalisation (preprocessor_config.json of the released models).
    IMAGE_MEAN: ClassVar[tuple[float, float, float]] = (0.48145466, 0.4578275, 0.40821073)
    IMAGE_STD: ClassVar[tuple[float, float, float]] = (0.26862954, 0.26130258, 0.27577711)
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
        if model_type != cls.MODEL_TYPE and cls.ARCHITECTURE not in architectures:
            raise ConfigError(
                f"{source}: model_type={model_type!r}, architectures={architectures!r} is not "
                f"{cls.MODEL_TYPE!r} ({cls.ARCHITECTURE})"
            )
        text_raw = dict(raw)
        if isinstance(raw.get("text_config"), dict):
            text_raw.update(raw["text_config"])
        try:
            text = cls.parse_text_config(text_raw, raw)
            vision = cls.parse_vision_config(raw.get("vision_config") or {}, text)
        except KeyError as missing:
            raise ConfigError(f"{source}: required key {missing} is missing from the {cls.ARCHITECTURE} config") from None
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
    def parse_text_config(cls, text_raw: dict[str, Any], raw: dict[str, Any]) -> TextConfig:
        """The decoder from the merged top-level + `text_config` keys (a KeyError names a missing one)."""
        return parse_text_config(text_raw, raw)

    @classmethod
    def small_text(cls, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab_size: int,
                   tie_word_embeddings: bool) -> TextConfig:
        """A decoder of the given size with this backbone's other choices, for tiny test and demo
        models (rope theta 1e6, Qwen2-VL's 1/4, 3/8, 3/8 rotary split)."""
        return TextConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
            intermediate_size=intermediate, mrope_section=mrope_section_for(hidden // heads),
            tie_word_embeddings=tie_word_embeddings,
        )

    @classmethod
    def small_vision(cls, dim: int, depth: int, heads: int, out_hidden_size: int) -> VisionConfig:
        """A tower of the given size with this backbone's other choices, for tiny test and demo models."""
        return VisionConfig(depth=depth, embed_dim=dim, num_heads=heads, out_hidden_size=out_hidden_size)

    @classmethod
    def parse_vision_config(cls, vision_raw: dict[str, Any], text: TextConfig) -> VisionConfig:
        """The `vision_config` section (a KeyError names a required key that is missing)."""
        return VisionConfig(
            depth=int(vision_raw["depth"]),
            embed_dim=int(vision_raw["embed_dim"]),
            num_heads=int(vision_raw["num_heads"]),
            mlp_ratio=float(vision_raw.get("mlp_ratio", 4)),
            hidden_act=str(vision_raw.get("hidden_act", "quick_gelu")),
            out_hidden_size=int(vision_raw.get("hidden_size", text.hidden_size)),
            **patch_geometry(vision_raw),
        )

    def validate(self, source: str = "config") -> None:
        """Reject geometries the kernels cannot run, with the reason."""
        t, v = self.text, self.vision
        problems = []
        if self.attention not in IMPLEMENTATIONS:
            problems.append(f"attention {self.attention!r} is not one of {', '.join(IMPLEMENTATIONS)}")
        if not t.explicit_head_dim and t.hidden_size % t.num_heads:
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
        """The transformers 5.x layout, loadable by `ARCHITECTURE.from_pretrained`."""
        return {
            "architectures": [self.ARCHITECTURE],
            "model_type": self.MODEL_TYPE,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "dtype": self.param_dtype,
            "text_config": {"model_type": f"{self.MODEL_TYPE}_text", **self.text_hf_dict(), "dtype": self.param_dtype},
            "vision_config": {"model_type": f"{self.MODEL_TYPE}_vision", **self.vision_hf_dict(), "dtype": self.param_dtype},
        }

    def text_hf_dict(self) -> dict[str, Any]:
        """The `text_config` section in the spelling transformers reads."""
        t = self.text
        return {
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "intermediate_size": t.intermediate_size,
            "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": t.hidden_act,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
            "tie_word_embeddings": t.tie_word_embeddings,
        }

    def vision_hf_dict(self) -> dict[str, Any]:
        """The `vision_config` section in the spelling transformers reads."""
        v = self.vision
        return {
            "depth": v.depth,
            "embed_dim": v.embed_dim,
            "num_heads": v.num_heads,
            "mlp_ratio": int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio,
            "hidden_act": v.hidden_act,
            "hidden_size": v.out_hidden_size,
            **patch_geometry_hf_dict(v),
        }


def mrope_section_for(head_dim: int) -> tuple[int, int, int]:
    """Qwen2-VL's (t, h, w) split of the head_dim/2 rotary frequencies: 1/4, 3/8, 3/8."""
    half = head_dim // 2
    if head_dim % 2 or half < 4:
        raise ValueError(f"head_dim must be even and >= 8 for M-RoPE, got {head_dim}")
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h)


def parse_text_config(text_raw: dict[str, Any], raw: dict[str, Any]) -> TextConfig:
    """The Qwen2 decoder from the merged top-level + `text_config` keys (either layout)."""
    rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
    return TextConfig(
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
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))),
    )


def patch_geometry(vision_raw: dict[str, Any]) -> dict[str, Any]:
    """The patch and rotary keys every Qwen vision tower spells alike."""
    rope = vision_raw.get("rope_parameters") or {}
    return dict(
        in_channels=int(vision_raw.get("in_channels", vision_raw.get("in_chans", 3))),
        patch_size=int(vision_raw.get("patch_size", 14)),
        temporal_patch_size=int(vision_raw.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vision_raw.get("spatial_merge_size", 2)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def sized_tower_geometry(vision_raw: dict[str, Any], text: TextConfig, default_act: str) -> dict[str, Any]:
    """The keys of towers that spell their width `hidden_size` and give their MLP width
    (Qwen2.5-VL, Qwen3-VL), with the patch keys."""
    return dict(
        depth=int(vision_raw["depth"]),
        embed_dim=int(vision_raw["hidden_size"]),
        num_heads=int(vision_raw["num_heads"]),
        hidden_act=str(vision_raw.get("hidden_act", default_act)),
        out_hidden_size=int(vision_raw.get("out_hidden_size", text.hidden_size)),
        intermediate_size=int(vision_raw["intermediate_size"]),
        **patch_geometry(vision_raw),
    )


def sized_tower_geometry_hf_dict(v: Any) -> dict[str, Any]:
    return {
        "depth": v.depth,
        "hidden_size": v.embed_dim,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "hidden_act": v.hidden_act,
        "out_hidden_size": v.out_hidden_size,
        **patch_geometry_hf_dict(v),
    }


def patch_geometry_hf_dict(v: VisionConfig) -> dict[str, Any]:
    return {
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
