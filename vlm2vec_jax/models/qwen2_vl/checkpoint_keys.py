"""Where each parameter of the Flax model lives in a Hugging Face Qwen2-VL checkpoint.

One table serves import and export. A rule names a leaf of our state, the HF tensor(s) it is made
of (fused leaves such as qkv_proj concatenate several HF tensors along their output axis) and the
HF shape of each, so a misshaped tensor is caught by name. Kernels are stored (in, out) here and
(out, in) in HF; the patch embedding's Conv3d weight flattens to a (patch_dim, embed) kernel.
"""

import dataclasses
import re

from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One leaf of our state and its HF source tensors (`{i}` = layer index for stacked leaves)."""

    path: Path
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    is_kernel: bool
    layers: int | None = None

    def hf_keys(self) -> list[tuple[str, tuple[int, ...], int | None, int]]:
        """(HF key, HF shape, layer index or None, part number) for every source tensor."""
        layer_ids = range(self.layers) if self.layers is not None else [None]
        return [
            (template.format(i=i), shape, i, part)
            for i in layer_ids
            for part, (template, shape) in enumerate(self.parts)
        ]

    def part_width(self, part: int) -> int:
        """Size of a part along our leaf's last axis (the output axis)."""
        return self.parts[part][1][0]

    def part_offset(self, part: int) -> int:
        return sum(self.part_width(p) for p in range(part))


def _linear(path: Path, prefix: str, names: list[tuple[str, int]], fan_in: int, bias: bool, layers: int | None) -> list[TensorRule]:
    kernel = TensorRule(path + ("kernel",), tuple((f"{prefix}{n}.weight", (out, fan_in)) for n, out in names), True, layers)
    if not bias:
        return [kernel]
    biases = TensorRule(path + ("bias",), tuple((f"{prefix}{n}.bias", (out,)) for n, out in names), False, layers)
    return [kernel, biases]


def _vector(path: Path, key: str, dim: int, layers: int | None = None) -> TensorRule:
    return TensorRule(path, ((key, (dim,)),), False, layers)


def _layer_norm(path: Path, prefix: str, dim: int, layers: int | None = None) -> list[TensorRule]:
    return [_vector(path + ("scale",), f"{prefix}.weight", dim, layers), _vector(path + ("bias",), f"{prefix}.bias", dim, layers)]


def checkpoint_rules(config: Qwen2VLConfig) -> list[TensorRule]:
    """The full table for one geometry, in the hub's key layout (`visual.*`, `model.*`)."""
    t, v = config.text, config.vision
    hd, d, e = t.head_dim, t.hidden_size, v.embed_dim
    lm, vis = ("language_model",), ("visual",)
    L, layer, block = t.num_layers, "model.layers.{i}.", "visual.blocks.{i}."
    merged = e * v.merge_units
    rules = [
        TensorRule(lm + ("embed_tokens", "embedding"), (("model.embed_tokens.weight", (t.vocab_size, d)),), False),
        _vector(lm + ("norm", "weight"), "model.norm.weight", d),
        *_linear(lm + ("layers", "qkv_proj"), layer + "self_attn.", [("q_proj", t.num_heads * hd), ("k_proj", t.num_kv_heads * hd), ("v_proj", t.num_kv_heads * hd)], d, True, L),
        *_linear(lm + ("layers", "o_proj"), layer + "self_attn.", [("o_proj", d)], t.num_heads * hd, False, L),
        *_linear(lm + ("layers", "gate_up_proj"), layer + "mlp.", [("gate_proj", t.intermediate_size), ("up_proj", t.intermediate_size)], d, False, L),
        *_linear(lm + ("layers", "down_proj"), layer + "mlp.", [("down_proj", d)], t.intermediate_size, False, L),
        _vector(lm + ("layers", "input_layernorm", "weight"), layer + "input_layernorm.weight", d, L),
        _vector(lm + ("layers", "post_attention_layernorm", "weight"), layer + "post_attention_layernorm.weight", d, L),
        TensorRule(vis + ("patch_embed", "kernel"), (("visual.patch_embed.proj.weight", (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),), True),
        *_layer_norm(vis + ("blocks", "norm1"), block + "norm1", e, v.depth),
        *_layer_norm(vis + ("blocks", "norm2"), block + "norm2", e, v.depth),
        *_linear(vis + ("blocks", "qkv"), block + "attn.", [("qkv", 3 * e)], e, True, v.depth),
        *_linear(vis + ("blocks", "proj"), block + "attn.", [("proj", e)], e, True, v.depth),
        *_linear(vis + ("blocks", "fc1"), block + "mlp.", [("fc1", v.mlp_dim)], e, True, v.depth),
        *_linear(vis + ("blocks", "fc2"), block + "mlp.", [("fc2", e)], v.mlp_dim, True, v.depth),
        *_layer_norm(vis + ("merger", "ln_q"), "visual.merger.ln_q", e),
        *_linear(vis + ("merger", "fc1"), "visual.merger.mlp.", [("0", merged)], merged, True, None),
        *_linear(vis + ("merger", "fc2"), "visual.merger.mlp.", [("2", d)], merged, True, None),
    ]
    return rules


# transformers 5.x names modules `model.visual.*` / `model.language_model.*` in memory (and some
# tools save that way); the hub files use `visual.*` / `model.*`. Both map to the hub layout.
_IN_MEMORY_PREFIXES = ((re.compile(r"^model\.visual\."), "visual."), (re.compile(r"^model\.language_model\."), "model."))
# Tensors an embedding model does not use: the LM head and stale rotary buffers of old exports.
IGNORED_KEYS = re.compile(r"^lm_head\.|\.rotary_emb\.inv_freq$")


def canonical_key(key: str) -> str:
    """The hub-layout name of a checkpoint key written in either layout."""
    for pattern, replacement in _IN_MEMORY_PREFIXES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key
