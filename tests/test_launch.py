"""`launch/tpu_pod.sh --dry-print`: the gcloud command it would run, parsed back as a shell would."""

from __future__ import annotations

import shlex
import subprocess

from training_runs import REPO

SCRIPT = REPO / "launch/tpu_pod.sh"
TRAIN = ["python", "-m", "vlm2vec_jax.train", "--config", "configs/qwen2vl_2b_vlm2vec.py", "--config.workdir=gs://bucket/run 1"]


def dry_print(*args: str) -> list[str]:
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def test_dry_print_runs_the_command_on_every_worker_with_the_coordinator_auto() -> None:
    argv = dry_print("my-tpu", "us-central2-b", "--project", "proj", "--dir", "/srv/vlm2vec jax", "--dry-print", "--", *TRAIN)
    assert argv[:-1] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b", "--project", "proj",
        "--worker=all", "--command",
    ]
    # what each worker's shell runs: the directory and every argument survive quoting (spaces included)
    assert shlex.split(argv[-1]) == ["cd", "/srv/vlm2vec jax", "&&", *TRAIN, "--config.distributed.coordinator=auto"]


def test_a_home_relative_dir_is_left_to_each_worker_and_no_project_is_added() -> None:
    argv = dry_print("t", "z", "--dir", "~/code", "--dry-print", "--", "python", "-m", "vlm2vec_jax.train")
    assert "--project" not in argv
    assert argv[-1].startswith("cd ~/code && ")  # "~" unquoted: each worker's own home


def test_a_command_without_the_separator_is_a_usage_error() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "t", "z", "--dry-print", "python"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage:" in done.stderr
