"""The Qwen2 decoder: token embedding, scanned GQA decoder layers with M-RoPE, final RMSNorm.

q|k|v and gate|up are fused into one matmul each: fewer, larger GEMMs are faster on every backend,
and the checkpoint importer splits/joins them at the boundary.
"""

import jax.numpy as jnp
from flax import nnx

from vlm2vec_jax.models.qwen2_vl.config import TextConfig
from vlm2vec_jax.models.qwen2_vl.layers import RMSNorm, activation, attention, create_stack, linear, scan_stack
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

    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
        batch, length, _ = x.shape
        n, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        q = apply_rotary(qkv[..., : n * hd].reshape(batch, length, n, hd), cos, sin)
        k = apply_rotary(qkv[..., n * hd : (n + kv) * hd].reshape(batch, length, kv, hd), cos, sin)
        v = qkv[..., (n + kv) * hd :].reshape(batch, length, kv, hd)
        x = x + self.o_proj(attention(q, k, v, mask).reshape(batch, length, n * hd))
        gate, up = jnp.split(self.gate_up_proj(self.post_attention_layernorm(x)), 2, axis=-1)
        return x + self.down_proj(self.act(gate) * up)


class TextDecoder(nnx.Module):
    """Embeddings (B, L, D) -> final hidden states (B, L, D), causal with a padding mask."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, remat: bool, rngs: nnx.Rngs):
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

    def __call__(self, embeds: jnp.ndarray, attention_mask: jnp.ndarray, position_ids: jnp.ndarray) -> jnp.ndarray:
        length = embeds.shape[1]
        valid = attention_mask.astype(bool)
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, L, L)
        cos, sin = mrope(position_ids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section)
        x = scan_stack(self.layers, embeds, mask, cos, sin, remat=self.remat)
        return self.norm(x)
