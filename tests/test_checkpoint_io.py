"""Checkpoint import/export against real files written and read by transformers (no mocks).

Import: sharded and single-file checkpoints, both key layouts, dtype conversion while loading.
Export: transformers loads what we write (one file or several shards, tied or untied head) and
computes the same hidden states; our loader reads it back unchanged. Errors name the problem.
"""

import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen2VLForConditionalGeneration

from hf_reference import HFReference
from vlm2vec_jax import Embedder
from vlm2vec_jax.models.qwen2_vl.config import ConfigError
from vlm2vec_jax.models.hf_export import save_pretrained
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.safetensors_files import INDEX_FILE, SINGLE_FILE, CheckpointError
from vlm2vec_jax.testing.tiny_checkpoint import build_tiny_checkpoint, tiny_image

IMAGES = [tiny_image(100, 60, 1), tiny_image(56, 120, 2)]
SIDECARS = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


# --------------------------------------------------------------------------------------- helpers
def _params(model) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(model_a, model_b) -> None:
    a, b = _params(model_a), _params(model_b)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        assert a[path].shape == b[path].shape, path
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory as stored (any dtype), read by safetensors itself."""
    files = sorted(directory.glob("*.safetensors"))
    assert files, directory
    return {k: v for f in files for k, v in load_file(f).items()}


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """`dst` = `src`'s config, tokenizer and image processor with `tensors` as its single weight file."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != INDEX_FILE:
            shutil.copy2(f, dst / f.name)
    save_file(tensors, dst / SINGLE_FILE, metadata={"format": "pt"})
    return dst


def _edit_config(directory: Path, edit) -> None:
    file = directory / "config.json"
    raw = json.loads(file.read_text())
    edit(raw)
    file.write_text(json.dumps(raw))


def _hf_load(directory: Path):
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    return model.eval(), info


def _assert_clean_load(info: dict) -> None:
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info


def _assert_same_hf_state(model_a, model_b) -> None:
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# -------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return load_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def hf_original(tiny_ckpt):
    return HFReference(str(tiny_ckpt))


