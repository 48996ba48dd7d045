"""Interrupted training resumes exactly: SIGKILL after a checkpoint, a crash in the middle of a save,
SIGTERM (preemption: save and exit 0), then a rerun to the end must log the very losses of an
uninterrupted run at every step and end with the very same parameters and optimizer state.

One workdir goes through all of it, each interruption real (signals to a real `vlm2vec_jax.train`
process, a real orbax save killed half-way):

    run 1  SIGKILL once checkpoint 3 is on disk, the run held after logging step 4 (tests/scripts/gated_train.py)
    crash  a save of the next step killed half-way (orbax's temporary directory left behind)
    run 2  resumes from the latest finished checkpoint; SIGTERM at its first new step -> saves, exits 0
    run 3  resumes and completes train.steps (with a grain worker process this time)

and a packed run (GradCache on) goes through a SIGTERM and a resume.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from training_runs import (
    PYTHON, REPO, SHARED_RUNS, STEPS, baseline_run, environment, final_losses, finish, finished_steps, flat_numpy, gate_reached,
    gated, kill, metrics, open_gate, restore_latest, run, run_ok, shared_dirs, shared_runs, start, step_losses, tail,
    train_command, wait_for,
)

pytestmark = pytest.mark.slow


def test_kill_crash_during_save_sigterm_then_resume_match_an_uninterrupted_run(tmp_path, tmp_path_factory) -> None:
    baseline = baseline_run(tmp_path_factory)
    shared = shared_dirs(tmp_path_factory)
    env = environment(shared)
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    command = train_command(workdir, shared)

    # ---- run 1: SIGKILL once step 3 is checkpointed, the run held after logging step 4 (not saved).
    log1, gate1 = tmp_path / "run1.log", tmp_path / "gate1"
    process = start(*gated(command, env, 4, gate1), log1)
    wait_for(lambda: gate_reached(gate1) and 3 in finished_steps(checkpoints), process, log1, "step 4 logged, checkpoint 3 written")
    kill(process, signal.SIGKILL)
    assert finish(process, log1) == -signal.SIGKILL, f"the run ended before the kill:\n{tail(log1)}"
    killed_at = max(finished_steps(checkpoints))
    assert killed_at == 3, f"checkpoints {finished_steps(checkpoints)}"
    lines_after_run1 = len(metrics(workdir))

    # ---- a crash in the middle of saving the next step: the finished checkpoint stays the latest.
    crashed = killed_at + 1
    code = run([PYTHON, str(REPO / "tests/scripts/crash_during_save.py"), str(checkpoints), str(crashed)], env, tmp_path / "crash.log")
    assert code == -signal.SIGKILL, tail(tmp_path / "crash.log")
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(f"{crashed}.")]
    assert leftovers and crashed not in finished_steps(checkpoints), sorted(p.name for p in checkpoints.iterdir())
    step, state, meta = restore_latest(workdir)
    assert step == int(state.step) == meta["data_position"] == killed_at
    assert all(np.isfinite(v).all() for v in flat_numpy(state.params).values())

    # ---- run 2: resumes from `killed_at`; SIGTERM once it logs its first new step (held there).
    log2, gate2 = tmp_path / "run2.log", tmp_path / "gate2"
    process = start(*gated(command, env, killed_at + 1, gate2), log2)
    wait_for(lambda: gate_reached(gate2), process, log2, "run 2 logged a step")
    kill(process, signal.SIGTERM)
    open_gate(gate2)
    assert finish(process, log2) == 0, tail(log2)
    text2 = tail(log2, 100_000)
    assert f"at step {killed_at}" in text2  # "resumed from <dir> at step N"
    new_lines = metrics(workdir)[lines_after_run1:]
    assert new_lines[0]["step"] == killed_at + 1
    reached = new_lines[-1]["step"]
    assert reached == killed_at + 1, "SIGTERM was not handled at the step it was sent at"
    assert max(finished_steps(checkpoints)) == reached
    assert re.search(rf"SIGTERM: saved step {reached}\b", text2), text2[-2000:]
    assert not [p.name for p in checkpoints.iterdir() if "tmp" in p.name]  # orbax replaced the crashed save's leftovers
    lines_after_run2 = len(metrics(workdir))

    # ---- run 3: resumes from `reached` and completes (a grain worker builds the batches now).
    log3 = tmp_path / "run3.log"
    run_ok([*command, "--config.data.num_workers=1"], env, log3)
    assert f"at step {reached}" in tail(log3, 100_000)
    assert metrics(workdir)[lines_after_run2]["step"] == reached + 1
    assert max(finished_steps(checkpoints)) == STEPS

    assert_same_run(workdir, baseline)


def test_packed_run_resumes_exactly(tmp_path, tmp_path_factory) -> None:
    """Packing on (GradCache chunks of 1 query, where packing is the default): SIGTERM once a
    checkpoint is on disk, resume to the end; every loss and the final state equal an
    uninterrupted packed run's, bit for bit (the packed layout is rebuilt from the data position)."""
    reference = shared_runs(tmp_path_factory, "packed_1dev_gc1")[0]
    shared = shared_dirs(tmp_path_factory)
    env = environment(shared)
    workdir = tmp_path / "run"
    command = train_command(workdir, shared, **SHARED_RUNS["packed_1dev_gc1"][1])
    log1, gate = tmp_path / "run1.log", tmp_path / "gate"
    process = start(*gated(command, env, 3, gate), log1)
    wait_for(lambda: gate_reached(gate) and 2 in finished_steps(workdir / "checkpoints"), process, log1, "step 3 logged, checkpoint 2 written")
    kill(process, signal.SIGTERM)
    open_gate(gate)
    assert finish(process, log1) == 0, tail(log1)
    reached = max(finished_steps(workdir / "checkpoints"))
    assert reached == 3, "SIGTERM was not handled at the step it was sent at"
    assert "packing (" in tail(log1, 100_000) and all("packed_chunks" in line for line in metrics(workdir))
    log2 = tmp_path / "run2.log"
    run_ok(command, env, log2)
    assert f"at step {reached}" in tail(log2, 100_000)
    assert_same_run(workdir, reference)


def assert_same_run(workdir: Path, reference: Path) -> None:
    """Every logged loss of `workdir` (steps run twice included) and its final parameters and
    optimizer moments equal the uninterrupted `reference` run's, bit for bit."""
    expected = final_losses(reference)
    logged = step_losses(workdir)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for s, losses in logged.items():
        assert losses == [expected[s - 1]] * len(losses), f"step {s}: {losses} vs {expected[s - 1]}"
    step_a, state_a, _ = restore_latest(reference)
    step_b, state_b, meta_b = restore_latest(workdir)
    assert step_a == step_b == STEPS == meta_b["data_position"]
    a, b = flat_numpy(state_a.params), flat_numpy(state_b.params)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    moments_a, moments_b = jax.tree.leaves(state_a.opt_state), jax.tree.leaves(state_b.opt_state)
    assert len(moments_a) == len(moments_b) > 0
    for x, y in zip(moments_a, moments_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
