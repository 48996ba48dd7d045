"""Helpers for the end-to-end training tests: tiny CLI runs of `vlm2vec_jax.train` in subprocesses
(device counts, kills and multi-process runs need their own interpreter), their metrics, and the
restore of a run's latest orbax checkpoint through the project's own `Checkpointer` and
`abstract_train_state` on one device (whatever mesh wrote it).

Runs in one pytest session share one synthetic benchmark and one persistent XLA compilation cache
(`shared_dirs`): a run whose configuration another run already compiled loads its executables
instead of compiling them (the same binary, so the numbers are the same), which keeps the resume
tests' three restarts cheap. The runs several test files compare against (`SHARED_RUNS`) run once
per session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# The suite compiles hundreds of tiny programs and runs each a few times: the backend's optimisation
# of the generated CPU code was half of a compile-bound script's CPU time (97 s -> 49 s user for
# gradcache_check.py) and buys nothing at these sizes. Float32 results may move in their last bits,
# as with any compiler change; what the tests compare is the same computation. conftest.py sets it
# for the pytest process, `xla_flags` for each subprocess.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test subprocess: fast compilation and `devices` simulated CPU devices."""
    return FAST_COMPILE_FLAG + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")

STEPS = 8
# A model small enough that a run is mostly compilation; every key exists in configs/common.py.
TINY = {
    "data.synthetic": "small",
    "model.architecture.text_hidden": 32,
    "model.architecture.text_layers": 1,
    "model.architecture.heads": 2,
    "model.architecture.kv_heads": 2,  # divisible by the sharded runs' tensor size: q|k|v splits by kv head
    "model.architecture.intermediate": 64,
    "model.architecture.vision_dim": 16,
    "model.architecture.vision_depth": 1,
    "model.architecture.vision_heads": 1,
    "model.architecture.vocab_size": 400,
    "model.max_len": 48,
    "train.batch_size": 8,
    "train.steps": STEPS,
    "train.warmup_steps": 2,
    "eval.every": -1,
    "export.at_end": False,
    "data.num_workers": 0,
    "train.log_every": 1,
    "checkpoint.every": 1,
}
RUN_TIMEOUT = 600


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the runs shared by test files live: the session's base temp dir, or with pytest-xdist
    the directory above every worker's (so a run another worker made is reused, not repeated)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "training_shared"


