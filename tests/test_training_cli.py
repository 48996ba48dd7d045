"""The training CLI end to end: usage errors, a non-finite loss, and a LoRA run whose export loads in
transformers and in `Embedder`, whose checkpoint holds only adapters, and whose logs carry every
metric. The two training runs start together when the module starts (two cores, two processes)."""

from __future__ import annotations

import math
import re
import subprocess

import numpy as np
import pytest

from hf_reference import HFReference, hf_embedding
from training_runs import (
    PYTHON, STEPS, build_model, environment, finish, flat_numpy, metrics, restore_latest, run_config, shared_dirs, start, tail,
    train_command,
)
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

pytestmark = pytest.mark.slow

METRIC_KEYS = ("step", "loss", "accuracy", "learning_rate", "grad_norm", "examples_per_s", "tokens_per_s", "mfu")
LORA = {
    "train__mode": "lora", "train__freeze_vision": True, "lora__dropout": 0.1, "export__at_end": True,
    "checkpoint__every": 4,
}
# Adam moves every weight by ~learning rate from step 2 on (warmup from 0): at 1e12 the parameters
# explode at the second update and the third step's loss is NaN.
EXPLODING = {"train__learning_rate": 1e12, "train__clip_norm": 0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shared = shared_dirs(tmp_path_factory)
    root = tmp_path_factory.mktemp("cli_runs")
    started = {}
    for name, extra in (("lora", LORA), ("nan", EXPLODING)):
        workdir, log = root / name, root / f"{name}.log"
        started[name] = (workdir, start(train_command(workdir, shared, **extra), environment(shared), log), log)
    yield started
    for _, process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def test_unknown_key_is_a_usage_error_naming_the_right_key(tmp_path, tmp_path_factory) -> None:
    command = [*train_command(tmp_path / "run", shared_dirs(tmp_path_factory)), "--config.train.stpes=3"]
    result = subprocess.run(command, env=environment(None), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "train.stpes" in lines[0] and "train.steps" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing ran


def test_make_demo_entry_point_is_the_demo_config_with_overrides(tmp_path) -> None:
    """`python -m vlm2vec_jax.demo` = the trainer on configs/demo.py, extra arguments as overrides
    (the training itself is what every run here exercises: they all start from configs/demo.py)."""
    command = [PYTHON, "-m", "vlm2vec_jax.demo", f"--config.workdir={tmp_path / 'run'}", "--config.train.stpes=3"]
    result = subprocess.run(command, env=environment(None), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "vlm2vec_jax.demo" in result.stderr and "train.steps" in result.stderr
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_the_step_and_batch_and_keeps_checkpoints(runs) -> None:
    workdir, process, log = runs["nan"]
    assert finish(process, log) == 1, tail(log)
    text = tail(log, 100_000)
    # One line (after the progress bar's last carriage-return update), no traceback.
    error = re.findall(r"vlm2vec_jax\.train: error: .*", text)
    assert len(error) == 1 and "Traceback" not in text, text[-3000:]
    # The third step (batch 2 of the plan) is the first with a NaN loss; steps count from 1 like the logs.
    assert "step 3 (batch 2 of the plan, training rows [" in error[0] and "loss is nan" in error[0], error[0]
    assert [line["step"] for line in metrics(workdir)] == [1, 2]
    assert all(math.isfinite(line["loss"]) for line in metrics(workdir))

    # Checkpoint 2 (saved before the failing step) holds the parameters the NaN came from: the
    # message says so and points at checkpoint 1 for a retry with a lower learning rate.
    assert "latest checkpoint, step 2" in error[0] and "before it (step 1)" in error[0], error[0]
    step, state, meta = restore_latest(workdir)
    assert step == int(state.step) == meta["data_position"] == 2
    exploded = max(np.abs(v).max() for v in flat_numpy(state.params).values())
    assert exploded > 1e6
    step, state, _ = restore_latest(workdir, step=1)
    sane = flat_numpy(state.params)
    assert all(np.isfinite(v).all() for v in sane.values()) and max(np.abs(v).max() for v in sane.values()) < 100


@pytest.fixture(scope="module")
def lora_run(runs):
    workdir, process, log = runs["lora"]
    assert finish(process, log) == 0, tail(log)
    return workdir


def test_lora_metrics_and_tensorboard(lora_run) -> None:
    lines = metrics(lora_run)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    for line in lines:
        missing = [k for k in METRIC_KEYS if k not in line]
        assert not missing, f"step {line['step']}: missing {missing}"
        assert all(isinstance(line[k], (int, float)) and math.isfinite(line[k]) for k in METRIC_KEYS), line
        assert line["examples_per_s"] > 0 and line["tokens_per_s"] > 0 and line["mfu"] > 0 and line["grad_norm"] > 0
        assert 0.0 <= line["accuracy"] <= 1.0
    # Linear warmup from 0 over 2 steps to the peak, then linear decay to 0 at the last step.
    peak = run_config(lora_run).train.learning_rate
    expected = [0.0, peak / 2] + [peak * (STEPS - s) / (STEPS - 2) for s in range(2, STEPS)]
    np.testing.assert_allclose([line["learning_rate"] for line in lines], expected, rtol=1e-6, atol=1e-12)

    events = list((lora_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(lora_run.iterdir())
    data = b"".join(e.read_bytes() for e in events)
    for tag in (b"loss", b"accuracy", b"learning_rate", b"grad_norm", b"mfu"):
        assert tag in data, tag


def test_lora_checkpoint_holds_only_adapters_that_moved_and_export_merges_them_onto_the_untouched_base(lora_run) -> None:
    from flax import nnx

    from vlm2vec_jax.models.lora import LoRAParam, merge_lora
    from vlm2vec_jax.models.qwen2_vl.hf_import import load_pretrained

    step, state, _ = restore_latest(lora_run)
    assert step == STEPS
    trained = flat_numpy(state.params)
    config = run_config(lora_run)
    model = build_model(config)  # the run's initial model: same seed, same adapters
    initial = flat_numpy(nnx.state(model, LoRAParam))
    assert trained.keys() == initial.keys() and trained
    assert all("lora" in name.split("/") and name.split("/")[-1] in ("a", "b", "magnitude") for name in trained), list(trained)
    assert not any(name.startswith("visual") for name in trained)
    for kind in ("a", "b", "magnitude"):
        names = [n for n in trained if n.endswith("/" + kind)]
        assert names, kind
        assert all(not np.array_equal(trained[n], initial[n]) for n in names), f"some {kind} never moved"
    assert all(np.all(initial[n] == 0) for n in initial if n.endswith("/b"))  # PEFT's init, so B moving is training

    # The export is exactly the initial base weights with the trained adapters merged in: so the
    # base (and the vision tower) never changed, and the merge is what was exported.
    nnx.update(model, state.params)
    merge_lora(model)
    exported = load_pretrained(lora_run / "export")
    want, got = flat_numpy(nnx.state(model, nnx.Param)), flat_numpy(nnx.state(exported, nnx.Param))
    assert want.keys() == got.keys(), sorted(want.keys() ^ got.keys())[:10]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_lora_export_loads_in_transformers_and_embedder(lora_run) -> None:
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLModel

    from vlm2vec_jax import Embedder

    export = lora_run / "export"
    for cls in (Qwen2VLModel, Qwen2VLForConditionalGeneration):
        _, info = cls.from_pretrained(export, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (cls.__name__, info)

    embedder = Embedder.from_pretrained(export)
    image = tiny_image(84, 84, seed=5)
    items = ["a red circle left of a blue square", {"image": image, "text": "<|image_pad|>\nRepresent the given image."}]
    vectors = embedder.encode(items)
    assert vectors.shape == (2, embedder.dim) and np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    hf = HFReference(str(export))
    expected = np.stack([
        hf_embedding(hf, items[0], []),
        hf_embedding(hf, "<|image_pad|>\nRepresent the given image.", [image]),
    ])
    np.testing.assert_allclose(vectors, expected, atol=1e-4, rtol=0)
