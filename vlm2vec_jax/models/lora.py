"""LoRA and DoRA adapters on the decoder's projections (every backbone's), numerically PEFT's.

VLM2Vec and B3 train PEFT `LoraConfig(use_dora=True, r=8|16, lora_alpha=64, lora_dropout=0.1)` on
the language model's q/k/v/o/gate/up/down projections. Where adapters may go is the model's word
(`VisionLanguageModel.lora_sites`); our decoder fuses q|k|v and gate|up into one stacked (scanned)
`Projection` each, so one `LoRALinear` wraps a fused projection and adapts each targeted group on
its own, flattened to the (fan in, width) matrix of the HF linear, exactly as PEFT adapts the
separate linears; untargeted groups stay plain. Adapter A/B/magnitude keep PEFT's flat shapes
with a leading layer axis like the rest of the stack, and name their axes after the kernel's.

Dropout is a pure function of (step key, example id, position of the token inside its own
sequence, layer, target): never of which other sequences share the batch or the row, nor of the
padding, so GradCache chunks, packed rows, sharded and single-device runs all draw the same masks.
The keys are set per token in `LoRADropoutKeys` variables shaped (layers, batch, length, key) so
that the scan over layers slices them like parameters; a zero-size batch axis means no dropout,
which is also the state right after `apply_lora`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from vlm2vec_jax.models.logical_axes import BATCH, FUSED, LAYERS, LENGTH, LORA_RANK, axes_of, param
from vlm2vec_jax.models.projection import Projection
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel

# PEFT's target names, in a fixed order: a target's index here is its dropout stream.
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """PEFT's LoraConfig subset VLM2Vec uses; the update is scaled by alpha / rank (not rsLoRA)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = HF_TARGETS
    use_dora: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in HF_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets: {list(HF_TARGETS)}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets must be non-empty and distinct, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAParam(nnx.Param):
    """A trainable adapter parameter (A, B, DoRA magnitude): filter on this type to train only the
    adapters. It subclasses `nnx.Param`, so a filter for frozen base weights must exclude it."""


class LoRADropoutKeys(nnx.Variable):
    """Per-layer, per-token dropout key data (layers, batch, length, *key_shape); batch 0 = no dropout."""


class LoRAGroup(nnx.Module):
    """The adapter of one HF projection: A (layers, in, r), B (layers, r, out) and, for DoRA, the
    magnitude (layers, out). Stored float32 whatever the base dtype, as PEFT's
    `autocast_adapter_dtype` does, so the optimizer updates small values precisely."""

    def __init__(self, a: jax.Array, b: jax.Array, magnitude: jax.Array | None, in_axis: str | None, out_axis: str | None):
        self.a = param(a, (LAYERS, in_axis, LORA_RANK), LoRAParam)
        self.b = param(b, (LAYERS, LORA_RANK, out_axis), LoRAParam)
        self.magnitude = param(magnitude, (LAYERS, out_axis), LoRAParam) if magnitude is not None else None


def dropout(x: jax.Array, keys: jax.Array, stream: int, rate: float) -> jax.Array:
    """Inverted dropout (torch's nn.Dropout) of x (B, L, D): token (b, t)'s mask is drawn from its
    own key keys[b, t] folded with `stream`, so it depends on nothing else in the batch."""

    def keep(key_data: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), stream)
        return jax.random.bernoulli(key, 1.0 - rate, x.shape[-1:])

    mask = jax.vmap(jax.vmap(keep))(keys)
    return x * jnp.where(mask, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)


def _adapted_kernel(kernel: jax.Array, group: LoRAGroup, scale: float) -> jax.Array:
    """W + scale * A B in float32, for the DoRA norm and for merging."""
    return kernel.astype(jnp.float32) + scale * (group.a[...] @ group.b[...])


