"""LoRA/DoRA adapters: equal to PEFT's on transformers' Qwen2-VL (float32, 1e-5), mergeable into a
plain checkpoint, and with dropout that depends on the example, never on the batch around it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, inject_adapter_in_model
from transformers import Qwen2VLForConditionalGeneration

from hf_reference import HFReference, Reference
from vlm2vec_jax.models.qwen2_vl.text import TextDecoder
from vlm2vec_jax.models.lora import (
    HF_TARGETS,
    LoRAConfig,
    LoRAParam,
    apply_lora,
    dropout,
    lora_adapters,
    lora_parameter_count,
    merge_lora,
    sequence_positions,
    set_lora_dropout,
)
from vlm2vec_jax.models.pooling import l2_normalize, last_token_pool
from vlm2vec_jax.models.hf_export import save_pretrained
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

LORA_SITES = TextDecoder.LORA_SITES  # the decoder's adapter sites and the HF linears each holds

ATOL = 1e-5
# Training mode adds the dropped-out (1/(1-p)-scaled) input's product to hidden states up to ~4 in
# size, where a float32 ULP is ~5e-7: on some CPUs' XLA code one entry in ~5000 lands at 21 ULPs
# (1.02e-5) from float64 PEFT. A wrong mask or formula moves them by > 1e-3 (asserted below).
ATOL_TRAINING = 2e-5
GRAD_RTOL = 1e-5  # float32 gradients against float64 PEFT, relative to the largest entry
IMAGES = [tiny_image(100, 60, 1), tiny_image(56, 120, 2)]
SEQUENCES = [
    ["Represent the given image ", 0, " for classification."],
    ["A red car is parked next to a small white house."],
    [1, " what color?"],
    ["Two images ", 1, " and ", 0],
    ["The quick brown fox jumps over the lazy dog."],
]
# alpha != rank, so a missing or inverted scale shows.
CONFIGS = {
    "lora": LoRAConfig(rank=4, alpha=8.0, dropout=0.1),
    "dora": LoRAConfig(rank=4, alpha=8.0, dropout=0.1, use_dora=True),
    "lora_partial": LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj")),
    "dora_partial": LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("k_proj", "v_proj", "up_proj"), use_dora=True),
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def hf(tiny_ckpt) -> HFReference:
    return HFReference(str(tiny_ckpt))


@pytest.fixture(scope="module")
def batch(hf) -> Reference:
    return hf.build(SEQUENCES[:4], IMAGES)


# ----------------------------------------------------------------------------- PEFT side
def peft_lora_config(config: LoRAConfig, **overrides) -> LoraConfig:
    """PEFT's LoraConfig for ours, targeting the language model's projections only (a regex; pass
    `target_modules=[...]` for the plain list of names that shared adapters carry)."""
    targets = "|".join(config.targets)
    options = dict(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        use_dora=config.use_dora,
        target_modules=rf"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({targets})",
    )
    return LoraConfig(**{**options, **overrides})


def randomize_peft_adapters(ref: HFReference, use_dora: bool, seed: int) -> None:
    """Random float32 A, B (nonzero) and perturbed DoRA magnitudes on every PEFT module of `ref`,
    so that every adapter term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_modules(ref).values():
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=gen) / math.sqrt(a.shape[1]))
            b.copy_(0.5 * torch.randn(b.shape, generator=gen) / math.sqrt(b.shape[1]))
            if use_dora:
                m = module.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=gen))


def peft_reference(ckpt, config: LoRAConfig, seed: int | None = 0) -> HFReference:
    """transformers' model with PEFT adapters on the language model, run in float64 so that the
    reference carries no rounding noise of its own (float32 PEFT and float32 ours each sit ~6e-6
    from it and so up to ~1.2e-5 from each other). With a seed, A, B and the magnitudes are
    randomised (float32 values) so every adapter term matters."""
    ref = HFReference(str(ckpt))
    inject_adapter_in_model(peft_lora_config(config), ref.model)
    ref.model.eval()
    if seed is not None:
        randomize_peft_adapters(ref, config.use_dora, seed)
    ref.model.double()
    return ref


def peft_hidden_states(ref: HFReference, batch: Reference) -> np.ndarray:
    """PEFT's last hidden states in float64 (inputs cast up), returned as float32."""
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.hf_inputs.items()}
    with torch.no_grad():
        return ref.model.model(**inputs).last_hidden_state.numpy().astype(np.float32)