# ---------------------------------------------------------------------------------------- import
def test_sharded_checkpoint_loads_the_same_parameters(tiny_ckpt, tiny_ckpt_sharded, ours):
    index = json.loads((tiny_ckpt_sharded / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tiny_ckpt_sharded / SINGLE_FILE).exists()
    _assert_same_params(load_pretrained(tiny_ckpt_sharded), ours)

    # Anchor the comparison to the file contents (a loader returning the init would also be
    # "equal" to itself): fused q|k|v of the last layer, grouped by key/value head (each kv head's
    # query heads, its key, its value: what a tensor-parallel split must keep together), and the
    # Conv3d patch embedding.
    raw = _hf_tensors(tiny_ckpt)
    params = _params(ours)
    last, t = 1, ours.config.text
    q, k, v = (raw[f"model.layers.{last}.self_attn.{n}_proj.weight"].numpy().T for n in "qkv")
    by_kv_head = [x.reshape(t.hidden_size, t.num_kv_heads, -1, t.head_dim) for x in (q, k, v)]
    np.testing.assert_array_equal(params["language_model", "layers", "qkv_proj", "kernel"][last], np.concatenate(by_kv_head, axis=2))
    conv = raw["visual.patch_embed.proj.weight"].numpy()
    np.testing.assert_array_equal(params["visual", "patch_embed", "kernel"], conv.reshape(conv.shape[0], -1).T)


def test_in_memory_key_layout_loads_the_same_parameters(tiny_ckpt, ours, tmp_path):
    def in_memory(key: str) -> str:
        if key.startswith("visual."):
            return "model." + key
        if key.startswith("model."):
            return "model.language_model." + key[len("model.") :]
        return key

    tensors = {in_memory(k): v for k, v in _hf_tensors(tiny_ckpt).items()}
    assert any(k.startswith("model.visual.") for k in tensors) and any(k.startswith("model.language_model.layers.") for k in tensors)
    assert not any(k.startswith(("visual.", "model.layers.", "model.embed_tokens")) for k in tensors)
    _assert_same_params(load_pretrained(_rewrite(tiny_ckpt, tmp_path / "in_memory", tensors)), ours)


def test_bfloat16_checkpoint_upcasts_to_float32(tmp_path):
    bf16_dir = build_tiny_checkpoint(tmp_path / "bf16", dtype="bfloat16", seed=3)
    stored = _hf_tensors(bf16_dir)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    # The expectation comes from torch: the same tensors upcast by torch, loaded as float32 files.
    upcast_dir = _rewrite(bf16_dir, tmp_path / "upcast", {k: v.float() for k, v in stored.items()})

    loaded = load_pretrained(bf16_dir, dtype="float32")
    params = _params(loaded)
    assert {a.dtype for a in params.values()} == {np.dtype(np.float32)}
    _assert_same_params(loaded, load_pretrained(upcast_dir, dtype="float32"))
    # bf16 values really are bf16-representable after the upcast (nothing was rounded twice).
    emb = params["language_model", "embed_tokens", "embedding"]
    np.testing.assert_array_equal(emb.astype(ml_dtypes.bfloat16).astype(np.float32), emb)


def test_float32_checkpoint_loads_as_bfloat16(tiny_ckpt, ours):
    bf16 = _params(load_pretrained(tiny_ckpt, dtype="bfloat16"))
    f32 = _params(ours)
    assert {a.dtype for a in bf16.values()} == {np.dtype(ml_dtypes.bfloat16)}
    for path, value in f32.items():
        # round-to-nearest-even, as torch's .to(torch.bfloat16) does
        np.testing.assert_array_equal(bf16[path], value.astype(ml_dtypes.bfloat16), err_msg=str(path))


# ---------------------------------------------------------------------------------------- export
def test_export_round_trip_through_transformers(tiny_ckpt, ours, hf_original, tmp_path):
    out = save_pretrained(ours, tmp_path / "export", source_dir=tiny_ckpt)
    assert (out / SINGLE_FILE).is_file() and not (out / INDEX_FILE).exists()
    for name in SIDECARS:
        assert (out / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name

    exported, info = _hf_load(out)
    _assert_clean_load(info)
    assert exported.config.tie_word_embeddings
    _assert_same_hf_state(exported, hf_original.model)

    _assert_same_params(load_pretrained(out), ours)
    # Our own loader reads the whole export (config, weights, tokenizer, image processor): an
    # Embedder built from it gives the source's vectors, bit for bit.
    items = ["A red car is parked next to a small white house.", {"image": IMAGES[0], "text": "Represent the given image."},
             {"image": IMAGES, "text": "Two images <|image_pad|> and <|image_pad|>"}]
    vectors = Embedder.from_pretrained(out).encode(items)
    np.testing.assert_array_equal(vectors, Embedder.from_pretrained(tiny_ckpt).encode(items))
    assert len({tuple(np.round(v, 4)) for v in vectors}) == len(items)  # not one constant vector


def test_export_in_several_shards(tiny_ckpt, ours, hf_original, tmp_path):
    out = save_pretrained(ours, tmp_path / "sharded", source_dir=tiny_ckpt, shard_bytes=64 * 1024)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / SINGLE_FILE).exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _hf_tensors(out).values())

    exported, info = _hf_load(out)
    _assert_clean_load(info)
    _assert_same_hf_state(exported, hf_original.model)
    _assert_same_params(load_pretrained(out), ours)


def test_export_of_a_bfloat16_model_keeps_the_stored_values(tmp_path):
    src = build_tiny_checkpoint(tmp_path / "bf16", dtype="bfloat16", seed=4)
    out = save_pretrained(load_pretrained(src, dtype="bfloat16"), tmp_path / "export", source_dir=src)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    before, after = _hf_tensors(src), _hf_tensors(out)
    assert after.keys() == before.keys() - {"lm_head.weight"}
    for key, value in after.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, before[key]), key
    exported, info = _hf_load(out)
    _assert_clean_load(info)


def test_untied_lm_head_is_copied_from_the_source(tiny_ckpt_untied, tmp_path):
    model = load_pretrained(tiny_ckpt_untied)  # lm_head.weight is in the file and ignored on import
    source, _ = _hf_load(tiny_ckpt_untied)
    assert not source.config.tie_word_embeddings
    out = save_pretrained(model, tmp_path / "untied", source_dir=tiny_ckpt_untied)
    assert "lm_head.weight" in _hf_tensors(out)

    exported, info = _hf_load(out)
    _assert_clean_load(info)
    assert not exported.config.tie_word_embeddings
    assert not torch.equal(source.lm_head.weight, source.model.language_model.embed_tokens.weight)
    _assert_same_hf_state(exported, source)


