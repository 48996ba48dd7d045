"""What a traced program computes, read from its jaxpr (nested ones included: jit, scan, checkpoint)."""

from __future__ import annotations

import jax
import jax.extend.core


def primitive_names(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, nested ones (jitted calls, scan bodies, checkpointed calls) included."""
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    for sub in jax.extend.core.subjaxprs(jaxpr):
        names |= primitive_names(sub)
    return names


def checkpoint_primitive() -> str:
    """The name of `jax.checkpoint`'s primitive in this jax ('remat2'; 'checkpoint' in others)."""
    import jax.numpy as jnp

    (name,) = primitive_names(jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).jaxpr) - {"sin"}
    return name


def dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot_general (matmul) in a jaxpr, nested ones included."""
    found = [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found += dot_operand_dtypes(sub)
    return found
