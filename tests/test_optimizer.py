"""The optimizer's claims (README, "Optimizer"): no weight decay on biases, norms and DoRA magnitudes,
warmup then linear, cosine or constant learning rates, global-norm clipping before AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train_fixtures import perturbed_dora
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.logical_axes import axes_of
from vlm2vec_jax.training.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from vlm2vec_jax.training.trainable import split_for_training

ADAM = dict(b1=0.9, b2=0.999)


def path_of(path: tuple) -> str:
    return jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def trainable_trees(tiny_ckpt) -> dict[str, object]:
    """The trainable parameters of full fine-tuning and of DoRA on the tiny real checkpoint."""
    _, full, _ = split_for_training(load_pretrained(tiny_ckpt), "full", False)
    _, dora, _ = perturbed_dora(tiny_ckpt)
    return {"full": full, "dora": dora}


@pytest.mark.parametrize("mode", ["full", "dora"])
def test_weight_decay_applies_to_matrices_only(trainable_trees, mode) -> None:
    """Biases, norm scales and DoRA magnitudes are the vectors of the tree; every matrix (kernels,
    embeddings, LoRA A and B) decays. One AdamW step on zero gradients then moves exactly the
    decayed leaves, by lr * decay * value."""
    params = trainable_trees[mode]
    mask = dict((path_of(p), m) for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params)))
    variables = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    axes = {path_of(p) + ".value": axes_of(v) for p, v in variables}

    def is_matrix(path: str) -> bool:
        """Maps one space to another: its axes span two of them, a head's axes (heads, kv heads,
        head_dim) being one space, the layer and fused-slot axes none."""
        spaces = {"head" if "head" in name else name for name in axes[path] if name not in ("layers", "fused")}
        return len(spaces) >= 2

    wrong = {path: axes[path] for path, decays in mask.items() if decays != is_matrix(path)}
    assert not wrong, f"{mode}: decay mask disagrees with the leaf's kind for {wrong}"
    # full fine-tuning trains biases and norms; DoRA trains adapters and magnitudes
    for kind in ("bias", "norm") if mode == "full" else ("magnitude",):
        assert any(kind in path.lower() and not mask[path] for path in mask), f"no undecayed {kind} leaf in {mode}"

    lr, decay = 0.1, 0.5
    optimizer = make_optimizer(optax.constant_schedule(lr), weight_decay=decay, clip_norm=0.0, eps=1e-8, **ADAM)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    for (path, update), (_, value) in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree_util.tree_leaves_with_path(params)):
        expected = -lr * decay * np.asarray(value) if mask[path_of(path)] else np.zeros_like(value)
        np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-12, err_msg=path_of(path))


@pytest.mark.parametrize(
    "decay,values",
    [
        # warmup 0 -> peak over 10 steps, then over the remaining 90 steps
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 40: 0.5 * (1 + math.cos(math.pi / 3)), 55: 0.5, 100: 0.0}),
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 100: 1.0}),
    ],
)
def test_learning_rate_schedules_after_warmup(decay, values) -> None:
    peak = 2e-4
    schedule = learning_rate_schedule(peak, total_steps=100, warmup_steps=10, decay=decay)
    got = {step: float(schedule(step)) / peak for step in values}
    assert got == pytest.approx(values, abs=1e-6)


def test_an_unknown_schedule_names_the_key() -> None:
    with pytest.raises(ValueError, match="train.schedule"):
        learning_rate_schedule(1e-4, 100, 10, "exponential")


def test_clipping_scales_the_gradient_to_the_norm_before_adamw() -> None:
    """With a large epsilon AdamW's first update depends on the gradient's scale, so clipping shows:
    the update of a gradient of norm 50 equals that of the same gradient scaled to norm 1, and not
    the unclipped one's; clip_norm=0 leaves it unclipped."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    grads = jax.tree.map(lambda g: g * 50.0 / optax.global_norm(grads), grads)

    def first_update(clip_norm: float, g) -> dict:
        optimizer = make_optimizer(optax.constant_schedule(1.0), weight_decay=0.0, clip_norm=clip_norm, eps=1.0, **ADAM)
        return optimizer.update(g, optimizer.init(params), params)[0]

    unit = jax.tree.map(lambda g: g / optax.global_norm(grads), grads)
    clipped, expected, unclipped = first_update(1.0, grads), first_update(0.0, unit), first_update(0.0, grads)
    for name in params:
        np.testing.assert_allclose(clipped[name], expected[name], rtol=1e-5)
        assert not np.allclose(clipped[name], unclipped[name], rtol=1e-2)