def shared_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's synthetic benchmark and XLA compilation cache directories (same paths for every
    test file of one pytest session, on every xdist worker)."""
    root = session_root(tmp_path_factory)
    dirs = {"synthetic": root / "synthetic", "xla_cache": root / "xla_cache"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    from vlm2vec_jax.data.synthetic import generate

    with FileLock(root / "synthetic.lock"):  # once; reused after, by any worker
        generate(dirs["synthetic"] / f"{TINY['data.synthetic']}-seed0", seed=0, scale=TINY["data.synthetic"])
    return dirs


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items()]


def train_command(workdir: Path, shared: dict[str, Path], **extra: Any) -> list[str]:
    """`python -m vlm2vec_jax.train` of the tiny config in `workdir`; `extra` overrides keys, with
    `__` for dots (`train__gc_chunk_size=1`)."""
    values = {**TINY, "data.synthetic_dir": shared["synthetic"], "workdir": workdir}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [PYTHON, "-m", "vlm2vec_jax.train", "--config", str(REPO / "configs/demo.py"), *overrides(values)]


def environment(shared: dict[str, Path] | None, devices: int = 1, cache: bool = True) -> dict[str, str]:
    """The subprocess environment: `devices` simulated CPU devices, the shared compilation cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["XLA_FLAGS"] = xla_flags(devices)
    if cache and shared is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(shared["xla_cache"])
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def start(command: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `command` with stdout and stderr into `log` (a file, so a chatty child never blocks)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "wb")
    try:
        return subprocess.Popen(list(command), env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    finally:
        handle.close()


def finish(process: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"timed out after {timeout} s:\n{tail(log)}") from None


def run_on_local_hosts(tmp_path: Path, workdir: Path, shared: dict[str, Path], devices: int, **extra: Any) -> None:
    """Train `workdir` as 2 processes of `devices` CPU devices each through `launch/local.sh`
    (jax.distributed on 127.0.0.1; logs under tmp_path); fail with both processes' log tails."""
    command = [
        "bash", str(REPO / "launch/local.sh"), "2", "--devices", str(devices), "--logs", str(tmp_path / "logs"), "--",
        *train_command(workdir, shared, **extra),
    ]
    log = tmp_path / "process0.log"
    code = finish_all([(start(command, environment(shared, cache=False), log), log)])[0]
    assert code == 0, f"launch/local.sh ({code}):\n{tail(log)}\n\nprocess 1:\n{tail(tmp_path / 'logs' / 'process_1.log')}"


def finish_all(processes: Sequence[tuple[subprocess.Popen, Path]], timeout: float = RUN_TIMEOUT, grace: float = 60) -> list[int]:
    """Exit codes of processes that run together. Once one fails, the others get `grace` seconds
    (peers of a multi-process run would otherwise wait for it at a barrier) and are then killed;
    none outlives this call."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p, _ in processes):
            if any(p.returncode not in (None, 0) for p, _ in processes):
                deadline = min(deadline, time.monotonic() + grace)
            if time.monotonic() > deadline:
                stuck = [str(log) for p, log in processes if p.poll() is None]
                raise AssertionError(f"timed out waiting for {stuck}:\n" + "\n\n".join(tail(log) for _, log in processes))
            time.sleep(0.05)
    finally:
        for p, _ in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p, _ in processes]


def run(command: Sequence[str], env: dict[str, str], log: Path, timeout: float = RUN_TIMEOUT) -> int:
    return finish(start(command, env, log), log, timeout)


def run_ok(command: Sequence[str], env: dict[str, str], log: Path) -> None:
    code = run(command, env, log)
    assert code == 0, f"exit code {code}:\n{tail(log)}"


def tail(log: Path, chars: int = 4000) -> str:
    """The end of a log, progress-bar carriage returns turned into lines."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else "(no log)"
    return text[-chars:]


def script_results(script: str, chunks_by_devices: dict[int, Sequence[int]], logs: Path, timeout: float) -> dict[int, dict]:
    """Run `tests/scripts/<script>` with each device count (and its chunk sizes as arguments) at
    once, one subprocess each, and return the JSON each printed last, by device count."""
    path = str(REPO / "tests/scripts" / script)
    runs = {}
    for devices, chunks in chunks_by_devices.items():
        log = logs / f"{devices}.log"
        runs[devices] = (start([PYTHON, path, *map(str, chunks)], environment(None, devices), log), log)
    codes = finish_all(list(runs.values()), timeout=timeout)
    results = {}
    for (devices, (_, log)), code in zip(runs.items(), codes):
        assert code == 0, f"{script} on {devices} device(s) failed ({code}):\n{tail(log)}"
        lines = [line for line in log.read_text().replace("\r", "\n").splitlines() if line.startswith("{")]
        results[devices] = json.loads(lines[-1])
    return results


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, log: Path, what: str, timeout: float = RUN_TIMEOUT) -> None:
    """Poll `condition` every 5 ms; fail if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run exited (code {process.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(0.005)


def gated(command: Sequence[str], env: dict[str, str], step: int, gate: Path) -> tuple[list[str], dict[str, str]]:
    """(command, env) of a `train_command` run through tests/scripts/gated_train.py: it stops right
    after logging `step` (before saving it or checking for SIGTERM), creates gate/reached, and
    goes on once `open_gate(gate)`. A test signals it there: a state, not a time."""
    assert list(command[1:3]) == ["-m", "vlm2vec_jax.train"], command
    return [command[0], str(REPO / "tests/scripts/gated_train.py"), *command[3:]], {**env, "GATE_STEP": str(step), "GATE_DIR": str(gate)}


def gate_reached(gate: Path) -> bool:
    return (gate / "reached").exists()


def open_gate(gate: Path) -> None:
    (gate / "open").touch()


def metrics(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(workdir: Path) -> dict[int, list[float]]:
    """Every logged loss per step (a resumed run may log a step twice: both must agree)."""
    out: dict[int, list[float]] = {}
    for line in metrics(workdir):
        if "loss" in line:
            out.setdefault(int(line["step"]), []).append(float(line["loss"]))
    return out


def final_losses(workdir: Path) -> np.ndarray:
    losses = step_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1)), f"logged steps {sorted(losses)}"
    return np.array([losses[s][-1] for s in range(1, STEPS + 1)])


def finished_steps(checkpoints: Path) -> list[int]:
    """Step directories orbax has finished (renamed from their temporary name into place)."""
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        process.send_signal(sig)


# ------------------------------------------------------------------------------ restore in-process
def run_config(workdir: Path):
    """The config a run recorded in `workdir/config.json`."""
    import ml_collections

    return ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))


def trainable_template(config) -> tuple[Any, Any]:
    """(graphdef, abstract trainable parameters in float32) of a run's model, as the Trainer splits it
    (no weights are computed)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vlm2vec_jax.training.trainable import split_for_training

    model = nnx.eval_shape(lambda: build_model(config))
    graphdef, params, _ = split_for_training(model, config.train.mode, config.train.freeze_vision)
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)


