"""Qwen2.5-VL's checkpoint table: Qwen2-VL's decoder and patch embedding, its own vision blocks
(RMSNorm weights only; gate|up fused like the decoder's, with biases) and merger."""

from vlm2vec_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from vlm2vec_jax.models.qwen2_vl.checkpoint_keys import merger_mlp_rules, patch_embed_rule, text_rules
from vlm2vec_jax.models.tensor_rules import TensorRule, linear_rules, vector_rule


def checkpoint_rules(config: Qwen2_5_VLConfig) -> list[TensorRule]:
    v = config.vision
    vis, e, m, block = ("visual",), v.embed_dim, v.intermediate_size, "visual.blocks.{i}."
    return [
        *text_rules(config.text),
        patch_embed_rule(config),
        vector_rule(vis + ("blocks", "norm1", "weight"), block + "norm1.weight", e, v.depth),
        vector_rule(vis + ("blocks", "norm2", "weight"), block + "norm2.weight", e, v.depth),
        *linear_rules(vis + ("blocks", "qkv"), block + "attn.", [("qkv", 3 * e)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "proj"), block + "attn.", [("proj", e)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "gate_up_proj"), block + "mlp.", [("gate_proj", m), ("up_proj", m)], e, True, v.depth, slots=(1, 1)),
        *linear_rules(vis + ("blocks", "down_proj"), block + "mlp.", [("down_proj", e)], m, True, v.depth),
        vector_rule(vis + ("merger", "ln_q", "weight"), "visual.merger.ln_q.weight", e),
        *merger_mlp_rules(config),
    ]
