"""Attention over rows of segments: which tokens see each other is said by segment ids, and the
kernel that computes it is chosen per backend.

Every row the model sees, padded or packed, is a sequence of segment ids (B, L): 1, 2, ... for
the sequences packed in it, 0 for padding. A token attends to the tokens of its own segment,
causally in the decoder, all of them in the vision tower. Implementations (`model.attention`):

- "dense": the masked matmuls below, the boolean (B, 1, L, L) mask built once per forward. The
  CPU default: XLA's CPU GEMMs run it 1.6-1.7x faster than `jax.nn.dot_product_attention`.
- "xla": `jax.nn.dot_product_attention` with the same mask. The GPU default (cuDNN's fused
  kernel where it applies).
- "splash": the Pallas splash-attention kernel with segment ids, the TPU default: no L x L
  mask or logits in memory, and the causal blocks above the diagonal are skipped. Off TPU it runs
  in Pallas' interpret mode (slow; what the tests use to check it equals "dense").

Padding queries are never read by the model (pooling and image gathers index real tokens), so
each kernel may give them any finite value: "dense" lets them see nothing (a uniform row),
"splash" lets them see earlier padding (its kernel needs no all-masked rows).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS: tuple[str, ...] = ("auto", "dense", "xla", "splash")
AUTO_BY_BACKEND = {"cpu": "dense", "gpu": "xla", "tpu": "splash"}
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (rounded-up) row length is used
SPLASH_PAD_SEGMENT = -1  # rows are padded to a block multiple with tokens of their own segment


def resolve(implementation: str) -> str:
    """The kernel "auto" means on the default backend; an unknown name is a clear error."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return AUTO_BY_BACKEND.get(jax.default_backend(), "dense")
    return implementation


@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Who sees whom in a batch of rows: segment ids (B, L), causal or not, and the kernel. The
    dense boolean mask (B, 1, L, L) exists only for the kernels that read it, built once here,
    outside the scan over layers."""

    segment_ids: jax.Array
    causal: bool
    implementation: str
    dense: jax.Array | None = None

    @classmethod
    def build(cls, segment_ids: jax.Array, *, causal: bool, implementation: str) -> SegmentMask:
        kernel = resolve(implementation)
        dense = None if kernel == "splash" else dense_mask(segment_ids, causal=causal)
        return cls(segment_ids, causal, kernel, dense)

    def where(self, flag: jax.Array, other: SegmentMask) -> SegmentMask:
        """This mask where the traced boolean `flag` holds, else `other` (same kernel and shape):
        how a scanned layer picks its own mask from two built once outside the scan."""
        dense = None if self.dense is None else jnp.where(flag, self.dense, other.dense)
        return SegmentMask(jnp.where(flag, self.segment_ids, other.segment_ids), self.causal, self.implementation, dense)

    def for_queries(self, query_index: jax.Array) -> SegmentMask:
        """The mask of only the tokens `query_index` (B, Q) names as queries (keys: every token),
        dense whatever the kernel: Q x L is small, and splash needs square causal blocks."""
        query_segment = jnp.take_along_axis(self.segment_ids, query_index, axis=1)
        sees = _sees(query_segment, query_index, self.segment_ids, causal=self.causal)
        return SegmentMask(query_segment, self.causal, "dense", sees)


def dense_mask(segment_ids: jax.Array, *, causal: bool) -> jax.Array:
    """(B, L) -> boolean (B, 1, L, L): q sees k iff both lie in the same segment and k is not
    padding (segment 0), and k <= q when causal. A 0/1 attention mask is the one-segment case."""
    return _sees(segment_ids, jnp.arange(segment_ids.shape[1])[None], segment_ids, causal=causal)


def _sees(
    query_segment: jax.Array, query_position: jax.Array, key_segment: jax.Array, *, causal: bool
) -> jax.Array:
    """The one rule: queries (B, Q) at row positions (B or 1, Q) see keys (B, L) of their own
    segment that are not padding, and none after them when causal; -> (B, 1, Q, L)."""
    sees = (query_segment[:, :, None] == key_segment[:, None, :]) & (key_segment > 0)[:, None, :]
    if causal:
        sees &= jnp.arange(key_segment.shape[1])[None, None, :] <= query_position[:, :, None]
    return sees[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask) -> jax.Array:
    """Softmax attention, q (B, T, N, H), k/v (B, S, K, H) with K dividing N (grouped queries),
    scaled by H^-0.5, logits and softmax in float32; -> (B, T, N, H)."""
    if mask.implementation == "splash":
        return splash_attention(q, k, v, mask.segment_ids, causal=mask.causal)
    if mask.implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense)
    return dense_attention(q, k, v, mask.dense)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked attention as two batched matmuls. Heads are moved to the front once and the G = N/K
    query heads sharing a key head are stacked along the query axis, so there are no repeated
    keys; a fully masked row gives a finite (uniform) result, never NaN."""
    batch, t, n, h = q.shape
    kv = k.shape[2]
    groups = n // kv
    q = q.reshape(batch, t, kv, groups, h).transpose(0, 2, 3, 1, 4).reshape(batch, kv, groups * t, h)
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # (B, K, H, S), (B, K, S, H)
    scores = jnp.matmul(q, k, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = scores.reshape(batch, kv, groups, t, -1)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(batch, kv, groups * t, -1)
    out = jnp.matmul(probs, v).reshape(batch, kv, groups, t, h)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, t, n, h)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, causal: bool) -> jax.Array:
    """The Pallas splash kernel per row (vmapped over B), grouped queries native. Rows are padded
    to a multiple of the block with a segment of their own, then cut back. Under a mesh the
    partitioner cannot split a Pallas call, so the rows are split over the mesh in `shard_map`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    batch, length, heads, head_dim = q.shape
    padded = -(-length // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q * head_dim**-0.5, k, v))  # (B, heads, L, H)
    ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded - length)], constant_values=SPLASH_PAD_SEGMENT)
    kernel = _splash_kernel(heads, padded, causal, interpret=jax.default_backend() != "tpu")

    def rows(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array) -> jax.Array:
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(q, k, v, ids)

    return _rows_over_mesh(rows, batch)(q, k, v, ids).transpose(0, 2, 1, 3)[:, :length]


def _rows_over_mesh(fn, batch: int):
    """`fn` of row-major arrays, run per shard of rows over the context mesh's automatic axes (as
    many as divide `batch`; the rest see every row); as it is where no mesh is set or inside
    `shard_map` already."""
    mesh = jax.sharding.get_abstract_mesh()
    free = [] if mesh.empty else [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual]
    if not free:
        return fn
    axes, size = [], 1
    for axis in free:
        if batch % (size * mesh.shape[axis]) == 0:
            axes.append(axis)
            size *= mesh.shape[axis]
    spec = P(tuple(axes)) if axes else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, axis_names=set(free), check_vma=False)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, length: int, causal: bool, *, interpret: bool):
    """One kernel per (heads, row length, causal): its block-sparsity tables are built from the
    static mask once, as concrete arrays even when first asked for inside a trace (a cached kernel
    holding a trace's values would leak them into the next trace)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    shape = (length, length)
    head_mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            masks.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )

