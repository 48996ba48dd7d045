"""Prints JSON: relative gradient errors of the training step against full-batch autodiff, for
several GradCache chunk sizes, on however many (simulated) devices this process has.

Run as a subprocess so XLA_FLAGS can set the device count before jax starts."""

import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_fixtures import contrastive_batch, perturbed_dora  # noqa: E402
from hlo_collectives import canary, step_reductions  # noqa: E402
from tree_compare import leaf_errors, worst_leaf  # noqa: E402

from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402
from vlm2vec_jax.training.chunks import relative_image_index  # noqa: E402
from vlm2vec_jax.processing.image import ImageProcessorConfig  # noqa: E402
from vlm2vec_jax.training.forward import make_embed_factory  # noqa: E402
from vlm2vec_jax.training.placement import device_batch, place  # noqa: E402
from vlm2vec_jax.training.loss import infonce  # noqa: E402
from vlm2vec_jax.training.sharding import make_mesh  # noqa: E402
from vlm2vec_jax.training.state import abstract_train_state, init_train_state, param_shardings  # noqa: E402
from vlm2vec_jax.training.step import StepOptions, make_train_step  # noqa: E402

QUERIES, HARD_NEGATIVES, TEMPERATURE = 16, 1, 0.05


def relative(a, b) -> dict:
    """|a - b| / |b| over all leaves at once ("global"), and the worst leaf's relative error
    max|a - b| / max|b| (tree_compare.leaf_errors: leaf by leaf, so a wrong small leaf is not hidden
    by a large one) with its path."""
    diff = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)
    overall = float(optax.global_norm(diff) / optax.global_norm(jax.tree.map(lambda y: np.asarray(y, np.float64), b)))
    path, error = worst_leaf(leaf_errors(a, b))
    return {"global": overall, "leaf_error": error, "leaf": path}


def main(chunk_sizes: list[int]) -> None:
    checkpoint = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "ckpt", max_pixels=56 * 56 * 4)
    image_config = ImageProcessorConfig.from_pretrained_dir(checkpoint)
    graphdef, params, frozen = perturbed_dora(checkpoint)
    batch = contrastive_batch(checkpoint, QUERIES, HARD_NEGATIVES)
    key = jax.random.key(3)
    step_key = jax.random.fold_in(key, 0)

    def reference(dropout: bool):
        embed = make_embed_factory(graphdef, dropout=dropout, image_config=image_config)(frozen, step_key)
        query, target = (relative_image_index({k: jnp.asarray(v) for k, v in batch[s].items()}) for s in ("query", "target"))
        targets = len(batch["target_valid"])

        def loss(p):
            q = embed(p, query, jnp.arange(QUERIES))
            t = embed(p, target, QUERIES + jnp.arange(targets))
            return infonce(q, t, jnp.asarray(batch["valid"]), jnp.asarray(batch["target_valid"]), TEMPERATURE,
                           jnp.asarray(batch["target_key"]))[0]

        return jax.jit(jax.grad(loss))(params)

    expected = reference(dropout=True)
    results = {
        "devices": jax.device_count(), "dropout_effect": relative(reference(dropout=False), expected)["leaf_error"], "errors": {},
        "reductions": {},
    }
    mesh = make_mesh(-1, 1, 1)
    results["canary"] = canary(mesh)
    sgd = optax.sgd(1.0)  # params after one step = params - gradient
    abstract = abstract_train_state(params, sgd, mesh)
    for chunk in chunk_sizes:
        step = make_train_step(
            make_embed_factory(graphdef, dropout=True, image_config=image_config), sgd, optax.constant_schedule(1.0),
            StepOptions(TEMPERATURE, chunk, mask_duplicate_targets=True), mesh, abstract, param_shardings(frozen, mesh), batch,
        )
        state = init_train_state(place(params, jax.tree.map(lambda a: a.sharding, abstract.params)), sgd, abstract)
        inputs = (state, place(frozen, param_shardings(frozen, mesh)), device_batch(batch, mesh), key)
        compiled = step.lower(*inputs).compile()
        state, _ = compiled(*inputs)
        got = jax.tree.map(lambda before, after: np.asarray(before) - np.asarray(after), params, state.params)
        results["errors"][str(chunk)] = relative(got, expected)
        results["reductions"][str(chunk)] = step_reductions(compiled.as_text(), abstract.params, mesh)
    print(json.dumps(results))


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]])
