"""PEFT adapter directories in and out, against the real `peft` on a tiny Qwen2-VL: adapters made
in PyTorch load here with PEFT's embeddings, ours load in PEFT with ours, a round trip changes
nothing, unsupported configs fail naming the key and the file, and training writes (export.format
= peft) and starts from (model.init) adapter directories.

Adapters are random with nonzero B and perturbed magnitudes and alpha != rank, and the checks
compare (to 1e-5) embeddings that the adapters move by ~0.15-0.45: a transposed tensor is a shape
error, and a misplaced one (gate and up, or two layers, swapped) or a missing scale moves the
embeddings far beyond the tolerance."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from hf_reference import HFReference, Reference
from test_lora import (
    CONFIGS, IMAGES, SEQUENCES, assert_close, ours_from_peft, peft_hidden_states, peft_lora_config, peft_reference, pooled,
    randomize_peft_adapters,
)
from train_fixtures import perturbed_dora
from training_runs import environment, finish, flat_numpy, shared_dirs, start, tail, train_command
from vlm2vec_jax import Embedder
from vlm2vec_jax.cli_config import ConfigError, parse_config
from vlm2vec_jax.models.model_dir import resolve_model_dir
from vlm2vec_jax.models.qwen2_vl.text import TextDecoder
from vlm2vec_jax.models.lora import LoRAParam, lora_config_of, lora_parameter_count
from vlm2vec_jax.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_peft_adapter, read_peft_adapter, write_peft_adapter
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.training.loop import Trainer

LORA_SITES = TextDecoder.LORA_SITES  # the decoder's adapter sites and the HF linears each holds


@jax.jit(static_argnums=0)
def _embed(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict) -> jax.Array:
    return nnx.merge(graphdef, state).embed(inputs)


def embed(model: nnx.Module, batch: Reference) -> np.ndarray:
    """The model's unit vectors of the batch; models of one structure share one compilation."""
    return np.asarray(_embed(*nnx.split(model), batch.ours))


@pytest.fixture(scope="module")
def batch(tiny_ckpt) -> Reference:
    return HFReference(str(tiny_ckpt)).build(SEQUENCES[:4], IMAGES)


@pytest.fixture(scope="module")
def base_embeddings(tiny_ckpt, batch) -> np.ndarray:
    return embed(load_pretrained(tiny_ckpt), batch)


def peft_embeddings(ref: HFReference, batch: Reference) -> np.ndarray:
    """PEFT's pooled unit vectors (float64 model, returned as float32)."""
    ref.model.eval().double()
    return pooled(peft_hidden_states(ref, batch), batch.ours["attention_mask"])


def assert_moved(embeddings: np.ndarray, base: np.ndarray) -> None:
    assert np.abs(embeddings - base).max() > 0.1, "the adapters must change the embeddings, or equality proves nothing"


def made_in_pytorch(ckpt: Path, name: str, out: Path, seed: int = 1) -> HFReference:
    """A PEFT adapter saved by `PeftModel.save_pretrained` (targets as the plain list of names
    shared adapters carry), randomised; the returned reference holds it."""
    config = CONFIGS[name]
    ref = HFReference(str(ckpt))
    model = get_peft_model(ref.model, peft_lora_config(config, target_modules=list(config.targets)))
    randomize_peft_adapters(ref, config.use_dora, seed)
    model.save_pretrained(out)
    return ref


@pytest.fixture(scope="module")
def ours_dora(tiny_ckpt, tmp_path_factory) -> Path:
    """Our DoRA (every target, perturbed adapters) written as a PEFT directory."""
    model = nnx.merge(*perturbed_dora(tiny_ckpt))
    return write_peft_adapter(model, tmp_path_factory.mktemp("ours") / "dora", base=tiny_ckpt, processor=tiny_ckpt)


# ----------------------------------------------------------------------------- PyTorch -> here
@pytest.mark.parametrize("name", ["lora", "dora"])  # dora_partial: test_adapter_loads_on_a_base_given_explicitly
def test_adapter_made_with_peft_loads_here_with_equal_embeddings(tiny_ckpt, batch, base_embeddings, tmp_path, name):
    ref = made_in_pytorch(tiny_ckpt, name, tmp_path / "adapter")
    expected = peft_embeddings(ref, batch)
    assert_moved(expected, base_embeddings)
    adapter = read_peft_adapter(tmp_path / "adapter")
    assert adapter.config == CONFIGS[name] and adapter.base == str(tiny_ckpt)
    embedder = Embedder.from_pretrained(tmp_path / "adapter")  # base from base_model_name_or_path, merged
    assert embedder.source_dir == tiny_ckpt and lora_parameter_count(embedder.model) == 0
    assert_close(embed(embedder.model, batch), expected, floor=0.2)


