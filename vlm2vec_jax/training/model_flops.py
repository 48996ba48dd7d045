"""Analytic matmul FLOPs of the LoRA training step, per sequence at its own length.

Why: the compiled step's count (`throughput.StepFlops`, read off the traced program) says what a
step executes, padding and packing waste included; this formula says what the same model would
compute for each sequence alone, so `executed / useful` measures the layout's waste (a dry run's
`flops_useful`). One formula serves both the dry run and `tests/test_dry_run.py`, which checks it
against the traced count of a padded step of full-length sequences.

Per sequence of T tokens (text plus image tokens) with an image of P patches (P = 0 without one),
with h the decoder's attention width (heads x head_dim: its hidden size, except in decoders like
Qwen3-VL-4B's), L its layers, W the MACs of its fused linears per token (q, k, v, o, gate, up,
down), split as W = Wqkv + Wrest, R those of the rank-r adapters (R = Rqkv + Rrest), and b = 2 where
DoRA with dropout multiplies the dropped input by the base kernel again (else 1):

    forward  F(T) = (L - 1) T (b W + R + 2 T h) + T (b Wqkv + Rqkv) + (b Wrest + Rrest + 2 T h)
    backward B(T) = (L - 1) T (b W + 2 R + 4 T h) + T (b Wqkv + 2 Rqkv) + (b Wrest + 2 Rrest + 4 T h)
    vision   V(P) = P p d + D P (4 d^2 + k d m) + 2 P A(P) d + (P / u) (d u)^2 + (P / u) d u h

The last decoder layer computes q, k and v for every token (keys and values are needed) and the
rest for the pooled token only (`TextDecoder.pooled_states`). (p = patch_dim, d = vision width,
m = its MLP width with k matrices (2; Qwen2.5-VL's SwiGLU 3), D its depth, A(P) the patches a patch
attends to summed over the blocks (D P; Qwen2.5-VL's window blocks one window each), u = merge
units.) A step runs the decoder forward `1 + caching + remat` times (GradCache's first pass, its
second, the recompute) and backward once; the frozen tower runs forward only, and once: its
features are the same in both GradCache passes (the packed step keeps them, `train.cache_vision`;
`vision_passes=2` describes the fixed-shape step, which runs it in both):

    FLOPs(sequence) = 2 x [(1 + caching + remat) F(T) + B(T) + V(P)]

The loss (a batch x batch matrix) and DoRA's per-call weight norms are left out (< 1% at the
recipes' sizes).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from vlm2vec_jax.models.backbones import ModelConfig


@dataclasses.dataclass(frozen=True)
class FlopsModel:
    """The formula's settings for one training configuration (module docstring)."""

    geometry: ModelConfig
    rank: int
    base_passes: int = 2  # b: 2 for DoRA with dropout (the recipes), else 1
    caching: bool = True  # GradCache (train.gc_chunk_size > 0): a first forward without gradients
    remat: bool = True  # model.remat: the backward recomputes the forward
    vision_passes: int = 1  # forwards of the frozen tower per sequence (2: the fixed-shape GradCache step)

    @classmethod
    def of(cls, config: ml_collections.ConfigDict, geometry: ModelConfig) -> FlopsModel:
        """The formula for `config`; ValueError naming the key where it does not apply (it counts
        adapters on a frozen decoder and a frozen vision tower, as the recipes train)."""
        t, lora = config.train, config.lora
        if t.mode != "lora":
            raise ValueError(f"the useful-FLOPs formula covers train.mode='lora' only (got {t.mode!r})")
        if not t.freeze_vision:
            raise ValueError("the useful-FLOPs formula covers a frozen vision tower only (train.freeze_vision=True)")
        return cls(
            geometry, lora.rank, base_passes=2 if lora.dora and lora.dropout > 0 else 1,
            caching=t.gc_chunk_size > 0, remat=bool(config.model.remat),
        )

    def _decoder_terms(self) -> tuple[int, tuple[int, int], tuple[int, int], int]:
        """(layers, (Wqkv, Wrest), (Rqkv, Rrest), attention width h): the module docstring's terms."""
        t = self.geometry.text
        h, q, kv, inter = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.intermediate_size
        linears = (h * (q + 2 * kv), q * h + 2 * h * inter + inter * h)
        adapters = (self.rank * (2 * h + q + 2 * kv), self.rank * (q + h + 2 * (h + inter) + (inter + h)))
        return t.num_layers, linears, adapters, q

    def decoder(self, tokens: np.ndarray | int, pooled: int = 1) -> np.ndarray:
        """FLOPs of the decoder for sequences (or packed rows) of `tokens` tokens each (one value per
        sequence), `pooled` of whose tokens the last layer computes in full."""
        layers, (w_qkv, w_rest), (r_qkv, r_rest), h = self._decoder_terms()
        b, n = self.base_passes, np.asarray(tokens, np.float64)
        w, r = w_qkv + w_rest, r_qkv + r_rest
        forward = (layers - 1) * n * (b * w + r + 2 * n * h) + n * (b * w_qkv + r_qkv) + pooled * (b * w_rest + r_rest + 2 * n * h)
        backward = (layers - 1) * n * (b * w + 2 * r + 4 * n * h) + n * (b * w_qkv + 2 * r_qkv) + pooled * (b * w_rest + 2 * r_rest + 4 * n * h)
        return 2.0 * ((1 + self.caching + self.remat) * forward + backward)

    def vision(self, patches: np.ndarray | int) -> np.ndarray:
        """FLOPs of the frozen vision tower for images of `patches` patches each (0: no image)."""
        v, h = self.geometry.vision, self.geometry.text.hidden_size
        d, u = v.embed_dim, v.merge_units
        p = np.asarray(patches, np.float64)
        merged = d * u
        tower = p * v.patch_dim * d + v.depth * p * (4 * d * d + v.mlp_matrices * d * v.mlp_dim) + 2 * p * v.attended_patches(p) * d
        tower += p / u * (merged * merged + merged * h)
        return 2.0 * self.vision_passes * tower

    def sequences(self, tokens: np.ndarray, patches: np.ndarray) -> float:
        """Total FLOPs of a batch of sequences, each alone at its own length with its own image."""
        return float(np.sum(self.decoder(tokens)) + np.sum(self.vision(patches)))

    def padded_step(self, *, sequences: int, length: int, patches: int) -> float:
        """A fixed-shape step: every sequence padded to `length` tokens and a `patches` vision row."""
        return sequences * float(self.decoder(length) + self.vision(patches))
