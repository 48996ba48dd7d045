"""Each backbone beyond Qwen2-VL through the public API and commands, against transformers: the
registry that picks it from config.json, export that transformers loads, `Embedder` equal to
transformers' own pipeline, and training, mining and evaluation through `python -m vlm2vec_jax.*`.
(Layer-level parity of every backbone: test_model_parity.py; PEFT adapters: test_peft_adapters.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers

from hf_reference import HFReference, hf_embedding
from training_runs import environment, finish, metrics, shared_dirs, start, tail, train_command
from vlm2vec_jax import Embedder
from vlm2vec_jax.cli_config import run_cli
from vlm2vec_jax.models.backbones import BACKBONES, read_config
from vlm2vec_jax.models.hf_export import save_pretrained
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.qwen2_vl.config import ConfigError
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
IMG_A, IMG_B = tiny_image(100, 60, 1), tiny_image(56, 120, 2)
# (our item, the text transformers sees, its images): text only, one image, two in one sequence
CASES = [
    ("A photo of a dog running on the green grass.", "A photo of a dog running on the green grass.", []),
    ({"image": IMG_A, "text": "Represent the given image."}, "<|image_pad|>\nRepresent the given image.", [IMG_A]),
    ({"image": [IMG_A, IMG_B], "text": "Compare <|image_pad|> with <|image_pad|>."}, "Compare <|image_pad|> with <|image_pad|>.", [IMG_A, IMG_B]),
]
NEWER = ["qwen2_5_vl", "qwen3_vl"]
# Qwen3-VL is evaluated in Qwen3-VL-Embedding's chat layout
PROMPT_FORMAT = {"qwen3_vl": "qwen3_vl_embedding"}
EVAL_DIM = {"qwen3_vl": 16}  # and at a Matryoshka width (the tiny model is 64 wide)
# Qwen3-VL-Embedding trains Matryoshka prefixes: its run adds two (the tiny model is 32 wide), so
# the loss (tests/test_training_gradcache.py checks its value) runs in the sharded GradCache step.
MATRYOSHKA = {"qwen3_vl": "8,16"}


@pytest.fixture(scope="module", params=NEWER)
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_ckpt_{request.param}")


def transformers_class(directory: Path) -> type:
    return getattr(transformers, json.loads((directory / "config.json").read_text())["architectures"][0])


def assert_loads_cleanly_in_transformers(directory: Path, architecture: str) -> None:
    cls = transformers_class(directory)
    assert cls.__name__ == architecture
    _, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def expected_embeddings(directory: Path) -> np.ndarray:
    hf = HFReference(str(directory))
    return np.stack([hf_embedding(hf, text, images) for _, text, images in CASES])


# ------------------------------------------------------------------------------------ registry
def test_config_json_names_the_backbone(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    config = read_config(checkpoint)
    assert type(config) is BACKBONES[raw["model_type"]].config
    assert type(load_pretrained(checkpoint)) is BACKBONES[raw["model_type"]].model


def test_an_unsupported_model_type_lists_the_supported_ones(tiny_ckpt, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt, other)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"]}))
    with pytest.raises(ConfigError) as err:
        Embedder.from_pretrained(other)
    message = str(err.value)
    assert str(other / "config.json") in message and "'qwen3_vl_moe'" in message, message
    for model_type, backbone in BACKBONES.items():
        assert f"{model_type} ({backbone.architecture})" in message, message
    # without a model_type, the listed architecture decides
    del raw["model_type"]
    (other / "config.json").write_text(json.dumps(raw))
    assert type(read_config(other)) is BACKBONES["qwen2_vl"].config


# ---------------------------------------------------------------------------- API: embed, export
@pytest.mark.parametrize("packing", [True, False])
def test_encode_matches_transformers(checkpoint, packing):
    vectors = Embedder.from_pretrained(checkpoint, packing=packing).encode([item for item, _, _ in CASES], batch_size=2)
    expected = expected_embeddings(checkpoint)
    assert len({tuple(np.round(v, 3)) for v in expected}) == len(CASES)  # not one constant vector
    np.testing.assert_allclose(vectors, expected, atol=ATOL, rtol=0)


def test_export_loads_in_its_transformers_class_with_the_same_tensors(checkpoint, tmp_path):
    import torch

    out = save_pretrained(load_pretrained(checkpoint), tmp_path / "export", source_dir=checkpoint)
    architecture = BACKBONES[json.loads((checkpoint / "config.json").read_text())["model_type"]].architecture
    assert_loads_cleanly_in_transformers(out, architecture)
    cls = transformers_class(checkpoint)
    exported, original = cls.from_pretrained(out).state_dict(), cls.from_pretrained(checkpoint).state_dict()
    assert exported.keys() == original.keys()
    for key in exported:
        assert torch.equal(exported[key], original[key]), key


# ------------------------------------------------------------------------- commands: train, mine, eval
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Per newer backbone, a random-init run (`model.architecture.model_type`) of 3 steps on 8
    simulated devices with GradCache (packed chunks of 1 query; Matryoshka prefixes for Qwen3-VL),
    exported at the end; all at once."""
    shared = shared_dirs(tmp_path_factory)
    root = tmp_path_factory.mktemp("backbone_runs")
    started = {}
    for model_type in NEWER:
        workdir, log = root / model_type, root / f"{model_type}.log"
        command = train_command(
            workdir, shared, model__architecture__model_type=model_type, train__gc_chunk_size=1, train__steps=3,
            checkpoint__every=0, export__at_end=True, train__matryoshka_dims=MATRYOSHKA.get(model_type, ""),
        )
        started[model_type] = (workdir, start(command, environment(shared, devices=8), log), log)
    for model_type, (workdir, process, log) in started.items():
        assert finish(process, log) == 0, f"{model_type}:\n{tail(log)}"
    return {model_type: workdir for model_type, (workdir, _, _) in started.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", NEWER)
def test_training_on_8_devices_with_gradcache_exports_what_transformers_computes(trained, model_type):
    workdir = trained[model_type]
    lines = metrics(workdir)
    assert [line["step"] for line in lines] == [1, 2, 3] and all(np.isfinite(line["loss"]) for line in lines)
    assert all(line["packed_chunks"] >= 1 for line in lines)
    export = workdir / "export"
    assert json.loads((export / "config.json").read_text())["model_type"] == model_type
    assert_loads_cleanly_in_transformers(export, BACKBONES[model_type].architecture)
    np.testing.assert_allclose(Embedder.from_pretrained(export).encode([c[0] for c in CASES]), expected_embeddings(export), atol=ATOL, rtol=0)


def test_mining_from_a_teacher_of_the_backbone(checkpoint, tmp_path, capsys):
    from vlm2vec_jax.mine import main as mine_main

    out = tmp_path / "mined"
    argv = [
        "mine", f"--config={REPO / 'configs/mine_b3.py'}", "--config.progress=false", f"--config.teacher={checkpoint}",
        "--config.data.synthetic=small", f"--config.data.synthetic_dir={tmp_path / 'synthetic'}",
        "--config.data.max_rows_per_subset=16", "--config.data.subsets=SynCls,SynVQA", f"--config.out={out}",
        "--config.batch_size=16", "--config.cluster_size=8", "--config.m=10", "--config.teacher_batch_size=64",
    ]
    assert run_cli(mine_main, argv, command="vlm2vec_jax.mine", example_config="configs/mine_b3.py") == 0, capsys.readouterr().err
    with np.load(out / "embeddings.npz") as saved:
        assert saved["query"].shape == (32, read_config(checkpoint).text.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(saved["target"], axis=1), 1.0, rtol=1e-5)
    assert (out / "batches.parquet").is_file()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from vlm2vec_jax.data.synthetic import generate

    out = tmp_path_factory.mktemp("bench")
    generate(out, seed=0, scale="small")
    return out / "eval"


def test_evaluation_of_the_backbone(checkpoint, bench, tmp_path, capsys):
    from vlm2vec_jax.eval import main as eval_main

    model_type = json.loads((checkpoint / "config.json").read_text())["model_type"]
    out = tmp_path / "out"
    argv = ["eval", "--config", str(REPO / "configs/eval_mmeb.py"), f"--config.model={checkpoint}",
            f"--config.data.root={bench}", f"--config.out={out}", "--config.progress=False",
            "--config.data.max_rows=8", f"--config.prompt_format={PROMPT_FORMAT.get(model_type, 'raw')}",
            f"--config.dim={EVAL_DIM.get(model_type, 0)}"]
    assert run_cli(eval_main, argv, command="vlm2vec_jax.eval", example_config="configs/eval_mmeb.py") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["num_datasets"] > 0 and 0 <= summary["overall"]["acc"] <= 1
    written = json.loads((out / "config.json").read_text())
    assert (written["prompt_format"], written["dim"]) == (PROMPT_FORMAT.get(model_type, "raw"), EVAL_DIM.get(model_type, 0))
