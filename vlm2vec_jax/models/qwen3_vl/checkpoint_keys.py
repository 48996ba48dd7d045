"""Qwen3-VL's checkpoint table, in the canonical (hub) key spelling the loader matches against
(`tensor_rules.canonical_key`; exports write the backbone's in-memory layout): the Qwen3 decoder
(q/k norms, no q/k/v bias), a biased patch embedding, the learned position table, Qwen2-VL-shaped
blocks with `linear_fc1/2`, and the merger and DeepStack mergers."""

from vlm2vec_jax.models.qwen2_vl.checkpoint_keys import patch_embed_rule, text_rules
from vlm2vec_jax.models.qwen3_vl.config import Qwen3VLConfig
from vlm2vec_jax.models.tensor_rules import TensorRule, layer_norm_rules, linear_rules, vector_rule


def merger_rules(config: Qwen3VLConfig, path: tuple[str, ...], prefix: str, norm_dim: int, layers: int | None) -> list[TensorRule]:
    merged, d = config.vision.embed_dim * config.vision.merge_units, config.text.hidden_size
    return [
        *layer_norm_rules(path + ("ln_q",), prefix + "norm", norm_dim, layers),
        *linear_rules(path + ("fc1",), prefix, [("linear_fc1", merged)], merged, True, layers),
        *linear_rules(path + ("fc2",), prefix, [("linear_fc2", d)], merged, True, layers),
    ]


def checkpoint_rules(config: Qwen3VLConfig) -> list[TensorRule]:
    v = config.vision
    vis, e, m, block = ("visual",), v.embed_dim, v.intermediate_size, "visual.blocks.{i}."
    embed = patch_embed_rule(config)
    return [
        *text_rules(config.text),
        embed,
        vector_rule(vis + ("patch_embed", "bias"), "visual.patch_embed.proj.bias", e),
        TensorRule(vis + ("pos_embed",), (("visual.pos_embed.weight", (v.num_position_embeddings, e)),), False),
        *layer_norm_rules(vis + ("blocks", "norm1"), block + "norm1", e, v.depth),
        *layer_norm_rules(vis + ("blocks", "norm2"), block + "norm2", e, v.depth),
        *linear_rules(vis + ("blocks", "qkv"), block + "attn.", [("qkv", 3 * e)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "proj"), block + "attn.", [("proj", e)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "fc1"), block + "mlp.", [("linear_fc1", m)], e, True, v.depth),
        *linear_rules(vis + ("blocks", "fc2"), block + "mlp.", [("linear_fc2", e)], m, True, v.depth),
        *merger_rules(config, vis + ("merger",), "visual.merger.", e, None),
        *merger_rules(config, vis + ("deepstack_mergers",), "visual.deepstack_merger_list.{i}.", e * v.merge_units, len(v.deepstack_visual_indexes)),
    ]