def build_model(config):
    """The run's initial model (random init from the seed, LoRA applied as the Trainer does)."""
    from flax import nnx

    from vlm2vec_jax.models.lora import LoRAConfig, apply_lora
    from vlm2vec_jax.training.model_init import init_model

    model = init_model(
        config.model.init, Path(config.workdir) / "model_init", seed=config.seed,
        dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
    )
    if config.train.mode == "lora":
        targets = tuple(t.strip() for t in config.lora.targets.split(",") if t.strip())
        lora = LoRAConfig(config.lora.rank, config.lora.alpha, config.lora.dropout, targets, config.lora.dora)
        apply_lora(model, lora, nnx.Rngs(config.seed + 1))
    return model


def restore_latest(workdir: Path, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
    """(step, TrainState on one device, metadata) of `workdir`'s latest (or given) checkpoint."""
    import jax

    from vlm2vec_jax.training.checkpoint import Checkpointer
    from vlm2vec_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from vlm2vec_jax.training.sharding import make_mesh
    from vlm2vec_jax.training.state import abstract_train_state

    c = run_config(workdir)
    _, params = trainable_template(c)
    schedule = learning_rate_schedule(c.train.learning_rate, c.train.steps, c.train.warmup_steps, c.train.schedule)
    optimizer = make_optimizer(
        schedule, weight_decay=c.train.weight_decay, clip_norm=c.train.clip_norm,
        b1=c.train.adam_b1, b2=c.train.adam_b2, eps=c.train.adam_eps,
    )
    abstract = abstract_train_state(params, optimizer, make_mesh(devices=jax.devices()[:1]))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=c.checkpoint.keep, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        assert step is not None, f"no checkpoint in {workdir / 'checkpoints'}"
        state, meta = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    return step, state, meta


def initial_params(workdir: Path) -> dict[str, np.ndarray]:
    """`flat_numpy` of the run's trainable parameters before its first step, in float32 (the
    Trainer's master copy of `build_model`): what training moved the parameters from."""
    from vlm2vec_jax.training.trainable import master_weights, split_for_training

    c = run_config(workdir)
    _, params, _ = split_for_training(build_model(c), c.train.mode, c.train.freeze_vision)
    return flat_numpy(master_weights(params))


def flat_numpy(tree: Any) -> dict[str, np.ndarray]:
    """{'a/b/c': array} of a pytree (nnx States included)."""
    import jax

    from vlm2vec_jax.training.state import leaf_names

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(leaf_names(path)): np.asarray(x) for path, x in leaves}


# The fused attention projections' biases, laid out [q | k | v] on their last axis.
KEY_BIASES = ("language_model/layers/qkv_proj/bias", "visual/blocks/qkv/bias")
# Of each leaf's movement over the run (tree_compare.leaf_errors with `initial`); seen here: under
# 1e-4 for every leaf but the key biases (their q and v parts agree to 1e-8 absolute).
PARAM_RTOL = 1e-3
# The key biases: a key bias adds the same q.b to every logit of a query, so softmax cancels it and
# its gradient is zero up to rounding; Adam, which normalises each update, still moves it by about a
# learning rate a step, in a direction the rounding picks. Runs that round differently (8 devices
# against 1) agree on it only roughly (seen: up to 5% of its movement).
KEY_BIAS_RTOL = 0.25