def peft_modules(ref: HFReference) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, HF target) -> PEFT's LoRA Linear."""
    out = {}
    for i, layer in enumerate(ref.model.model.language_model.layers):
        for name in HF_TARGETS:
            module = getattr(layer.self_attn if name in ATTENTION else layer.mlp, name)
            if hasattr(module, "lora_A"):
                out[(i, name)] = module
    return out


def ours_from_peft(ckpt, config: LoRAConfig, ref: HFReference, **load_options) -> nnx.Module:
    """Our model with adapters holding PEFT's values: A (r, in) -> (in, r), B (out, r) -> (r, out),
    stacked over layers."""
    model = load_pretrained(ckpt, **load_options)
    apply_lora(model, config, nnx.Rngs(0))
    modules = peft_modules(ref)
    layers = model.language_model.layers
    for fused, names in LORA_SITES.items():
        for name in names:
            if name not in config.targets:
                continue
            group = getattr(layers, fused).lora[name]
            per_layer = [modules[(i, name)] for i in range(group.a[...].shape[0])]
            group.a.set_value(jnp.stack([m.lora_A["default"].weight.detach().float().numpy().T for m in per_layer]))
            group.b.set_value(jnp.stack([m.lora_B["default"].weight.detach().float().numpy().T for m in per_layer]))
            if config.use_dora:
                group.magnitude.set_value(jnp.stack([m.lora_magnitude_vector["default"].weight.detach().float().numpy() for m in per_layer]))
    return model


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(l2_normalize(last_token_pool(jnp.asarray(hidden), jnp.asarray(mask))))


def assert_close(mine, ref, mask: np.ndarray | None = None, floor: float = 0.5, atol: float = ATOL) -> None:
    """Equal within `atol`, on a reference whose largest entry exceeds `floor` (not degenerate)."""
    mine, ref = np.asarray(mine), np.asarray(ref)
    if mask is not None:
        mine, ref = mine[mask], ref[mask]
    assert np.abs(ref).max() > floor, "reference output is degenerate; the comparison would prove nothing"
    np.testing.assert_allclose(mine, ref, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapted_model_matches_peft(tiny_ckpt, hf, batch, name):
    config = CONFIGS[name]
    ref = peft_reference(tiny_ckpt, config)
    expected = peft_hidden_states(ref, batch)
    base = hf.hidden_states(batch)
    assert np.abs(expected - base)[batch.mask].max() > 0.1, "the adapters must change the output"
    ours = ours_from_peft(tiny_ckpt, config, ref)
    hidden = np.asarray(jax.jit(ours.hidden_states)(batch.ours))
    assert_close(hidden, expected, batch.mask)
    mask = batch.ours["attention_mask"]
    assert_close(pooled(hidden, mask), pooled(expected, mask), floor=0.2)
    # the inference path (fori_loop over the stack, last layer on the pooled token only)
    assert_close(jax.jit(ours.embed)(batch.ours), pooled(expected, mask), floor=0.2)


class FixedDropout(torch.nn.Module):
    """Stands in for PEFT's nn.Dropout with a given (already 1/(1-p) scaled) mask, so PEFT's
    training-mode arithmetic can be compared with ours on the same mask."""

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.mask = torch.tensor(np.asarray(mask), dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@pytest.mark.parametrize("name", ["lora", "dora", "dora_partial"])
def test_training_mode_with_dropout_matches_peft_given_the_same_masks(tiny_ckpt, batch, name):
    """With dropout PEFT's DoRA recomputes the base term from the dropped input (no bias): a
    different formula from eval mode, checked here mask for mask, outputs and gradients (which
    also checks that the DoRA norm is detached as in PEFT)."""
    config = CONFIGS[name]
    ref = peft_reference(tiny_ckpt, config)
    ours = ours_from_peft(tiny_ckpt, config, ref)
    set_lora_dropout(ours, jax.random.key(7), jnp.arange(10, 14), sequence_positions(batch.ours["attention_mask"]))
    keys = next(lora_adapters(ours)).dropout_keys[...]  # every adapter holds the same keys
    rows, length = batch.ours["input_ids"].shape
    without_dropout = peft_hidden_states(ref, batch)
    for (layer, target), module in peft_modules(ref).items():
        fan_in = module.lora_A["default"].weight.shape[1]
        mask = dropout(jnp.ones((rows, length, fan_in)), keys[layer], HF_TARGETS.index(target), config.dropout)
        module.lora_dropout["default"] = FixedDropout(mask)
    ref.model.train()
    expected = peft_hidden_states(ref, batch)
    assert np.abs(expected - without_dropout)[batch.mask].max() > 1e-3, "dropout must matter"
    assert_close(jax.jit(ours.hidden_states)(batch.ours), expected, batch.mask, atol=ATOL_TRAINING)

    weights = np.random.default_rng(0).standard_normal(expected.shape).astype(np.float32) * batch.mask[..., None]
    graphdef, params, rest = nnx.split(ours, LoRAParam, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest).hidden_states(batch.ours) * weights)
    grads = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(jax.jit(jax.grad(loss))(params))}
    for parameter_name, parameter in ref.model.named_parameters():
        parameter.requires_grad_(".lora_" in parameter_name)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.hf_inputs.items()}
    (ref.model.model(**inputs).last_hidden_state * torch.tensor(weights).double()).sum().backward()
    fused_of = {name: fused for fused, names in LORA_SITES.items() for name in names}
    for (layer, target), module in peft_modules(ref).items():
        prefix = ("language_model", "layers", fused_of[target], "lora", target)
        pairs = [("a", module.lora_A["default"].weight.grad.T), ("b", module.lora_B["default"].weight.grad.T)]
        if config.use_dora:
            pairs.append(("magnitude", module.lora_magnitude_vector["default"].weight.grad))
        for leaf, expected_grad in pairs:
            expected_grad = expected_grad.numpy()
            np.testing.assert_allclose(grads[prefix + (leaf,)][layer], expected_grad, atol=GRAD_RTOL * np.abs(expected_grad).max(), rtol=0, err_msg=f"{leaf} of {target} in layer {layer}")


