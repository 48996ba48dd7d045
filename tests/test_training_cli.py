"""The training CLI end to end: usage errors, a non-finite loss, a step out of device memory, and a
LoRA run whose export loads in transformers and in `Embedder`, whose checkpoint holds only adapters,
whose logs carry every metric, and whose finished workdir exports again on a rerun without training.
The LoRA and non-finite runs start together when the module starts (two cores, two processes)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from hf_reference import HFReference, hf_embedding
from training_runs import (
    PYTHON, REPO, STEPS, build_model, environment, finish, finished_steps, flat_numpy, metrics, restore_latest, run, run_config,
    run_ok, shared_dirs, start, tail, train_command,
)
from vlm2vec_jax.cli_config import parse_config
from vlm2vec_jax.training.loop import device_memory_error
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
    error = one_error_line(log)
    # The third step (batch 2 of the plan) is the first with a NaN loss; steps count from 1 like the logs.
    assert "step 3 (batch 2 of the plan, training rows [" in error and "loss is nan" in error, error
    assert [line["step"] for line in metrics(workdir)] == [1, 2]
    assert all(math.isfinite(line["loss"]) for line in metrics(workdir))

    # Checkpoint 2 (saved before the failing step) holds the parameters the NaN came from: the
    # message says so and points at checkpoint 1 for a retry with a lower learning rate.
    assert "latest checkpoint, step 2" in error and "before it (step 1)" in error, error
    step, state, meta = restore_latest(workdir)
    assert step == int(state.step) == meta["data_position"] == 2
    exploded = max(np.abs(v).max() for v in flat_numpy(state.params).values())
    assert exploded > 1e6
    step, state, _ = restore_latest(workdir, step=1)
    sane = flat_numpy(state.params)
    assert all(np.isfinite(v).all() for v in sane.values()) and max(np.abs(v).max() for v in sane.values()) < 100


def one_error_line(log) -> str:
    """The CLI's one `error:` line (after the progress bar's last carriage-return update); no traceback."""
    text = tail(log, 100_000)
    error = re.findall(r"vlm2vec_jax\.train: error: .*", text)
    assert len(error) == 1 and "Traceback" not in text, text[-3000:]
    return error[0]


def test_a_step_out_of_device_memory_stops_naming_the_keys_that_shrink_it(tmp_path, tmp_path_factory) -> None:
    """A real allocation failure: at max_len 2**20 a full decoder layer's attention scores alone
    need terabytes (two layers: the last one computes only the pooled tokens, whose scores fit). It
    surfaces asynchronously (when the step's metrics are read), and must still become the hint."""
    shared = shared_dirs(tmp_path_factory)
    workdir, log = tmp_path / "run", tmp_path / "oom.log"
    command = train_command(workdir, shared, model__max_len=2**20, model__architecture__text_layers=2, train__steps=2)
    assert run(command, environment(shared), log) == 1, tail(log)
    error = one_error_line(log)
    assert "step 1: out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating" in error, error
    assert "turn GradCache on (train.gc_chunk_size > 0" in error and "model.remat (now False)" in error, error
    assert "mesh.fsdp" in error and "resume from the latest checkpoint" in error, error
    assert finished_steps(workdir / "checkpoints") == [] and metrics(workdir) == []


def test_device_memory_error_names_the_chunk_keys_and_lets_other_runtime_errors_through() -> None:
    def failure(program, *args) -> jax.errors.JaxRuntimeError:
        with pytest.raises(jax.errors.JaxRuntimeError) as caught:
            jax.block_until_ready(jax.jit(program)(*args))
        return caught.value

    oom = failure(lambda x: jnp.broadcast_to(x, (2**40,)) + 1, jnp.float32(1))  # a 4 TB output
    config = parse_config(["train", "--config", str(REPO / "configs/demo.py"), "--config.train.gc_chunk_size=2",
                           "--config.model.remat=True"], usage="")
    error = device_memory_error(oom, 6, config)
    assert isinstance(error, MemoryError)
    message = str(error)
    assert message.startswith("step 7: out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating 4398046511104 bytes")
    assert "lower train.gc_chunk_size (now 2)" in message and "train.pack_text_rows" in message, message
    assert "model.remat (now True)" in message and "\n" not in message, message

    def raises(_):
        raise ValueError("not a memory problem")

    other = failure(lambda x: jax.pure_callback(raises, jax.ShapeDtypeStruct((), jnp.float32), x), jnp.float32(1))
    assert device_memory_error(other, 6, config) is None


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
    from vlm2vec_jax.models.hf_import import load_pretrained

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


def test_rerun_of_a_finished_workdir_trains_nothing_and_exports_the_last_checkpoint(lora_run, tmp_path, tmp_path_factory) -> None:
    """Export on demand: the finished run's workdir without its export/, rerun with the same command."""
    workdir = tmp_path / "rerun"
    shutil.copytree(lora_run, workdir, ignore=shutil.ignore_patterns("export"))
    logged, checkpoints = (workdir / "metrics.jsonl").read_bytes(), finished_steps(workdir / "checkpoints")
    assert checkpoints[-1] == STEPS
    shared, log = shared_dirs(tmp_path_factory), tmp_path / "rerun.log"
    run_ok(train_command(workdir, shared, **LORA), environment(shared), log)
    assert f"resumed from {workdir / 'checkpoints'} at step {STEPS}" in tail(log) and "exported" in tail(log), tail(log)
    assert "compiled the training step" not in tail(log, 100_000)  # nothing to train: no step compiled
    assert (workdir / "metrics.jsonl").read_bytes() == logged and finished_steps(workdir / "checkpoints") == checkpoints
    # The same weights the run exported when it finished, bit for bit.
    for original in sorted((lora_run / "export").glob("*.safetensors")):
        want, got = load_file(original), load_file(workdir / "export" / original.name)
        assert want.keys() == got.keys() and want, original.name
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