def test_untied_export_without_source_is_marked_tied(tiny_ckpt_untied, tmp_path):
    model = load_pretrained(tiny_ckpt_untied)
    out = save_pretrained(model, tmp_path / "no_source")
    raw = json.loads((out / "config.json").read_text())
    assert raw["tie_word_embeddings"] is True and raw["text_config"]["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _hf_tensors(out)

    exported, info = _hf_load(out)
    _assert_clean_load(info)
    assert torch.equal(exported.lm_head.weight, exported.model.language_model.embed_tokens.weight)
    _assert_same_params(load_pretrained(out), model)


# ---------------------------------------------------------------------------------------- errors
def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    key = "model.layers.1.self_attn.k_proj.bias"
    tensors = _hf_tensors(tiny_ckpt)
    del tensors[key]
    broken = _rewrite(tiny_ckpt, tmp_path / "missing", tensors)
    with pytest.raises(CheckpointError, match=r"missing") as err:
        load_pretrained(broken)
    assert key in str(err.value)


def test_misshaped_tensor_names_tensor_and_both_shapes(tiny_ckpt, tmp_path):
    broken = tmp_path / "misshaped"
    shutil.copytree(tiny_ckpt, broken)
    _edit_config(broken, lambda raw: raw["text_config"].update(intermediate_size=96))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(broken)
    message = str(err.value)
    match = re.search(r"model\.layers\.\d\.mlp\.(gate_proj|up_proj|down_proj)\.weight", message)
    assert match, message
    stored, implied = ((128, 64), (96, 64)) if match.group(1) != "down_proj" else ((64, 128), (64, 96))
    assert str(stored) in message and str(implied) in message, message


def test_other_architecture_is_rejected(tiny_ckpt, tmp_path):
    broken = tmp_path / "llama"
    shutil.copytree(tiny_ckpt, broken)
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4).to_json_file(broken / "config.json")
    with pytest.raises(ConfigError, match="model_type='llama'.* is not a supported backbone") as err:
        load_pretrained(broken)
    assert "qwen2_vl (Qwen2VLForConditionalGeneration)" in str(err.value)


def test_missing_config_json(tiny_ckpt, tmp_path):
    broken = tmp_path / "no_config"
    shutil.copytree(tiny_ckpt, broken)
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json"):
        load_pretrained(broken)


