"""The Qwen2 decoder: token embedding, scanned GQA decoder layers with M-RoPE, final RMSNorm; and,
by its config, Qwen3's (no q/k/v bias, RMSNorm of each head's q and k, interleaved M-RoPE), with
DeepStack (vision features added to the first layers' outputs at image tokens) when given.

q|k|v and gate|up are fused into one matmul each (fewer, larger GEMMs are faster on every
backend), laid out by attention group and MLP column (`models/projection.py`) so that a tensor-
parallel split keeps each device's heads and columns whole; the checkpoint importer splits/joins
them at the boundary.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from vlm2vec_jax.models.attention import SegmentMask, attention
from vlm2vec_jax.models.logical_axes import EMBED, FUSED, HEAD_DIM, HEADS, KV_HEADS, MLP, VOCAB, metadata
from vlm2vec_jax.models.projection import Projection
from vlm2vec_jax.models.qwen2_vl.config import TextConfig
from vlm2vec_jax.models.qwen2_vl.layers import RMSNorm, activation, create_stack, layer_at, linear, loop_stack, scan_stack
from vlm2vec_jax.models.qwen2_vl.rope import apply_rotary, mrope


def deepstack_residual(deepstack: jnp.ndarray, layer_index: jnp.ndarray, query_index: jnp.ndarray | None) -> jnp.ndarray:
    """What layer `layer_index` (traced) adds to its output: DeepStack level `layer_index` (B, L, D)
    of the (levels, B, L, D) features (zero off image tokens), nothing past the last level."""
    levels = deepstack.shape[0]
    add = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(layer_index, levels - 1), keepdims=False)
    if query_index is not None:
        add = jnp.take_along_axis(add, query_index[..., None], axis=1)
    return jnp.where(layer_index < levels, add, jnp.zeros_like(add))


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: grouped-query attention (q/k/v biased, o not; Qwen3: no bias, q and
    k RMS-normalised per head before the rotation) and a SwiGLU MLP."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        dims = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, hd, kv = cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads
        per_kv = cfg.num_heads // kv
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
        # per key/value head: the query heads that read it, then its key, then its value
        self.qkv_proj = Projection(
            (d,), (kv, per_kv + 2, hd), (EMBED, KV_HEADS, FUSED, HEAD_DIM), bias=cfg.attention_bias,
            groups=(("q_proj", per_kv), ("k_proj", 1), ("v_proj", 1)), **dims,
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, axis=HEAD_DIM)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, axis=HEAD_DIM)
        self.qk_norm = cfg.qk_norm
        self.o_proj = Projection((cfg.num_heads, hd), (d,), (HEADS, HEAD_DIM, EMBED), bias=False, **dims)
        self.gate_up_proj = Projection(
            (d,), (2, cfg.intermediate_size), (EMBED, FUSED, MLP), bias=False,
            groups=(("gate_proj", 1), ("up_proj", 1)), **dims,
        )
        self.down_proj = linear(cfg.intermediate_size, d, (MLP, EMBED), bias=False, **dims)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.act = activation(cfg.hidden_act)

    def __call__(
        self,
        x: jnp.ndarray,
        mask: SegmentMask,
        cos: jnp.ndarray,
        sin: jnp.ndarray,
        deepstack: jnp.ndarray | None = None,
        layer_index: jnp.ndarray | None = None,
        query_index: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """(B, L, D) -> (B, L, D); with `query_index` (B, Q), only those Q tokens of each row are
        computed (keys and values still cover every token) and the result is (B, Q, D). With
        `deepstack` (levels, B, L, D), this layer (number `layer_index`) adds its level, if any."""
        batch, length, _ = x.shape
        n, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        per_kv = n // kv
        qkv = self.qkv_proj(self.input_layernorm(x))  # (B, L, kv, per_kv + 2, hd)
        k = apply_rotary(self.k_norm(qkv[..., per_kv, :]) if self.qk_norm else qkv[..., per_kv, :], cos, sin)
        v = qkv[..., per_kv + 1, :]
        # query head g * per_kv + j reads key/value head g, as transformers' repeat_kv has it
        q, q_cos, q_sin = qkv[..., :per_kv, :].reshape(batch, length, n * hd), cos, sin
        if query_index is not None:
            x, q, q_cos, q_sin = (jnp.take_along_axis(a, query_index[..., None], axis=1) for a in (x, q, cos, sin))
            mask = mask.for_queries(query_index)
            for projection in (self.o_proj, self.gate_up_proj, self.down_proj):
                projection.select_tokens(query_index)
        queries = x.shape[1]
        q = q.reshape(batch, queries, n, hd)
        q = apply_rotary(self.q_norm(q) if self.qk_norm else q, q_cos, q_sin)
        x = x + self.o_proj(attention(q, k, v, mask))
        gate_up = self.gate_up_proj(self.post_attention_layernorm(x))
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        x = x + self.down_proj(self.act(gate) * up)
        if deepstack is not None:
            x = x + deepstack_residual(deepstack, layer_index, query_index).astype(x.dtype)
        return x


class TextDecoder(nnx.Module):
    """Embeddings (B, L, D) -> final hidden states (B, L, D), causal within each segment of the
    `attention_mask` (0/1 padding mask, or segment ids of packed rows)."""

    # The layer projections adapters may wrap, and the HF linears each holds (PEFT's names).
    LORA_SITES: ClassVar[dict[str, tuple[str, ...]]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "o_proj": ("o_proj",),
        "gate_up_proj": ("gate_proj", "up_proj"),
        "down_proj": ("down_proj",),
    }

    def __init__(
        self, cfg: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype, remat: bool, attention: str, rngs: nnx.Rngs
    ):
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata=metadata((VOCAB, EMBED)),
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
        rope = mrope(position_ids, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section, self.cfg.mrope_interleaved)
        return (mask, *rope)

    def __call__(
        self, embeds: jnp.ndarray, attention_mask: jnp.ndarray, position_ids: jnp.ndarray, deepstack: jnp.ndarray | None = None
    ) -> jnp.ndarray:
        """`deepstack` (levels, B, L, D): added to the outputs of layers 0 .. levels - 1."""
        args = self._mask_and_rope(attention_mask, position_ids)
        if deepstack is None:
            x = scan_stack(self.layers, embeds, *args, remat=self.remat)
        else:
            x = scan_stack(self.layers, embeds, *args, deepstack, remat=self.remat, per_layer=jnp.arange(self.cfg.num_layers))
        return self.norm(x)

    def pooled_states(
        self,
        embeds: jnp.ndarray,
        attention_mask: jnp.ndarray,
        position_ids: jnp.ndarray,
        query_index: jnp.ndarray,
        deepstack: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Final hidden states (B, Q, D) of the tokens `query_index` (B, Q) names in each row (the
        pooled tokens: a row's last token, or each packed segment's), for training and inference
        alike: the last layer computes only those tokens (its output projection and MLP skip every
        other one, 1/L of the decoder's FLOPs; keys and values still cover the row). Layers
        0 .. L-2 run in a loop that indexes the stack in place (`loop_stack`), then the last
        layer from its own slice."""
        mask, cos, sin = self._mask_and_rope(attention_mask, position_ids)
        last = self.cfg.num_layers - 1
        x = loop_stack(self.layers, embeds, last, lambda layer, x, i: layer(x, mask, cos, sin, deepstack, i), remat=self.remat)
        final = layer_at(self.layers, last)(x, mask, cos, sin, deepstack, jnp.asarray(last), query_index=query_index)
        return self.norm(final)
