"""Prints JSON: the forward of a tiny checkpoint (argv[1]) with its parameters split over a
2-device 'tensor' mesh axis by their logical axes, against the same forward on one device, and the
cross-device collectives the compiled program holds. argv[2] names the axis rules: "model" (ours:
heads and MLP columns), or "slot", a deliberate fault that splits fused projections along their
slot axis instead (q heads on one device, keys and values on the other; gate on one, up on the
other: what a contiguous column split of [q|k|v] and [gate|up] did), to show the check sees it.
Run as a subprocess so XLA_FLAGS can set the device count."""

import json
import sys
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hlo_collectives import _INSTRUCTION  # noqa: E402

from vlm2vec_jax.embedder import Embedder  # noqa: E402
from vlm2vec_jax.models.logical_axes import FUSED  # noqa: E402
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image  # noqa: E402
from vlm2vec_jax.training import sharding  # noqa: E402
from vlm2vec_jax.training.placement import place  # noqa: E402
from vlm2vec_jax.training.state import param_shardings  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")

checkpoint, rules = sys.argv[1], sys.argv[2]
if rules == "slot":
    sharding.LOGICAL_AXIS_RULES = ((FUSED, "tensor"),)
mesh = sharding.make_mesh(data=1, fsdp=1, tensor=2)
embedder = Embedder.from_pretrained(checkpoint)
items = [
    "a text-only query about a cat",
    {"text": "<|image_pad|> what is shown here?", "image": tiny_image(56, 84, seed=1)},
    {"image": tiny_image(112, 56, seed=2)},
    "a much longer text-only target that goes on for a while to make the rows differ in length",
]
_, batch = next(embedder.batches(items, len(items)))
graphdef, state = nnx.split(embedder.model)


def hidden(state: nnx.State, batch: dict) -> jax.Array:
    return nnx.merge(graphdef, state).hidden_states(batch)


forward = jax.jit(hidden)
single = np.asarray(forward(state, batch))
shardings = param_shardings(state, mesh)
placed = place(state, shardings)
replicated = jax.device_put(batch, NamedSharding(mesh, P()))
compiled = forward.lower(placed, replicated).compile()
split = np.asarray(compiled(placed, replicated))
ops = Counter()
for line in compiled.as_text().splitlines():
    match = _INSTRUCTION.match(line)
    if match:
        op = match.group(2).removesuffix("-start")
        if op in COLLECTIVES:
            ops[op] += 1
specs = {
    "/".join(str(k.key) for k in path if hasattr(k, "key")): list(s.spec)
    for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
}
real = np.asarray(batch["attention_mask"]) > 0
print(json.dumps({
    "max_diff": float(np.abs(split - single)[real].max()),
    "scale": float(np.abs(single[real]).max()),
    "collectives": dict(ops),
    "specs": specs,
}))