def test_adapter_loads_on_a_base_given_explicitly(tiny_ckpt, batch, tmp_path):
    """A shared adapter names its base by hub id; `base=` is the local copy (nothing is downloaded)."""
    ref = made_in_pytorch(tiny_ckpt, "dora_partial", tmp_path / "adapter", seed=2)
    file = tmp_path / "adapter" / ADAPTER_CONFIG
    file.write_text(json.dumps({**json.loads(file.read_text()), "base_model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct"}))
    with pytest.raises(FileNotFoundError, match=r"base_model_name_or_path 'Qwen/Qwen2-VL-2B-Instruct' is not a local .*pass base="):
        Embedder.from_pretrained(tmp_path / "adapter")
    embedder = Embedder.from_pretrained(tmp_path / "adapter", base=tiny_ckpt)
    assert_close(embed(embedder.model, batch), peft_embeddings(ref, batch), floor=0.2)
    with pytest.raises(ValueError, match="base= applies to adapters only"):
        Embedder.from_pretrained(tiny_ckpt, base=tiny_ckpt)


# ----------------------------------------------------------------------------- here -> PyTorch
def load_in_peft(ckpt: Path, adapter_dir: Path) -> HFReference:
    """`PeftModel.from_pretrained` on transformers' base, checked to have loaded every tensor of
    the file into an adapter slot and nothing else: no missing and no unexpected adapter keys."""
    ref = HFReference(str(ckpt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(ref.model, adapter_dir)
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    loaded, written = get_peft_model_state_dict(model), load_file(adapter_dir / ADAPTER_WEIGHTS)
    assert loaded.keys() == written.keys(), sorted(loaded.keys() ^ written.keys())[:5]
    for key, value in written.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
    return ref


def test_our_dora_loads_in_peft_with_equal_embeddings_and_round_trips_exactly(tiny_ckpt, batch, base_embeddings, ours_dora):
    model = nnx.merge(*perturbed_dora(tiny_ckpt))
    ours = embed(model, batch)
    assert_moved(ours, base_embeddings)
    config = json.loads((ours_dora / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_ckpt) and config["use_dora"] and config["r"] == 4
    assert (ours_dora / "tokenizer.json").is_file() and (ours_dora / "preprocessor_config.json").is_file()
    some_key = "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_magnitude_vector"
    assert some_key in load_file(ours_dora / ADAPTER_WEIGHTS)
    assert_close(peft_embeddings(load_in_peft(tiny_ckpt, ours_dora), batch), ours, floor=0.2)

    # back: the same values, bit for bit, and so the same embeddings
    back = load_pretrained(tiny_ckpt)
    apply_peft_adapter(back, read_peft_adapter(ours_dora), dropout=0.2)
    assert lora_config_of(back) == lora_config_of(model)
    want, got = nnx.to_flat_state(nnx.state(model, LoRAParam)), dict(nnx.to_flat_state(nnx.state(back, LoRAParam)))
    assert len(want) == len(got) == 7 * 3
    for path, variable in want:
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(variable.get_value()), err_msg=str(path))
    np.testing.assert_array_equal(embed(back, batch), ours)


@pytest.mark.parametrize(
    "model_type, architecture, targets_as",
    [("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", str), ("qwen3_vl", "Qwen3VLForConditionalGeneration", list)],
)
def test_adapter_on_a_newer_backbone_loads_in_peft_on_its_own_class(request, tmp_path, model_type, architecture, targets_as):
    """The adapter file names the backbone it was trained on: PEFT maps it onto that class,
    adapts exactly the modules we did (`load_in_peft`) and computes our embeddings; we read it
    back unchanged. Qwen2.5-VL's vision MLP has gate/up/down_proj too, so there a plain list of
    targets would have PEFT adapt those as well: its targets are a language-model regex."""
    ckpt = request.getfixturevalue(f"tiny_ckpt_{model_type}")
    batch = HFReference(str(ckpt)).build(SEQUENCES[:4], IMAGES)
    model = nnx.merge(*perturbed_dora(ckpt))
    ours = embed(model, batch)
    assert_moved(ours, embed(load_pretrained(ckpt), batch))
    out = write_peft_adapter(model, tmp_path / "adapter", base=ckpt)
    written = json.loads((out / ADAPTER_CONFIG).read_text())
    assert written["auto_mapping"] == {
        "base_model_class": architecture, "parent_library": f"transformers.models.{model_type}.modeling_{model_type}",
    }
    assert isinstance(written["target_modules"], targets_as)
    ref = load_in_peft(ckpt, out)
    assert_close(peft_embeddings(ref, batch), ours, floor=0.2)
    back = load_pretrained(ckpt)
    apply_peft_adapter(back, read_peft_adapter(out))
    np.testing.assert_array_equal(embed(back, batch), ours)


def test_our_partial_lora_loads_in_peft(tiny_ckpt, batch, base_embeddings, tmp_path):
    """Adapters on some projections of a fused linear only (q and v of q|k|v, down), values from
    an independent PEFT-to-ours mapping (`ours_from_peft`)."""
    config = CONFIGS["lora_partial"]
    ours_model = ours_from_peft(tiny_ckpt, config, peft_reference(tiny_ckpt, config, seed=5))
    ours = embed(ours_model, batch)
    assert_moved(ours, base_embeddings)
    out = write_peft_adapter(ours_model, tmp_path / "adapter", base=tiny_ckpt)
    assert json.loads((out / ADAPTER_CONFIG).read_text())["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert_close(peft_embeddings(load_in_peft(tiny_ckpt, out), batch), ours, floor=0.2)


# ----------------------------------------------------------------------------- unsupported
def edited_copy(source: Path, out: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of the adapter directory `source` with config keys replaced and/or tensors edited
    (`tensors(dict) -> dict`)."""
    out.mkdir()
    raw = json.loads((source / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(json.dumps({**raw, **(config or {})}))
    weights = load_file(source / ADAPTER_WEIGHTS)
    save_file(tensors(weights) if tensors else weights, out / ADAPTER_WEIGHTS)
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"peft_type": "LOHA"}, "peft_type='LOHA' is not supported: only LoRA"),
        ({"use_rslora": True}, "use_rslora=True is not supported: rsLoRA"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported: bias training"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern=.* is not supported: per-module ranks"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern=.* is not supported: per-module alphas"),
        ({"layers_to_transform": [0]}, "layers_to_transform=.* is not supported"),
        ({"trainable_token_indices": [3]}, "trainable_token_indices=.* is not supported"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported: .* modified base"),
        ({"target_modules": ["q_proj", "qkv"]}, "target_modules='qkv' is not supported: only the language model's projections"),
        ({"some_future_key": 3}, "some_future_key=3 is not supported: a key this reader does not know"),
        ({"target_modules": ["q_proj"]}, r"target_modules \['q_proj'\] but adapter_model.safetensors holds adapters for \['q_proj', 'k_proj'"),
        ({"use_dora": False}, "holds lora_magnitude_vector tensors .DoRA. but adapter_config.json says use_dora=false"),
        ({"r": 2}, "q_proj has rank 4 .lora_A. / 4 .lora_B. but adapter_config.json says r=2"),
    ],
)
def test_unsupported_config_is_an_error_naming_the_key_and_file(ours_dora, tmp_path, edit, message):
    adapter = edited_copy(ours_dora, tmp_path / "adapter", config=edit)
    with pytest.raises(ValueError, match=message) as error:
        read_peft_adapter(adapter)
    assert str(adapter) in str(error.value)


def _with_vision_tensor(tensors: dict) -> dict:
    return {**tensors, "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight": np.zeros((4, 32), np.float32)}


def _without_layer_1_q_b(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k != "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight"}


def _q_as_k(tensors: dict) -> dict:
    """q_proj's tensors filed under k_proj (and k_proj's dropped): a misplaced adapter."""
    out = {k: v for k, v in tensors.items() if ".k_proj." not in k}
    out.update({k.replace(".q_proj.", ".k_proj."): v for k, v in tensors.items() if ".q_proj." in k})
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (_with_vision_tensor, r"tensor base_model\.model\.model\.visual\.blocks\.0\.attn\.qkv\.lora_A\.weight is not a LoRA tensor of a language-model projection"),
        (_without_layer_1_q_b, r"no q_proj\.lora_B\.weight for layer\(s\) \[1\] of 2"),
    ],
)
def test_tensors_we_cannot_place_are_an_error_naming_the_tensor(ours_dora, tmp_path, edit, message):
    adapter = edited_copy(ours_dora, tmp_path / "adapter", tensors=edit)
    with pytest.raises(ValueError, match=message) as error:
        read_peft_adapter(adapter)
    assert str(adapter / ADAPTER_WEIGHTS) in str(error.value)


def test_misshaped_adapter_is_an_error_naming_the_projection(tiny_ckpt, ours_dora, tmp_path):
    adapter = edited_copy(ours_dora, tmp_path / "adapter", tensors=_q_as_k)
    with pytest.raises(ValueError, match=r"k_proj b is \(2, 4, 64\) .* but the base model implies \(2, 4, 32\)"):
        apply_peft_adapter(load_pretrained(tiny_ckpt), read_peft_adapter(adapter))


def test_evaluation_takes_an_adapter_directory(tiny_ckpt, ours_dora, tmp_path):
    assert resolve_model_dir(str(ours_dora)) == ours_dora
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "export").symlink_to(ours_dora)
    assert resolve_model_dir(str(workdir)) == workdir / "export"
    bad = edited_copy(ours_dora, tmp_path / "bad", config={"use_rslora": True})
    with pytest.raises(ConfigError, match="use_rslora=True is not supported"):
        resolve_model_dir(str(bad))
    moved = edited_copy(ours_dora, tmp_path / "moved", config={"base_model_name_or_path": str(tmp_path / "gone")})
    with pytest.raises(ConfigError, match="is not a local Hugging Face model directory"):
        resolve_model_dir(str(moved))


# ----------------------------------------------------------------------------- training
TRAIN = {
    "train__mode": "lora", "train__freeze_vision": True, "lora__rank": 4, "lora__alpha": 16.0, "lora__dropout": 0.0,
    "train__steps": 2, "train__warmup_steps": 1, "checkpoint__every": 0, "export__at_end": True, "export__format": "peft",
}


@pytest.fixture(scope="module", autouse=True)
def training_run(tiny_ckpt, tmp_path_factory):
    """A two-step CLI run from the tiny checkpoint with export.format=peft, started when the module
    starts so that it compiles while the in-process tests run (dropout off: it triples the tiny
    step's compile time and is not what is tested here)."""
    shared, root = shared_dirs(tmp_path_factory), tmp_path_factory.mktemp("peft_run")
    log = root / "run.log"
    process = start(train_command(root / "run", shared, model__init=tiny_ckpt, **TRAIN), environment(shared), log)
    yield root / "run", process, log
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def trained_export(training_run) -> Path:
    workdir, process, log = training_run
    assert finish(process, log) == 0, tail(log)
    return workdir / "export"


def test_training_exports_a_peft_adapter(tiny_ckpt, batch, base_embeddings, trained_export):
    export = trained_export
    assert not (export / "config.json").exists() and not list(export.glob("model*.safetensors"))
    assert (export / "tokenizer.json").is_file() and (export / "preprocessor_config.json").is_file()
    config = json.loads((export / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_ckpt) and (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 16.0, True)
    trained = read_peft_adapter(export)
    assert all(np.abs(trained.tensors[(t, "b")]).max() > 0 for t in trained.config.targets), "training must move B"
    ours = embed(Embedder.from_pretrained(export).model, batch)
    assert np.abs(ours - base_embeddings).max() > 1e-4
    assert_close(ours, peft_embeddings(load_in_peft(tiny_ckpt, export), batch), floor=0.2)


def trainer_from(init: Path, workdir: Path, tmp_path_factory, **extra) -> Trainer:
    """A Trainer of the tiny CLI config, set up (model, adapters, state; nothing compiled)."""
    command = train_command(workdir, shared_dirs(tmp_path_factory), model__init=init, **{**TRAIN, **extra})
    trainer = Trainer(parse_config(["train", *command[3:]], usage="train"))
    trainer.setup()
    trainer.checkpointer.close()
    trainer.metrics_log.close()
    return trainer


def test_training_starts_from_a_peft_adapter(tiny_ckpt, trained_export, tmp_path, tmp_path_factory):
    """model.init = an adapter directory: its rank (4, not lora.rank 8) and values become the
    trainable parameters, and exporting them again gives the file back exactly; train.mode=full
    starts from the merged weights instead."""
    adapter = read_peft_adapter(trained_export)
    trainer = trainer_from(trained_export, tmp_path / "lora", tmp_path_factory, lora__rank=8)
    params = flat_numpy(trainer.state.params)
    assert len(params) == len(adapter.tensors) == 7 * 3
    for (target, leaf), value in adapter.tensors.items():
        fused = next(f for f, names in LORA_SITES.items() if target in names)
        np.testing.assert_array_equal(params[f"language_model/layers/{fused}/lora/{target}/{leaf}"], value, err_msg=f"{target} {leaf}")
    again = read_peft_adapter(trainer.export(tmp_path / "again"))
    assert again.base == str(tiny_ckpt) and again.config == adapter.config
    for key, value in adapter.tensors.items():
        np.testing.assert_array_equal(again.tensors[key], value, err_msg=str(key))

    full = trainer_from(trained_export, tmp_path / "full", tmp_path_factory, train__mode="full", export__format="merged")
    params = flat_numpy(full.state.params)
    assert not [name for name in params if "/lora/" in name]
    merged = flat_numpy(nnx.state(Embedder.from_pretrained(trained_export).model, nnx.Param))
    for fused in LORA_SITES:
        kernel = f"language_model/layers/{fused}/kernel"
        np.testing.assert_array_equal(params[kernel], merged[kernel], err_msg=kernel)