def _layout(base: Projection, names: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """(HF name, start, size) of each linear `base` holds along its slot axis (0, 0: all of it)."""
    names = tuple(names)
    if base.groups is None:
        if len(names) != 1:
            raise ValueError(f"a plain projection holds one linear, not {list(names)}")
        return ((names[0], 0, 0),)
    layout = tuple((name, start, size) for name, start, size in base.group_layout())
    if tuple(name for name, _, _ in layout) != names:
        raise ValueError(f"the projection holds {[n for n, _, _ in layout]}, not {list(names)}")
    return layout


class LoRALinear(nnx.Module):
    """A stacked `Projection` whose targeted groups (HF linears) carry LoRA/DoRA updates."""

    def __init__(self, base: Projection, names: Sequence[str], config: LoRAConfig, rngs: nnx.Rngs):
        self.base = base
        self.layout = _layout(base, names)
        self.config = config  # static: what `lora_config_of` returns (and a PEFT export writes)
        self.scale, self.rate, self.use_dora = config.scale, config.dropout, config.use_dora
        kernel = base.kernel[...]
        layers, fan_in = kernel.shape[0], base.fan_in
        # adapter axes: the kernel's leading input axis, its leading output axis past the slot axis
        kernel_axes = axes_of(base.kernel)[1:]
        in_axis = kernel_axes[0]
        out_axis = next(a for a in kernel_axes[len(base.in_shape):] if a != FUSED)
        groups = {}
        for name, start, size in self.layout:
            if name in config.targets:
                columns = base.flat_kernel(base.select(kernel, start, size)).astype(jnp.float32)  # (layers, in, width)
                # PEFT's init_lora_weights=True: kaiming_uniform_(a=sqrt(5)) on A, i.e. U(+-1/sqrt(in)); B = 0.
                bound = 1.0 / math.sqrt(fan_in)
                a = jax.random.uniform(rngs.params(), (layers, fan_in, config.rank), jnp.float32, -bound, bound)
                b = jnp.zeros((layers, config.rank, columns.shape[-1]), jnp.float32)
                # DoRA's magnitude starts at the column norm of W (+ the zero update).
                magnitude = jnp.linalg.norm(columns, axis=1) if config.use_dora else None
                groups[name] = LoRAGroup(a, b, magnitude, in_axis, out_axis)
        self.lora = nnx.Dict(groups)
        key_shape = jax.random.key_data(jax.random.key(0)).shape
        keys = jnp.zeros((layers, 0, 0, *key_shape), jnp.uint32)
        self.dropout_keys = param(keys, (LAYERS, BATCH, LENGTH) + (None,) * len(key_shape), LoRADropoutKeys)

    def __call__(self, x: jax.Array) -> jax.Array:
        """One layer's slice (the stack is scanned or indexed first): x (B, ..., in) -> (B, ..., out)."""
        y = self.base(x)
        keys = self.dropout_keys[...]
        if self.rate == 0.0 or keys.shape[0] == 0:
            keys = None
        elif keys.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"LoRA dropout keys were set for {keys.shape[0]} x {keys.shape[1]} tokens but the input has "
                f"{x.shape[0]} x {x.shape[1]}; call set_lora_dropout with this batch's example ids and positions "
                "(a layer computing only some tokens selects theirs: Projection.select_tokens)"
            )
        pieces = []
        for name, start, size in self.layout:
            piece = self.base.select(y, start, size)
            if name in self.lora:
                piece = piece + self._update(name, x, piece, start, size, keys).reshape(piece.shape)
            pieces.append(piece)
        return self.base.join(pieces)

    def select_tokens(self, query_index: jax.Array) -> None:
        """The dropout keys of the tokens `query_index` (B, Q) names in each row, for a layer that
        computes only those: each keeps its own mask (this is one layer's slice, keys (B, L, key))."""
        keys = self.dropout_keys[...]
        if keys.shape[0]:
            self.dropout_keys.set_value(jnp.take_along_axis(keys, query_index[..., None], axis=1))

    def _update(self, name: str, x: jax.Array, base_out: jax.Array, start: int, size: int, keys: jax.Array | None) -> jax.Array:
        """What PEFT's Linear.forward adds to base(x) for one target (lora/layer.py, lora/dora.py),
        on the flat (..., fan in) input and (..., width) output of the HF linear."""
        group = self.lora[name]
        base, x = self.base, self.base.flat_input(x)
        if keys is not None:
            x = dropout(x, keys, HF_TARGETS.index(name), self.rate)
        kernel = base.flat_kernel(base.select(base.kernel[...], start, size))
        x, a, b, kernel = promote_dtype((x, group.a[...], group.b[...], kernel), dtype=base.dtype)
        lora = ((x @ a) @ b) * self.scale
        if not self.use_dora:
            return lora
        # PEFT detaches ||W + scale A B||: the norm is a constant of the step (DoRA paper, sec. 4.3).
        norm = jax.lax.stop_gradient(jnp.linalg.norm(_adapted_kernel(kernel, group, self.scale), axis=0))
        s = (group.magnitude[...] / norm).astype(lora.dtype)
        if keys is None:  # PEFT reuses base(x) without its bias when no dropout is applied
            plain = base_out if base.bias is None else base_out - base.select(base.bias[...], start, size).astype(base_out.dtype)
            plain = plain.reshape(lora.shape)
        else:
            plain = x @ kernel
        return (s - 1) * plain + s * lora

    def merged_kernel(self) -> jax.Array:
        """The stacked kernel with every update folded in: W + scale A B for LoRA, and for DoRA
        (m / ||W + scale A B||) (W + scale A B) per output column (PEFT's merge)."""
        base, kernel = self.base, self.base.kernel[...]
        pieces = []
        for name, start, size in self.layout:
            piece = base.select(kernel, start, size)
            if name in self.lora:
                group = self.lora[name]
                adapted = _adapted_kernel(base.flat_kernel(piece), group, self.scale)
                if self.use_dora:
                    adapted = adapted * (group.magnitude[...] / jnp.linalg.norm(adapted, axis=1))[:, None, :]
                piece = adapted.reshape(piece.shape).astype(kernel.dtype)
            pieces.append(piece)
        return base.join(pieces)