# ----------------------------------------------------------------------------- merge and export
@pytest.mark.parametrize("name", ["lora", "dora_partial", "dora"])
def test_merged_export_equals_adapted_model(tiny_ckpt, batch, tmp_path, name):
    config = CONFIGS[name]
    ref = peft_reference(tiny_ckpt, config)
    ours = ours_from_peft(tiny_ckpt, config, ref)
    adapted = np.asarray(jax.jit(ours.hidden_states)(batch.ours))
    merge_lora(ours)
    assert lora_parameter_count(ours) == 0
    assert_close(jax.jit(ours.hidden_states)(batch.ours), adapted, batch.mask)
    save_pretrained(ours, tmp_path / "merged", source_dir=tiny_ckpt)
    exported, info = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    exported.eval().double()  # float64 on both sides: only the merge itself is compared
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.hf_inputs.items()}
    with torch.no_grad():
        hidden = exported.model(**inputs).last_hidden_state.numpy()
    assert_close(hidden, peft_hidden_states(ref, batch), batch.mask)


def test_merge_without_adapters_is_an_error(tiny_ckpt):
    model = load_pretrained(tiny_ckpt)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        set_lora_dropout(model, jax.random.key(0), jnp.arange(2))


# ----------------------------------------------------------------------------- initialisation
def test_fresh_adapters_change_nothing_and_start_where_peft_does(tiny_ckpt, hf, batch):
    config = CONFIGS["dora"]
    model = load_pretrained(tiny_ckpt)
    plain = np.asarray(jax.jit(model.hidden_states)(batch.ours))
    apply_lora(model, config, nnx.Rngs(0))
    set_lora_dropout(model, jax.random.key(1), jnp.arange(4), sequence_positions(batch.ours["attention_mask"]))  # dropout of a zero update is still zero
    np.testing.assert_allclose(np.asarray(jax.jit(model.hidden_states)(batch.ours))[batch.mask], plain[batch.mask], atol=ATOL, rtol=0)

    fresh = peft_modules(peft_reference(tiny_ckpt, config, seed=None))
    layers = model.language_model.layers
    hidden = model.config.text.hidden_size
    for fused, names in LORA_SITES.items():
        for name in names:
            group = getattr(layers, fused).lora[name]
            a = np.asarray(group.a[...])
            fan_in = a.shape[1]
            assert np.all(np.asarray(group.b[...]) == 0)
            assert np.abs(a).max() <= 1 / math.sqrt(fan_in) and a.std() > 0.4 / math.sqrt(fan_in)  # U(+-1/sqrt(in))
            peft_m = np.stack([fresh[(i, name)].lora_magnitude_vector["default"].weight.detach().numpy() for i in range(a.shape[0])])
            np.testing.assert_allclose(np.asarray(group.magnitude[...]), peft_m, rtol=1e-6)
    rank, t = config.rank, model.config.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    fan = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, t.intermediate_size), (hidden, t.intermediate_size), (t.intermediate_size, hidden)]
    assert lora_parameter_count(model) == t.num_layers * sum(rank * (i + o) + o for i, o in fan)


