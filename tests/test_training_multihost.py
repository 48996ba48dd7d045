"""A real multi-process run: two `vlm2vec_jax.train` processes started by `launch/local.sh`, 4 CPU devices each,
joined by `jax.distributed` (gloo), sharing one workdir, give the losses of one process with 8
devices; only process 0 logs, the checkpoint both wrote restores onto one device, and the
synthetic benchmark, which both processes generate into the same fresh directory at once, comes
out whole."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from training_runs import (
    REPO, STEPS, assert_same_training, final_losses, flat_numpy, metrics, restore_latest, run_on_local_hosts, shared_dirs,
    shared_runs,
)



@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, tmp_path_factory) -> None:
    reference = shared_runs(tmp_path_factory, "dp8_gc1")[0]
    shared = {**shared_dirs(tmp_path_factory), "synthetic": tmp_path / "synthetic"}  # fresh: both generate it
    workdir = tmp_path / "run"
    run_on_local_hosts(tmp_path, workdir, shared, devices=4, train__gc_chunk_size=1)

    # One run, logged once (process 0 only).
    lines = metrics(workdir)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(final_losses(workdir), final_losses(reference), rtol=1e-5)
    np.testing.assert_allclose(
        [line["grad_norm"] for line in lines], [line["grad_norm"] for line in metrics(reference)], rtol=1e-4
    )
    assert (shared["synthetic"] / "small-seed0" / "MANIFEST.json").is_file()

    # The checkpoint written by both processes (each its own shards) restores onto one device.
    step, state, meta = restore_latest(workdir)
    _, expected, _ = restore_latest(reference)
    assert step == int(state.step) == meta["data_position"] == STEPS
    assert sorted(p.name for p in (workdir / "checkpoints" / str(STEPS) / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1",
    ]
    got, want = flat_numpy(state.params), flat_numpy(expected.params)
    assert got.keys() == want.keys()
    # Per leaf, against how far the run moved it (training_runs.assert_same_training).
    assert_same_training(got, want, workdir, what="2 processes' parameters against 1")


def test_hosts_generating_the_synthetic_benchmark_at_once_all_get_it(tmp_path) -> None:
    """Every process of a run calls `data_roots`, so all of them generate into one directory at the
    same moment (one machine here; a shared file system on a cluster): none may fail on the others'
    rename."""
    from vlm2vec_jax.cli_config import parse_config
    from vlm2vec_jax.training.data_setup import data_roots

    argv = ["train", "--config", str(REPO / "configs/demo.py"), "--config.data.synthetic=small", f"--config.data.synthetic_dir={tmp_path}"]
    config = parse_config(argv, usage="")
    with ThreadPoolExecutor(3) as pool:
        roots = [f.result() for f in [pool.submit(data_roots, config) for _ in range(3)]]
    assert roots[0] == roots[1] == roots[2] == (tmp_path / "small-seed0" / "train", tmp_path / "small-seed0" / "eval")
    assert (tmp_path / "small-seed0" / "MANIFEST.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["small-seed0"]  # the losers' partial copies are gone
