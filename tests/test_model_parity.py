"""Each Flax backbone equals transformers' PyTorch model (float32, 1e-5) on the same checkpoint:
Qwen2-VL, and Qwen2.5-VL with window and full-attention vision blocks (`backbone_ckpt`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import HFReference
from jaxpr_inspect import checkpoint_primitive, dot_operand_dtypes, primitive_names
from tree_compare import assert_trees_close
from vlm2vec_jax.models.pooling import l2_normalize, last_token_pool
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

ATOL = 1e-5


@pytest.fixture(scope="module")
def hf(backbone_ckpt):
    return HFReference(str(backbone_ckpt))


@pytest.fixture(scope="module")
def ours(backbone_ckpt):
    return load_pretrained(backbone_ckpt)


@pytest.fixture(scope="module")
def forward(ours):
    return jax.jit(lambda batch: ours.hidden_states(batch))


# Two aspect ratios, both under max_pixels: grids [1,8,4] and [1,4,8] patches (8 merged tokens each),
# plus a larger 4:3 one.
IMAGES = [tiny_image(100, 60, 1), tiny_image(56, 120, 2), tiny_image(90, 120, 3)]


def _close(mine: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> None:
    mine, ref = np.asarray(mine), np.asarray(ref)
    if mask is not None:
        mine, ref = mine[mask], ref[mask]
    assert np.abs(ref).max() > 0.5, "reference output is degenerate; the comparison would prove nothing"
    np.testing.assert_allclose(mine, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rows", ["packed", "per_image"])
def test_vision_tower_matches_transformers(hf, ours, rows):
    ref = hf.build([["x ", 0, " y ", 1, " z ", 2]], IMAGES, rows=rows)
    with torch.no_grad():
        expected = hf.model.model.visual(ref.hf_inputs["pixel_values"], grid_thw=ref.hf_inputs["image_grid_thw"]).pooler_output.numpy()
    merged = ours.visual(ref.ours["pixel_values"], ref.ours["patch_positions"], ref.ours["patch_segment_ids"])
    index = ref.ours["image_token_index"]
    _close(np.asarray(merged)[index[index >= 0]], expected)


SEQUENCES = {
    "one_image": [["Represent the given image ", 0, " for classification."]],
    "two_images_one_sequence": [["Compare ", 0, " with ", 1, " please."]],
    "text_only": [["A photo of a dog running on the green grass in the park."]],
    "image_only": [[2]],
    "mixed_batch": [
        ["Represent the given image ", 0, " for classification."],
        ["A red car is parked next to a small white house."],
        [1, " what color?"],
        ["Two images ", 2, " and ", 0],
    ],
}


@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_hidden_states_and_embeddings_match_transformers(hf, forward, name, left_pad):
    ref = hf.build(SEQUENCES[name], IMAGES, left_pad=left_pad)
    expected = hf.hidden_states(ref)
    hidden = forward(ref.ours)
    _close(hidden, expected, ref.mask)
    pooled = l2_normalize(last_token_pool(hidden, ref.ours["attention_mask"]))
    last = ref.mask.shape[1] - 1 - np.argmax(ref.mask[:, ::-1], axis=1)
    ref_pooled = torch.nn.functional.normalize(torch.tensor(expected[np.arange(len(last)), last]), dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled, atol=ATOL, rtol=0)


def test_legacy_positions_match_transformers_given_the_same_positions(hf, forward):
    """VLM2Vec's rule: with no <|vision_start|>, image tokens get plain sequential positions."""
    ref = hf.build(SEQUENCES["mixed_batch"], IMAGES)
    sequential = np.where(ref.mask, np.cumsum(ref.mask, axis=1) - 1, 0).astype(np.int32)
    legacy = np.broadcast_to(sequential, (3, *sequential.shape)).copy()
    assert not np.array_equal(legacy, ref.ours["position_ids"]), "the two rules must differ on this batch"
    expected = hf.hidden_states(ref, position_ids=torch.tensor(legacy, dtype=torch.long))
    _close(forward({**ref.ours, "position_ids": legacy}), expected, ref.mask)


def test_remat_gives_the_same_gradients_and_is_applied(backbone_ckpt, hf):
    """remat cannot change a forward; what it could break is the backward (recomputed activations
    used wrongly). Gradients of a loss on the embeddings must match without remat, leaf by leaf, and
    the rematted gradient must really contain checkpointed (recomputed) calls."""
    ref = hf.build(SEQUENCES["mixed_batch"], IMAGES)
    grads, primitives = {}, {}
    for remat in (False, True):
        model = load_pretrained(backbone_ckpt, remat=remat)
        shape = jax.eval_shape(model, ref.ours).shape
        direction = np.random.default_rng(0).normal(size=shape).astype(np.float32)  # loss = <embeddings, direction>
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest, direction=direction):
            return jnp.sum(nnx.merge(graphdef, p, rest)(ref.ours) * direction)

        grads[remat] = jax.jit(jax.grad(loss))(params)
        primitives[remat] = primitive_names(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    checkpoint = checkpoint_primitive()
    assert checkpoint in primitives[True] and checkpoint not in primitives[False], primitives[True] ^ primitives[False]
    assert_trees_close(grads[True], grads[False], rtol=1e-5, what="gradients with remat against without")
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[False])) > 1e-3  # not a comparison of zeros


def test_bfloat16_computes_in_bfloat16_and_stays_close(backbone_ckpt, hf, forward):
    ref = hf.build(SEQUENCES["mixed_batch"], IMAGES)
    expected = hf.hidden_states(ref)
    bf16 = load_pretrained(backbone_ckpt, dtype="bfloat16")
    # Every matmul (projections, attention, MLP, both towers) takes bfloat16 operands: a model that
    # upcast to float32 would not.
    dots = dot_operand_dtypes(jax.make_jaxpr(bf16.hidden_states)(ref.ours).jaxpr)
    assert len(dots) > 10 and set(dots) == {("bfloat16", "bfloat16")}, dots
    raw = jax.jit(bf16.hidden_states)(ref.ours)
    assert raw.dtype == jnp.bfloat16
    hidden = np.asarray(raw).astype(np.float32)
    cos = np.sum(hidden * expected, -1) / (np.linalg.norm(hidden, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cos[ref.mask].min() > 0.99
    # Numerically too: far from the float32 forward (which equals transformers to ATOL), i.e. rounded to bfloat16.
    assert np.abs(hidden - np.asarray(forward(ref.ours)))[ref.mask].max() > 100 * ATOL


@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
def test_pooled_last_layer_equals_the_full_stack(ours, hf, left_pad):
    """Training (`__call__`) and inference (`embed`) compute the last decoder layer for the pooled
    tokens only; both must equal pooling the whole stack's hidden states."""
    ref = hf.build(SEQUENCES["mixed_batch"], IMAGES, left_pad=left_pad)
    mask = ref.ours["attention_mask"]
    full = np.asarray(jax.jit(lambda b: l2_normalize(last_token_pool(ours.hidden_states(b), mask)))(ref.ours))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda b: ours(b))(ref.ours)), full, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.jit(ours.embed)(ref.ours)), full, atol=ATOL, rtol=0)
