"""Per-leaf relative comparison of pytrees (parameters after training, gradients), naming the worst leaf.

One global norm over all leaves lets a large leaf hide a wrong small one, and an absolute tolerance
can exceed what training moved a parameter; here every leaf is measured against its own scale:

- gradients: max|got - expected| / max|expected| per leaf;
- parameters after training (`initial` given): max|got - expected| / max|expected - initial| per
  leaf, i.e. against how far training moved that leaf.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _flat(tree: Any) -> dict[str, np.ndarray]:
    import jax

    if type(tree) is dict and all(isinstance(v, (np.ndarray, jax.Array)) for v in tree.values()):
        return {str(k): np.asarray(v, np.float64) for k, v in tree.items()}  # already flat ({'a/b': array})
    return {jax.tree_util.keystr(path): np.asarray(x, np.float64) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_errors(got: Any, expected: Any, initial: Any = None) -> dict[str, float]:
    """Leaf path -> relative error (see the module docstring). A leaf whose scale is 0 (did not move,
    or an all-zero gradient) has error 0 if it matches exactly and inf otherwise."""
    a, b = _flat(got), _flat(expected)
    assert a.keys() == b.keys(), f"different leaves: only in got {sorted(a.keys() - b.keys())}, only in expected {sorted(b.keys() - a.keys())}"
    start = _flat(initial) if initial is not None else None
    if start is not None:
        assert start.keys() == b.keys(), f"initial has other leaves: {sorted(start.keys() ^ b.keys())}"
    errors = {}
    for path, want in b.items():
        assert a[path].shape == want.shape, f"{path}: shape {a[path].shape} != {want.shape}"
        if want.size == 0:
            errors[path] = 0.0
            continue
        diff = float(np.abs(a[path] - want).max())
        scale = float(np.abs(want - start[path] if start is not None else want).max())
        errors[path] = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return errors


def worst_leaf(errors: dict[str, float]) -> tuple[str, float]:
    path = max(errors, key=lambda p: errors[p])
    return path, errors[path]


def assert_trees_close(got: Any, expected: Any, *, rtol: float, initial: Any = None, what: str = "trees") -> float:
    """Every leaf's relative error <= rtol; the failure names the worst leaf. Returns the worst error."""
    errors = leaf_errors(got, expected, initial)
    path, error = worst_leaf(errors)
    against = "its movement from the initial value" if initial is not None else "its largest magnitude"
    assert error <= rtol, (
        f"{what}: worst leaf {path}: max|difference| is {error:.3g} of {against} (> {rtol:g}); "
        f"{sum(e > rtol for e in errors.values())} of {len(errors)} leaves over"
    )
    return error
