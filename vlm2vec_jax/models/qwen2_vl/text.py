"""The Qwen2 decoder: token embedding, scanned GQA decoder layers with M-RoPE, final RMSNorm.

q|k|v and gate|up are fused into one matmul each: fewer, larger GEMMs are faster on every backend,
and the checkpoint importer splits/joins them at the boundary.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from vlm2vec_jax.models.qwen2_vl.config import TextConfig
from vlm2vec_jax.models.attention import SegmentMask, attention
from vlm2vec_jax.models.qwen2_vl.layers import RMSNorm, activation, create_stack, linear, scan_stack
from vlm2vec_jax.models.qwen2_vl.rope import apply_rotary, mrope


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: grouped-query attention (q/k/v biased, o not) and a SwiGLU MLP."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        dims = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.qkv_proj = linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, bias=True, **dims)
        self.o_proj = linear(cfg.num_heads * hd, cfg.hidden_size, bias=False, **dims)
        self.gate_up_proj = linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, **dims)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=False, **dims)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.act = activation(cfg.hidden_act)

    def __call__(
        self, x: jnp.ndarray, mask: SegmentMask, cos: jnp.ndarray, sin: jnp.ndarray, query_index: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """(B, L, D) -> (B, L, D); with `query_index` (B, Q), only those Q tokens of each row are
        computed (keys and values still cover every token) and the result is (B, Q, D)."""
        batch, length, _ = x.shape
        n, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        k = apply_rotary(qkv[..., n * hd : (n + kv) * hd].reshape(batch, length, kv, hd), cos, sin)
        v = qkv[..., (n + kv) * hd :].reshape(batch, length, kv, hd)
        q, q_cos, q_sin = qkv[..., : n * hd], cos, sin
        if query_index is not None:
            x, q, q_cos, q_sin = (jnp.take_along_axis(a, query_index[..., None], axis=1) for a in (x, q, cos, sin))
            mask = mask.for_queries(query_index)
        queries = x.shape[1]
        q = apply_rotary(q.reshape(batch, queries, n, hd), q_cos, q_sin)
        x = x + self.o_proj(attention(q, k, v, mask).reshape(batch, queries, n * hd))
        gate, up = jnp.split(self.gate_up_proj(self.post_attention_layernorm(x)), 2, axis=-1)
        return x + self.down_proj(self.act(gate) * up)


class TextDecoder(nnx.Module):
    """Embeddings (B, L, D) -> final hidden states (B, L, D), causal within each segment of the
    `attention_mask` (0/1 padding mask, or segment ids of packed rows)."""

    def __init__(
        self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, remat: bool, attention: str, rngs: nnx.Rngs
    ):
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = create_stack(
            lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_layers, rngs
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.cfg = cfg
        self.remat = remat
        self.attention = attention

    def _mask_and_rope(self, attention_mask: jnp.ndarray, position_ids: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        mask = SegmentMask.build(attention_mask, causal=True, implementation=self.attention)
        return (mask, *mrope(position_ids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section))

    def __call__(self, embeds: jnp.ndarray, attention_mask: jnp.ndarray, position_ids: jnp.ndarray) -> jnp.ndarray:
        x = scan_stack(self.layers, embeds, *self._mask_and_rope(attention_mask, position_ids), remat=self.remat)
        return self.norm(x)

    def pooled_states(
        self, embeds: jnp.ndarray, attention_mask: jnp.ndarray, position_ids: jnp.ndarray, query_index: jnp.ndarray
    ) -> jnp.ndarray:
        """Final hidden states (B, Q, D) of the tokens `query_index` (B, Q) names in each row (the
        pooled tokens: a row's last token, or each packed segment's), for inference: the last layer
        computes only those tokens (its MLP and output projection skip the other rows). Layers
        are indexed in a loop rather than scanned over, so the stack is never sliced (copied);
        gradients through this path would accumulate poorly, hence training uses `__call__`."""
        mask, cos, sin = self._mask_and_rope(attention_mask, position_ids)
        graphdef, state = nnx.split(self.layers)

        def layer(i: jnp.ndarray | int) -> DecoderLayer:
            return nnx.merge(graphdef, jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), state))

        last = self.cfg.num_layers - 1
        x = jax.lax.fori_loop(0, last, lambda i, x: layer(i)(x, mask, cos, sin), embeds)
        return self.norm(layer(last)(x, mask, cos, sin, query_index=query_index))
