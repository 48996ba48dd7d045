"""Prints JSON: the packed training step against the padded one on the same batch, for several
GradCache chunk sizes, on however many (simulated) devices this process has; then the same with
one deliberate fault injected into the packed layout at a time, to show the comparison sees it.

The batch has images on both sides, hard negatives, a duplicate target, a bad (empty, masked) row
and LoRA+DoRA with dropout on. Run as a subprocess so XLA_FLAGS can set the device count."""

import copy
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_fixtures import contrastive_batch, perturbed_dora  # noqa: E402
from hlo_collectives import step_reductions  # noqa: E402

from vlm2vec_jax.data.packing import PackBudget, pack_record  # noqa: E402
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402
from vlm2vec_jax.processing.image import ImageProcessorConfig  # noqa: E402
from vlm2vec_jax.training.forward import make_embed_factory, make_vision_factory  # noqa: E402
from vlm2vec_jax.training.placement import device_batch, place  # noqa: E402
from vlm2vec_jax.training.sharding import batch_size_of, make_mesh  # noqa: E402
from vlm2vec_jax.training.state import abstract_train_state, init_train_state, param_shardings  # noqa: E402
from vlm2vec_jax.training.step import StepOptions, make_train_step, num_chunks  # noqa: E402

QUERIES, HARD_NEGATIVES, TEMPERATURE, LENGTH = 16, 1, 0.05, 48
BAD_QUERY = 5


def blank(inputs: dict, row: int) -> None:
    """Make padded sequence `row` all padding, as the pipeline leaves a skipped row."""
    inputs["attention_mask"][row] = 0
    inputs["image_token_index"][row] = -1
    inputs["position_ids"][:, row] = 0
    if inputs["patch_segment_ids"].shape[0]:
        inputs["patch_segment_ids"][row] = 0
        inputs["pixel_values"][row] = 0


def training_batch(checkpoint: Path) -> dict:
    batch = contrastive_batch(checkpoint, QUERIES, HARD_NEGATIVES, length=LENGTH)
    n = 1 + HARD_NEGATIVES
    batch["valid"][BAD_QUERY] = False
    blank(batch["query"], BAD_QUERY)
    for j in range(BAD_QUERY * n, (BAD_QUERY + 1) * n):
        batch["target_valid"][j] = False
        batch["target_key"][j] = -1
        blank(batch["target"], j)
    batch["rows"] = np.arange(QUERIES)
    return batch


def leaf_errors(got, expected) -> float:
    """The largest per-leaf relative error: a wrong small leaf is not hidden by a large one."""
    errors = jax.tree.map(
        lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30)),
        got, expected,
    )
    return max(jax.tree.leaves(errors))


def global_error(got, expected) -> float:
    """|got - expected| / |expected| over all leaves at once (what the GradCache check states)."""
    diff = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)))
    return float(np.sqrt(diff / sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(expected))))


def inject(packed: dict, fault: str) -> dict:
    """One wrong packed layout: what a bug in the packer or the model would produce."""
    p = copy.deepcopy(packed)
    arrays = p["packed"]
    if fault == "segment_mask":  # every row one segment: sequences see the ones packed before them
        arrays["attention_mask"] = (arrays["attention_mask"] > 0).astype(np.int32)
    elif fault == "position":  # 1-D positions for every token, images included: M-RoPE lost
        # (a constant shift of a sequence's positions would be invisible: rotary attention is relative)
        arrays["position_ids"] = np.repeat(arrays["token_position"][:, :, None], 3, axis=2)
    elif fault == "pooled_index":  # pool the token before each sequence's last
        arrays["pool_index"] = np.maximum(arrays["pool_index"] - 1, 0)
    elif fault == "dropout_key":  # dropout positions counted along the row, not the sequence
        length = arrays["token_position"].shape[-1]
        arrays["token_position"] = np.broadcast_to(np.arange(length, dtype=np.int32), arrays["token_position"].shape).copy()
    return p


FAULTS = ("segment_mask", "position", "pooled_index", "dropout_key")


def main(chunk_sizes: list[int]) -> None:
    checkpoint = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "ckpt", max_pixels=56 * 56 * 4)
    image_config = ImageProcessorConfig.from_pretrained_dir(checkpoint)
    graphdef, params, frozen = perturbed_dora(checkpoint)
    batch = training_batch(checkpoint)
    mesh = make_mesh(-1, 1, 1)
    shards = batch_size_of(mesh)
    sgd = optax.sgd(1.0)  # params after one step = params - gradient
    abstract = abstract_train_state(params, sgd, mesh)
    placed_frozen = place(frozen, param_shardings(frozen, mesh))
    key = jax.random.key(3)

    steps = {}  # one compiled step per chunk size and layout: the faults reuse the packed one

    def run(record: dict, chunk: int):
        layout = (chunk, "packed" in record)
        state = init_train_state(place(params, jax.tree.map(lambda a: a.sharding, abstract.params)), sgd, abstract)
        inputs = (state, placed_frozen, device_batch(record, mesh), key)
        if layout not in steps:
            steps[layout] = make_train_step(
                make_embed_factory(graphdef, dropout=True, image_config=image_config), sgd, optax.constant_schedule(1.0),
                StepOptions(TEMPERATURE, chunk, mask_duplicate_targets=True), mesh, abstract,
                param_shardings(frozen, mesh), record,
                # packed, as training runs it: the frozen tower's features computed once per chunk
                make_vision_factory(graphdef, image_config=image_config) if "packed" in record else None,
            ).lower(*inputs).compile()
        state, metrics = steps[layout](*inputs)
        grads = jax.tree.map(lambda before, after: np.asarray(before, np.float64) - np.asarray(after), params, state.params)
        return grads, {k: float(v) for k, v in metrics.items()}

    results = {"devices": jax.device_count(), "chunks": {}, "faults": {}}
    for chunk in chunk_sizes:
        budget = PackBudget.covering(
            queries=QUERIES // shards, targets=QUERIES * (1 + HARD_NEGATIVES) // shards, query_len=LENGTH,
            target_len=LENGTH, patches_per_row=batch["query"]["patch_segment_ids"].shape[1], query_images=True,
            target_images=True, gc_chunks=num_chunks(QUERIES // shards, chunk),
        )
        packed = pack_record(batch, budget, shards=shards, first_query=0, first_target=0, global_queries=QUERIES)
        expected, expected_metrics = run(batch, chunk)
        got, got_metrics = run(packed, chunk)
        results["chunks"][str(chunk)] = {
            "gradient": global_error(got, expected),
            "worst_leaf": leaf_errors(got, expected),
            "metrics": {k: abs(got_metrics[k] - v) / max(abs(v), 1e-30) for k, v in expected_metrics.items()},
            "num_chunks": packed["packed"]["num_chunks"].tolist(),
            "capacity": budget.chunks,
            "tokens": expected_metrics["tokens"],
            "reductions": step_reductions(steps[(chunk, True)].as_text(), abstract.params, mesh),
        }
        if chunk == chunk_sizes[-1]:
            for fault in FAULTS:
                results["faults"][fault] = leaf_errors(run(inject(packed, fault), chunk)[0], expected)
    print(json.dumps(results))


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]])
