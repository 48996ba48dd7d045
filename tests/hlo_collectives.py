"""The cross-device reductions of a compiled XLA program, and whether each runs inside a loop.

Read from the optimized HLO text (`jax.stages.Compiled.as_text()`): every computation a `while`
body reaches (through calls, fusions, conditionals and nested loops) is "in a loop". This is what
the training step's claim is about: the GradCache chunk loops accumulate gradients with no
collective, and the one reduction of the gradients runs after them."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm2vec_jax.training.sharding import zero2_spec

# all-reduce, reduce-scatter and their async halves (all-reduce-start, ...); not all-gather.
REDUCTIONS = ("all-reduce", "reduce-scatter")
# A computation's header starts in column 0 and opens its body: `[ENTRY ]%name (params) -> type {`
# (instructions are indented; types may hold `/*index=N*/` comments, so "=" tells nothing).
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b(?:pred|[subfc]\d+|bf16|f8\w*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:body|condition|calls|to_apply|branch_computations|called_computations)=\{?([%\w.\-, ]+)\}?")


@dataclass(frozen=True)
class Reduction:
    op: str  # "all-reduce", "reduce-scatter" (an async "-start" counts as its op)
    computation: str
    shapes: tuple[tuple[int, ...], ...]  # of its result (several for a combined reduction)
    in_loop: bool


def _shapes(result_type: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(result_type))


def reductions(hlo_text: str) -> list[Reduction]:
    """Every all-reduce / reduce-scatter of the program, with its result shapes and loop membership."""
    calls: dict[str, set[str]] = {}
    loop_bodies: set[str] = set()
    found: list[tuple[str, str, tuple]] = []
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            calls.setdefault(current, set())
            continue
        instruction = _INSTRUCTION.match(line)
        if current is None or instruction is None:
            continue
        result_type, op = instruction.groups()
        for group in _CALLED.findall(line):
            calls[current].update(name.strip().lstrip("%") for name in group.split(",") if name.strip())
        if op == "while":
            body = re.search(r"\bbody=%?([\w.\-]+)", line)
            condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
            loop_bodies.update(m.group(1) for m in (body, condition) if m)
        base = op.removesuffix("-start")
        if base in REDUCTIONS:
            # an async start's result is (operands, results[, context]): its last arrays are the results
            shapes = _shapes(result_type)
            found.append((base, current, shapes[len(shapes) // 2:] if op.endswith("-start") else shapes))
    in_loop, frontier = set(), list(loop_bodies)
    while frontier:
        name = frontier.pop()
        if name not in in_loop:
            in_loop.add(name)
            frontier.extend(calls.get(name, ()))
    return [Reduction(op, computation, shapes, computation in in_loop) for op, computation, shapes in found]


def by_place(found: list[Reduction]) -> dict[str, list]:
    """JSON: {"in_loop": [[op, shapes, computation]...], "outside": [[op, shapes]...]}."""
    return {
        "in_loop": [[r.op, r.shapes, r.computation] for r in found if r.in_loop],
        "outside": [[r.op, r.shapes] for r in found if not r.in_loop],
    }


def step_reductions(hlo_text: str, params: Any, mesh: Mesh) -> dict[str, list]:
    """JSON for a test: the training step's reductions in and out of loops ([op, result shapes]),
    and for each trainable leaf of `params` its gradient's ZeRO-2 shard on one device and its full
    shape (the layout `sharding.zero2_spec` gives the step's gradients)."""
    shard = lambda p: NamedSharding(mesh, zero2_spec(p.shape, mesh)).shard_shape(p.shape)  # noqa: E731
    gradients = [[list(shard(p)), list(p.shape)] for p in jax.tree.leaves(params)]
    return {**by_place(reductions(hlo_text)), "gradients": gradients}


def assert_gradients_reduced_once_after_the_loops(summary: dict[str, list], what: str) -> None:
    """No all-reduce / reduce-scatter inside any loop (a per-chunk reduction of gradients would be
    one), and after the loops each trainable leaf's gradient reduced exactly once: a reduce-scatter
    to its ZeRO-2 shard, or an all-reduce where no dimension divides over the devices."""
    assert not summary["in_loop"], f"{what}: reductions inside loops: {summary['in_loop'][:5]}"
    scattered = Counter(tuple(s) for op, shapes in summary["outside"] if op == "reduce-scatter" for s in shapes)
    all_reduced = Counter(tuple(s) for op, shapes in summary["outside"] if op == "all-reduce" for s in shapes)
    sharded = Counter(tuple(shard) for shard, full in summary["gradients"] if shard != full)
    replicated = Counter(tuple(full) for shard, full in summary["gradients"] if shard == full)
    assert sharded, f"{what}: no gradient leaf is sharded, so nothing shows a reduce-scatter"
    assert scattered == sharded, f"{what}: reduce-scatters {dict(scattered)} but gradient shards {dict(sharded)}"
    missing = replicated - all_reduced
    assert not missing, f"{what}: no all-reduce for replicated gradient leaves {dict(missing)}"


def canary(mesh: Mesh) -> dict[str, list]:
    """`reductions` of a known program on `mesh`'s devices: a psum inside a fori_loop and a
    psum_scatter after it. A test asserts it finds both where they are, so a parser that missed
    loops or reductions in this XLA's text could not pass the step's check vacuously."""
    axis = mesh.axis_names[0]
    devices = mesh.shape[axis]

    def program(x: jax.Array) -> jax.Array:
        total = jax.lax.fori_loop(0, jax.lax.axis_index(axis) + 2, lambda i, acc: acc + jax.lax.psum(x * i, axis), x)
        return jax.lax.psum_scatter(total, axis, scatter_dimension=1, tiled=True)

    one_axis = Mesh(mesh.devices.reshape(-1), (axis,))
    step = jax.jit(jax.shard_map(program, mesh=one_axis, in_specs=P(axis), out_specs=P(axis)))
    x = jax.ShapeDtypeStruct((devices, 4 * devices), jnp.float32, sharding=NamedSharding(one_axis, P(axis)))
    return by_place(reductions(step.lower(x).compile().as_text()))
