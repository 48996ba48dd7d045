"""Where each parameter of a Flax backbone lives in a Hugging Face checkpoint: the rule type and
the helpers every backbone's table is written with.

One table per backbone serves import and export. A rule names a leaf of our state, the HF
tensor(s) it is made of and the HF shape of each, so a misshaped tensor is caught by name. A fused
leaf (`models/projection.py`: q|k|v, gate|up) holds its HF tensors side by side along its slot
axis (the second-last), `slots` giving each one's size there. Kernels are HF's (out, in) matrix
transposed and reshaped to our leaf's structured (*in, *out) shape (a row-major reshape: the
orders agree); a patch embedding's Conv3d weight flattens to a (patch_dim, embed) kernel.
"""

import dataclasses
import re

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One leaf of our state and its HF source tensors (`{i}` = layer index for stacked leaves)."""

    path: Path
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    is_kernel: bool
    layers: int | None = None
    slots: tuple[int, ...] | None = None  # each part's size along the leaf's slot axis (fused leaves)

    def hf_keys(self) -> list[tuple[str, tuple[int, ...], int | None, int]]:
        """(HF key, HF shape, layer index or None, part number) for every source tensor."""
        layer_ids = range(self.layers) if self.layers is not None else [None]
        return [
            (template.format(i=i), shape, i, part)
            for i in layer_ids
            for part, (template, shape) in enumerate(self.parts)
        ]

    def part_of(self, leaf: np.ndarray, part: int) -> np.ndarray:
        """The view of `leaf` (one layer's, or an unstacked leaf) that HF tensor `part` fills."""
        if self.slots is None:
            return leaf
        start = sum(self.slots[:part])
        return leaf[..., start : start + self.slots[part], :]


def linear_rules(
    path: Path, prefix: str, names: list[tuple[str, int]], fan_in: int, bias: bool, layers: int | None,
    slots: tuple[int, ...] | None = None,
) -> list[TensorRule]:
    """A linear's kernel (and bias) rules; several `names` (HF name, output width) make a fused
    leaf, `slots` their sizes along its slot axis."""
    if (len(names) > 1) != (slots is not None):
        raise ValueError(f"{'.'.join(path)}: a fused leaf (several HF tensors) needs slots, a plain one none")
    kernel = TensorRule(path + ("kernel",), tuple((f"{prefix}{n}.weight", (out, fan_in)) for n, out in names), True, layers, slots)
    if not bias:
        return [kernel]
    biases = TensorRule(path + ("bias",), tuple((f"{prefix}{n}.bias", (out,)) for n, out in names), False, layers, slots)
    return [kernel, biases]


def vector_rule(path: Path, key: str, dim: int, layers: int | None = None) -> TensorRule:
    return TensorRule(path, ((key, (dim,)),), False, layers)


def layer_norm_rules(path: Path, prefix: str, dim: int, layers: int | None = None) -> list[TensorRule]:
    return [vector_rule(path + ("scale",), f"{prefix}.weight", dim, layers), vector_rule(path + ("bias",), f"{prefix}.bias", dim, layers)]


# transformers 5.x names modules `model.visual.*` / `model.language_model.*` in memory (Qwen3-VL's
# checkpoints, and some tools, save that way); the hub files use `visual.*` / `model.*`. Rules are
# written in the hub layout. (hub prefix, in-memory prefix):
_LAYOUT_PREFIXES = (("visual.", "model.visual."), ("model.", "model.language_model."))
# Tensors an embedding model does not use: the LM head and stale rotary buffers of old exports.
IGNORED_KEYS = re.compile(r"^lm_head\.|\.rotary_emb\.inv_freq$")


def _swap_prefix(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def stored_key(key: str, layout: str) -> str:
    """A canonical (hub-layout) key as a checkpoint of `layout` ("hub" or "in_memory") names it."""
    return key if layout == "hub" else _swap_prefix(key, _LAYOUT_PREFIXES)


def canonical_key(key: str) -> str:
    """The hub-layout name of a checkpoint key written in either layout."""
    return _swap_prefix(key, tuple((memory, hub) for hub, memory in _LAYOUT_PREFIXES))