def test_apply_twice_is_an_error(tiny_ckpt):
    model = load_pretrained(tiny_ckpt)
    apply_lora(model, CONFIGS["lora_partial"], nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(model, CONFIGS["lora_partial"], nnx.Rngs(0))


# ----------------------------------------------------------------------------- dropout
@pytest.fixture(scope="module")
def dora_model(tiny_ckpt):
    """DoRA on all targets with PEFT-randomised (non-trivial) adapters."""
    config = CONFIGS["dora"]
    return ours_from_peft(tiny_ckpt, config, peft_reference(tiny_ckpt, config, seed=3))


@jax.jit(static_argnums=0)
def _run_with_dropout(graphdef, state, inputs: dict, key: jax.Array, ids: jax.Array | None) -> jax.Array:
    model = nnx.merge(graphdef, state)
    set_lora_dropout(model, key, ids, sequence_positions(inputs["attention_mask"]))
    return model(inputs)


def _embed(model, inputs: dict, key: jax.Array, ids: jax.Array | None) -> np.ndarray:
    return np.asarray(_run_with_dropout(*nnx.split(model), inputs, key, ids))


def test_dropout_depends_on_the_example_not_the_batch(hf, dora_model):
    five = hf.build(SEQUENCES, IMAGES)
    alone = hf.build([SEQUENCES[2]], IMAGES)
    assert alone.ours["input_ids"].shape[1] < five.ours["input_ids"].shape[1], "the batches should differ in padded length too"
    ids = jnp.array([40, 41, 42, 43, 44])
    key = jax.random.key(5)
    in_batch = _embed(dora_model, five.ours, key, ids)
    single = _embed(dora_model, alone.ours, key, ids[2:3])
    np.testing.assert_allclose(single[0], in_batch[2], atol=ATOL, rtol=0)

    off = _embed(dora_model, five.ours, key, None)
    assert np.abs(in_batch - off).max(axis=1).min() > 1e-3, "dropout must change every example"
    other_key = _embed(dora_model, five.ours, jax.random.key(6), ids)
    assert np.abs(in_batch - other_key).max(axis=1).min() > 1e-3
    other_ids = _embed(dora_model, five.ours, key, ids + 100)
    assert np.abs(in_batch - other_ids).max(axis=1).min() > 1e-3
    # raw uint32 keys are accepted too
    np.testing.assert_array_equal(_embed(dora_model, five.ours, jax.random.key_data(key), ids), in_batch)


def test_dropout_keys_must_match_the_batch(batch, dora_model):
    set_lora_dropout(dora_model, jax.random.key(0), jnp.arange(3), jnp.zeros((3, 5), jnp.int32))
    try:
        with pytest.raises(ValueError, match="set for 3 x 5 tokens but the input has 4 x"):
            dora_model.hidden_states(batch.ours)
    finally:
        set_lora_dropout(dora_model, jax.random.key(0), None)


def test_pooled_last_layer_equals_the_full_stack_with_dropout(batch, dora_model):
    """Training and inference compute the last layer for the pooled tokens only; with DoRA dropout
    on, each pooled token keeps its own mask (`Projection.select_tokens`), so vectors and adapter
    gradients equal pooling the whole stack's hidden states."""
    mask = jnp.asarray(batch.ours["attention_mask"])
    graphdef, params, rest = nnx.split(dora_model, LoRAParam, ...)
    directions = jax.random.normal(jax.random.key(3), (mask.shape[0], dora_model.config.text.hidden_size))

    def vectors(p, pooled: bool) -> jax.Array:
        model = nnx.merge(graphdef, p, rest, copy=True)
        set_lora_dropout(model, jax.random.key(0), jnp.arange(4), sequence_positions(mask))
        return model(batch.ours) if pooled else l2_normalize(last_token_pool(model.hidden_states(batch.ours), mask))

    def run(pooled: bool):
        loss = lambda p: jnp.sum(vectors(p, pooled) * directions)  # noqa: E731
        return jax.jit(lambda p: (vectors(p, pooled), jax.grad(loss)(p)))(params)

    (pooled, pooled_grads), (full, full_grads) = run(True), run(False)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(full), atol=ATOL, rtol=0)
    for a, b in zip(jax.tree.leaves(pooled_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=GRAD_RTOL * float(np.abs(b).max()), rtol=0)
    set_lora_dropout(dora_model, jax.random.key(0), None)
    off = jax.jit(lambda b: l2_normalize(last_token_pool(dora_model.hidden_states(b), mask)))(batch.ours)
    assert np.abs(np.asarray(off) - np.asarray(full)).max() > 1e-3, "dropout must matter"
    np.testing.assert_allclose(np.asarray(jax.jit(dora_model.embed)(batch.ours)), np.asarray(off), atol=ATOL, rtol=0)


def test_gradients_flow_to_every_adapter_parameter_with_and_without_remat(tiny_ckpt, batch):
    config = CONFIGS["dora_partial"]
    ref = peft_reference(tiny_ckpt, config, seed=4)
    weights = jax.random.normal(jax.random.key(2), (4, 64))
    grads = {}
    for remat in (False, True):
        model = ours_from_peft(tiny_ckpt, config, ref, remat=remat)
        graphdef, params, rest = nnx.split(model, LoRAParam, ...)

        @jax.jit
        def loss(params, rest, inputs):
            m = nnx.merge(graphdef, params, rest)
            set_lora_dropout(m, jax.random.key(9), jnp.arange(4), sequence_positions(inputs["attention_mask"]))
            return jnp.sum(m(inputs) * weights)

        grads[remat] = jax.jit(jax.grad(loss))(params, rest, batch.ours)
    leaves = nnx.to_flat_state(grads[True])
    assert {path[-1] for path, _ in leaves} == {"a", "b", "magnitude"}
    for path, var in leaves:
        g = np.asarray(var.get_value())
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path
    for (path, r), (_, p) in zip(leaves, nnx.to_flat_state(grads[False])):
        np.testing.assert_allclose(np.asarray(r.get_value()), np.asarray(p.get_value()), atol=ATOL, rtol=0, err_msg=str(path))


@pytest.mark.parametrize("dtype, param_dtype", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_mixed_precision_follows_the_base_linear(tiny_ckpt, batch, dtype, param_dtype):
    """Adapters stay float32 (PEFT's autocast_adapter_dtype) and compute in the base's dtype."""
    config = CONFIGS["dora"]
    ref = peft_reference(tiny_ckpt, config)
    expected = peft_hidden_states(ref, batch)
    ours = ours_from_peft(tiny_ckpt, config, ref, dtype=dtype, param_dtype=param_dtype)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(ours, LoRAParam))} == {jnp.dtype("float32")}
    assert np.isfinite(_embed(ours, batch.ours, jax.random.key(0), jnp.arange(4))).all()
    hidden = jax.jit(ours.hidden_states)(batch.ours)
    assert hidden.dtype == jnp.dtype(dtype)
    hidden = np.asarray(hidden).astype(np.float32)
    cos = np.sum(hidden * expected, -1) / (np.linalg.norm(hidden, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cos[batch.mask].min() > 0.99


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0, alpha=8), "rank must be a positive int"),
        (dict(rank=2.0, alpha=8), "rank must be a positive int"),
        (dict(rank=4, alpha=8, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(rank=4, alpha=8, dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(rank=4, alpha=8, targets=("q_proj", "qkv")), r"unknown LoRA target\(s\) \['qkv'\]; valid targets: \['q_proj'"),
        (dict(rank=4, alpha=8, targets=()), "non-empty and distinct"),
        (dict(rank=4, alpha=8, targets=("q_proj", "q_proj")), "non-empty and distinct"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_scale_is_alpha_over_rank():
    assert LoRAConfig(rank=8, alpha=64).scale == 8.0
    assert LoRAConfig(rank=8, alpha=64, targets=["q_proj"]).targets == ("q_proj",)