def split_key_biases(flat: dict[str, np.ndarray], config) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(`flat` with the key-bias parts cut out of `KEY_BIASES`, those parts alone), from the run's
    `model.architecture` (a randomly initialised run)."""
    a = config.model.architecture
    # (index, axis) of the key part: the decoder's (layers, kv_heads, q-per-kv + 2, head_dim) bias
    # holds each kv head's key after its queries; the tower's (layers, 3, heads, head_dim) is q|k|v
    where = {KEY_BIASES[0]: (a.heads // a.kv_heads, -2), KEY_BIASES[1]: (1, -3)}
    rest, keys = dict(flat), {}
    for name, (index, axis) in where.items():
        x = rest.pop(name)
        rest[f"{name}[q,v]"] = np.delete(x, index, axis=axis)
        keys[f"{name}[k]"] = np.take(x, index, axis=axis)
    return rest, keys


def assert_same_training(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], workdir: Path, what: str) -> None:
    """`flat_numpy` parameters of two runs of `workdir`'s config agree, per leaf, relative to how far
    training moved each leaf from `initial_params` (PARAM_RTOL; the key biases KEY_BIAS_RTOL)."""
    from tree_compare import assert_trees_close

    config = run_config(workdir)
    (got_rest, got_keys), (want_rest, want_keys), (init_rest, init_keys) = (
        split_key_biases(tree, config) for tree in (got, expected, initial_params(workdir))
    )
    assert_trees_close(got_rest, want_rest, rtol=PARAM_RTOL, initial=init_rest, what=what)
    assert_trees_close(got_keys, want_keys, rtol=KEY_BIAS_RTOL, initial=init_keys, what=f"{what} (key biases)")


# ------------------------------------------------------------------------- memoised shared runs
DONE = ".shared_run_done"  # written into a shared run's workdir once it completed
# name -> (devices, overrides): the runs several test files compare against.
SHARED_RUNS: dict[str, tuple[int, dict[str, Any]]] = {
    # The reference: uninterrupted, one device, full fine-tuning, no GradCache.
    "baseline_1dev": (1, {}),
    # One device, GradCache chunks of 1 query, packed (the default with GradCache): the packed resume.
    "packed_1dev_gc1": (1, {"train__gc_chunk_size": 1}),
    # Pure data parallelism on 8 simulated devices (shard_map path), GradCache chunks of 1 query:
    # packed (the default with GradCache: a dynamic chunk count per device), and with fixed shapes.
    "dp8_gc1": (8, {"train__gc_chunk_size": 1}),
    "fixed_dp8_gc1": (8, {"train__gc_chunk_size": 1, "train__packing": False}),
    # Parameters sharded too: mesh (data, fsdp, tensor) = (2, 2, 2), XLA's partitioner path; without
    # GradCache (fixed shapes), and packed, where every shard's chunk c runs as one.
    "fsdp2_tp2": (8, {"mesh__data": 2, "mesh__fsdp": 2, "mesh__tensor": 2}),
    "packed_fsdp2_tp2": (8, {"train__gc_chunk_size": 1, "mesh__data": 2, "mesh__fsdp": 2, "mesh__tensor": 2}),
}


def shared_runs(tmp_path_factory: pytest.TempPathFactory, *names: str) -> list[Path]:
    """Completed `SHARED_RUNS`, each executed once per session (across xdist workers: a worker that
    needs a run another is making waits on its lock); missing ones run concurrently."""
    shared = shared_dirs(tmp_path_factory)
    root = session_root(tmp_path_factory)
    wanted = sorted(set(names))  # locks taken in one order: two workers never wait on each other
    locks = [FileLock(root / f"{name}.lock") for name in wanted]
    for lock in locks:
        lock.acquire()
    try:
        started = {}
        for name in wanted:
            if not (root / name / DONE).exists():
                devices, extra = SHARED_RUNS[name]
                log = root / f"{name}.log"
                started[name] = (start(train_command(root / name, shared, **extra), environment(shared, devices), log), log)
        codes = finish_all(list(started.values()))
        for (name, (_, log)), code in zip(started.items(), codes):
            assert code == 0, f"{name}: exit code {code}:\n{tail(log)}"
            (root / name / DONE).touch()
    finally:
        for lock in reversed(locks):
            lock.release()
    return [root / name for name in names]


def baseline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_runs(tmp_path_factory, "baseline_1dev")[0]