def test_directory_without_safetensors(tiny_ckpt, tmp_path):
    broken = tmp_path / "no_weights"
    broken.mkdir()
    shutil.copy2(tiny_ckpt / "config.json", broken / "config.json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(broken)


def test_index_listing_a_missing_shard(tiny_ckpt_sharded, tmp_path):
    broken = tmp_path / "incomplete"
    shutil.copytree(tiny_ckpt_sharded, broken)
    gone = sorted(set(json.loads((broken / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    (broken / gone).unlink()
    with pytest.raises(CheckpointError, match="does not exist") as err:
        load_pretrained(broken)
    assert gone in str(err.value)


def test_foreign_tensor_is_named(tiny_ckpt, tmp_path):
    key = "model.mm_projector.weight"
    tensors = {**_hf_tensors(tiny_ckpt), key: torch.zeros(4, 4)}
    broken = _rewrite(tiny_ckpt, tmp_path / "foreign", tensors)
    with pytest.raises(CheckpointError, match="not part of Qwen2VLForConditionalGeneration") as err:
        load_pretrained(broken)
    assert key in str(err.value)


def test_truncated_file_is_named(tiny_ckpt, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_ckpt, broken)
    weights = broken / SINGLE_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_pretrained(broken)
    assert SINGLE_FILE in str(err.value)


# ------------------------------------------------------------------- random checkpoints (no torch)
def test_random_checkpoint_is_a_real_checkpoint(tmp_path):
    """`write_random_checkpoint` (used at 2B scale by benchmarks/load_2b.py) writes what the hub
    ships: transformers and our loader read it, shards come with an index, and the tokenizer is the
    real Qwen one with Qwen2-VL's special ids."""
    from transformers import AutoTokenizer

    from vlm2vec_jax.models.qwen2_vl.config import TextConfig, VisionConfig
    from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config
    from vlm2vec_jax.testing.random_checkpoint import iter_random_tensors, write_random_checkpoint

    full = qwen2vl_2b_config()
    assert (full.text.hidden_size, full.text.num_layers, full.vision.depth, full.text.vocab_size) == (1536, 28, 32, 151936)
    config = full.replace(
        text=TextConfig(vocab_size=151936, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=48, mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=2, embed_dim=16, num_heads=2, out_hidden_size=32),
    )
    out = write_random_checkpoint(config, tmp_path / "random", shard_bytes=4_000_000, seed=5, processor_files=True)
    assert len(set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())) >= 2

    stored = _hf_tensors(out)
    expected = dict(iter_random_tensors(config, seed=5))
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(stored[key].view(torch.int16).numpy(), value.view(np.int16), err_msg=key)
    norm = stored["model.layers.0.input_layernorm.weight"].float()
    assert abs(norm.mean().item() - 1) < 0.05 and 0.01 < stored["model.layers.0.mlp.up_proj.weight"].float().std().item() < 0.03

    hf, info = _hf_load(out)
    _assert_clean_load(info)
    assert hf.dtype == torch.bfloat16
    params = _params(load_pretrained(out, dtype="bfloat16"))
    np.testing.assert_array_equal(params["language_model", "embed_tokens", "embedding"], expected["model.embed_tokens.weight"])

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655 == config.image_token_id
    assert tokenizer.pad_token_id == 151643
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == 12845056


_MEASURE_LOAD = """
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import jax, jax.numpy as jnp
from flax import nnx
from vlm2vec_jax.models.hf_import import load_pretrained
jnp.zeros(8).block_until_ready()
base = hwm()
params = jax.block_until_ready(nnx.state(load_pretrained(sys.argv[1], dtype="bfloat16"), nnx.Param))
print(json.dumps({"base": base, "peak": hwm(), "params": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


@pytest.mark.slow
def test_loading_peaks_near_one_copy_of_the_parameters(tmp_path):
    """Peak RSS of a fresh interpreter loading ~340 MB of bf16 weights stays below 1.5x their size
    (it was ~2.4x: every touched page of the memory-mapped shard counted, and each host buffer lived
    on next to its device copy). benchmarks/load_2b.py measures the same at 2B scale."""
    import subprocess
    import sys

    from vlm2vec_jax.models.qwen2_vl.config import TextConfig, VisionConfig
    from vlm2vec_jax.models.qwen2_vl.geometries import qwen2vl_2b_config
    from vlm2vec_jax.testing.random_checkpoint import write_random_checkpoint

    config = qwen2vl_2b_config().replace(
        text=TextConfig(vocab_size=32000, hidden_size=1024, num_layers=6, num_heads=8, num_kv_heads=2, intermediate_size=5632),
        vision=VisionConfig(depth=4, embed_dim=512, num_heads=8, out_hidden_size=1024),
    )
    out = write_random_checkpoint(config, tmp_path / "medium", shard_bytes=200_000_000)
    proc = subprocess.run([sys.executable, "-c", _MEASURE_LOAD, str(out)], capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["params"] > 300e6
    ratio = (m["peak"] - m["base"]) / m["params"]
    assert ratio < 1.5, m


def test_export_over_an_earlier_export_leaves_no_stale_weights(tiny_ckpt, ours, tmp_path):
    """Re-exporting into the same directory with another layout (sharded, then one file) must not
    leave the old index behind: loaders prefer the index and would read the old weights."""
    other = load_pretrained(build_tiny_checkpoint(tmp_path / "other", seed=7))
    out = tmp_path / "reused"
    save_pretrained(ours, out, source_dir=tiny_ckpt, shard_bytes=64 * 1024)
    assert (out / INDEX_FILE).is_file()
    save_pretrained(other, out, source_dir=tiny_ckpt)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [SINGLE_FILE] and not (out / INDEX_FILE).exists()
    _assert_same_params(load_pretrained(out), other)
    save_pretrained(ours, out, source_dir=tiny_ckpt, shard_bytes=64 * 1024)
    assert not (out / SINGLE_FILE).exists()
    _assert_same_params(load_pretrained(out), ours)
    exported, info = _hf_load(out)
    _assert_clean_load(info)
