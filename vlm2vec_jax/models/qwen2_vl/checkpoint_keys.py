"""Qwen2-VL's checkpoint table: where each leaf of `Qwen2VL` lives in the hub's key layout
(`visual.*`, `model.*`). The decoder's table is shared by every backbone with a Qwen2 decoder."""

from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig
from vlm2vec_jax.models.tensor_rules import TensorRule, layer_norm_rules, linear_rules, vector_rule


def text_rules(t: TextConfig) -> list[TensorRule]:
    """The Qwen2 decoder (and Qwen3's, by its config): fused q|k|v (biased or not) and gate|up,
    stacked over layers; Qwen3's per-head q/k norms."""
    hd, d, per_kv = t.head_dim, t.hidden_size, t.num_heads // t.num_kv_heads
    lm, L, layer = ("language_model",), t.num_layers, "model.layers.{i}."
    qkv = [("q_proj", t.num_heads * hd), ("k_proj", t.num_kv_heads * hd), ("v_proj", t.num_kv_heads * hd)]
    gate_up = [("gate_proj", t.intermediate_size), ("up_proj", t.intermediate_size)]
    return [
        TensorRule(lm + ("embed_tokens", "embedding"), (("model.embed_tokens.weight", (t.vocab_size, d)),), False),
        vector_rule(lm + ("norm", "weight"), "model.norm.weight", d),
        *linear_rules(lm + ("layers", "qkv_proj"), layer + "self_attn.", qkv, d, t.attention_bias, L, slots=(per_kv, 1, 1)),
        *linear_rules(lm + ("layers", "o_proj"), layer + "self_attn.", [("o_proj", d)], t.num_heads * hd, False, L),
        *linear_rules(lm + ("layers", "gate_up_proj"), layer + "mlp.", gate_up, d, False, L, slots=(1, 1)),
        *linear_rules(lm + ("layers", "down_proj"), layer + "mlp.", [("down_proj", d)], t.intermediate_size, False, L),
        vector_rule(lm + ("layers", "input_layernorm", "weight"), layer + "input_layernorm.weight", d, L),
        vector_rule(lm + ("layers", "post_attention_layernorm", "weight"), layer + "post_attention_layernorm.weight", d, L),
        *([vector_rule(lm + ("layers", f"{x}_norm", "weight"), layer + f"self_attn.{x}_norm.weight", hd, L) for x in "qk"] if t.qk_norm else []),
    ]


def patch_embed_rule(config: Qwen2VLConfig) -> TensorRule:
    """The patch embedding's Conv3d weight (kernel == stride), flattened to a (patch_dim, embed) kernel."""
    v = config.vision
    shape = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return TensorRule(("visual", "patch_embed", "kernel"), (("visual.patch_embed.proj.weight", shape),), True)


def merger_mlp_rules(config: Qwen2VLConfig) -> list[TensorRule]:
    """The patch merger's two linears (its norm differs between backbones)."""
    merged, d = config.vision.embed_dim * config.vision.merge_units, config.text.hidden_size
    return [
        *linear_rules(("visual", "merger", "fc1"), "visual.merger.mlp.", [("0", merged)], merged, True, None),
        *linear_rules(("visual", "merger", "fc2"), "visual.merger.mlp.", [("2", d)], merged, True, None),
    ]


def checkpoint_rules(config: Qwen2VLConfig) -> list[TensorRule]:
    """The full table for one Qwen2-VL geometry."""
    v = config.vision
    vis, e, block = ("visual",), v.embed_dim, "visual.blocks.{i}."
    return [
        *text_rules(config.text),
        patch_embed_rule(config),
        *layer_norm_rules(vis + ("blocks", "norm1"), block + "norm1", e, v.depth),
        *layer_norm_rules(vis + ("blocks", "norm2"), block + "norm2", e, v.depth),
        *linear_rules(vis + ("blocks", "qkv"), block + "attn.", [("qkv", 3 * e)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "proj"), block + "attn.", [("proj", e)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "fc1"), block + "mlp.", [("fc1", v.mlp_dim)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "fc2"), block + "mlp.", [("fc2", e)], v.mlp_dim, True, v.depth),
        *layer_norm_rules(vis + ("merger", "ln_q"), "visual.merger.ln_q", e),
        *merger_mlp_rules(config),
    ]