def apply_lora(model: VisionLanguageModel, config: LoRAConfig, rngs: nnx.Rngs) -> None:
    """Wrap (in place) each of the model's LoRA sites holding a target in a `LoRALinear`; the
    vision tower is untouched. Dropout is off until `set_lora_dropout` is called with example ids."""
    for owner, attribute, names in model.lora_sites():
        base = getattr(owner, attribute)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{attribute} already has adapters; merge_lora first")
        if any(name in config.targets for name in names):
            setattr(owner, attribute, LoRALinear(base, names, config, rngs))


def lora_adapters(model: nnx.Module) -> Iterator[LoRALinear]:
    """Every adapter module of the model (each holds the same dropout keys)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            yield node


def has_lora(model: nnx.Module) -> bool:
    """Whether the model carries any adapter (e.g. it came from a PEFT adapter directory)."""
    return next(lora_adapters(model), None) is not None


def lora_config_of(model: nnx.Module) -> LoRAConfig:
    """The `LoRAConfig` the model's adapters were built with (rank, alpha, dropout, targets, DoRA),
    read back from the modules so an export needs nothing but the model."""
    configs = {adapter.config for adapter in lora_adapters(model)}
    if not configs:
        raise ValueError("the model has no LoRA adapters; call apply_lora first")
    if len(configs) > 1:
        raise ValueError(f"the model's adapters were built with different configs: {sorted(map(repr, configs))}")
    return configs.pop()


def sequence_positions(attention_mask: jax.Array) -> jax.Array:
    """(B, L) index of each token among its row's real tokens (0 at padding): a row's position inside
    its own sequence whatever the padding side, the dropout position of an unpacked row."""
    real = attention_mask > 0
    return jnp.where(real, jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)


def set_lora_dropout(model: nnx.Module, key: jax.Array, example_ids: jax.Array | None, positions: jax.Array | None = None) -> None:
    """Draw dropout for this forward from `key` (typed or raw, default PRNG), each token's example
    id (stable identifiers, e.g. global positions in the step's batch; (B,) for one example per row
    or (B, L) per token) and `positions` (B, L), the token's index inside its own sequence
    (`sequence_positions` for padded rows; packed rows bring their own): keys[l, b, t] =
    fold_in(fold_in(fold_in(key, example), position), l). `example_ids=None` turns dropout off; do
    so for inference. Traceable, so it can run inside jit / scan bodies on a merged model."""
    adapters = list(lora_adapters(model))
    if not adapters:
        raise ValueError("the model has no LoRA adapters; call apply_lora first")
    layers = adapters[0].dropout_keys[...].shape[0]
    if example_ids is None:
        data = jnp.zeros((layers, 0, 0, *adapters[0].dropout_keys[...].shape[3:]), jnp.uint32)
    else:
        ids = jnp.asarray(example_ids)
        if positions is None or jnp.ndim(positions) != 2:
            raise ValueError("set_lora_dropout needs positions (B, L) with the example ids: see sequence_positions")
        if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2) or ids.shape[0] != positions.shape[0]:
            raise ValueError(f"example_ids must be integers shaped (B,) or (B, L), got shape {ids.shape} dtype {ids.dtype}")
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        ids = jnp.broadcast_to(ids if ids.ndim == 2 else ids[:, None], positions.shape)
        fold = jax.vmap(jax.random.fold_in)
        per_token = fold(fold(jnp.broadcast_to(key, ids.size), ids.reshape(-1)), jnp.asarray(positions).reshape(-1))
        per_layer = jax.vmap(lambda l: fold(per_token, jnp.full(ids.size, l)))(jnp.arange(layers))
        data = jax.random.key_data(per_layer).reshape(layers, *ids.shape, -1)
    for adapter in adapters:
        adapter.dropout_keys.set_value(data)


def merge_lora(model: VisionLanguageModel) -> None:
    """Fold every adapter into its base kernel and put the plain nnx.Linear back (in place), so
    `hf_export.save_pretrained` writes an ordinary checkpoint of the backbone."""
    merged = False
    for owner, attribute, _ in model.lora_sites():
        adapter = getattr(owner, attribute)
        if isinstance(adapter, LoRALinear):
            adapter.base.kernel.set_value(adapter.merged_kernel())
            setattr(owner, attribute, adapter.base)
            merged = True
    if not merged:
        raise ValueError("the model has no LoRA adapters to merge")


def lora_parameter_count(model: nnx.Module) -> int:
    """Number of trainable adapter values (A, B and DoRA magnitudes)."""
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, LoRAParam)))
