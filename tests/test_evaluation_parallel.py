"""Data-parallel encoding equals one device: 8 simulated CPU devices in one process, and two
processes (2 devices each) joined by jax.distributed, the weights held as global arrays as a
trainer holds them. Each runs in a subprocess: the device count is fixed before JAX starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training_runs import finish as finish_process, tail, xla_flags
from vlm2vec_jax import Embedder
from vlm2vec_jax.data.mmeb_eval import read_mmeb_eval
from vlm2vec_jax.data.synthetic import generate
from vlm2vec_jax.evaluation.encoding import side_item
from vlm2vec_jax.evaluation.sides import index_queries

pytestmark = pytest.mark.slow
ATOL = 1e-5
TIMEOUT = 900

EIGHT_DEVICES = """
import json, sys
import jax, numpy as np
from vlm2vec_jax import Embedder
from vlm2vec_jax.evaluation.parallel import DataParallelEmbedder

ckpt, items_file, out = sys.argv[1:]
items = json.loads(open(items_file).read())
embedder = DataParallelEmbedder(Embedder.from_pretrained(ckpt))
assert jax.device_count() == embedder.mesh.size == 8, jax.devices()
np.save(out, embedder.encode(items, batch_size=16))
((rows, batch),) = embedder.batches(items[:16], 16)
vectors = embedder.embed_batch(batch)
print(json.dumps({"devices": len(vectors.sharding.device_set), "spec": str(vectors.sharding.spec)}))
"""

TWO_PROCESSES = """
import sys
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", 2)
process, port, ckpt, items_file, out = sys.argv[1:]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process))
import json
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from vlm2vec_jax import Embedder
from vlm2vec_jax.evaluation.parallel import DataParallelEmbedder

items = json.loads(open(items_file).read())
embedder = Embedder.from_pretrained(ckpt)
# weights replicated over both hosts' devices, as the trainer's are: not addressable by one host
everywhere = NamedSharding(jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,)), PartitionSpec())
nnx.update(embedder.model, jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(everywhere, np.asarray(x)), nnx.state(embedder.model)))
assert not any(x.is_fully_addressable for x in jax.tree.leaves(nnx.state(embedder.model)))
parallel = DataParallelEmbedder(embedder)
assert parallel.mesh.size == 2 and jax.device_count() == 4
vectors = parallel.encode(items, batch_size=8)
np.save(out, vectors)
"""


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Distinct sides of three synthetic datasets: text only, image only, image with text."""
    root = tmp_path_factory.mktemp("parallel") / "bench"
    generate(root, seed=0, scale="small")
    queries = read_mmeb_eval(root / "eval", ["SynCls", "SynEdit", "SynGround"])
    return [side_item(side) for name, rows in queries.items() for side in index_queries(name, rows).table.sides]


@pytest.fixture(scope="module")
def one_device(tiny_ckpt: Path, items: list) -> np.ndarray:
    return Embedder.from_pretrained(tiny_ckpt).encode(items, batch_size=16)


def run_script(source: str, args: list[str], env: dict[str, str], tmp_path: Path, name: str = "script") -> tuple[subprocess.Popen, Path, Path]:
    """Start the script with its stdout and stderr into files (tmp_path/name.stdout, .stderr): with
    several children running, a pipe read one child at a time could fill up and block the others."""
    script = tmp_path / "script.py"
    script.write_text(source)
    out, err = tmp_path / f"{name}.stdout", tmp_path / f"{name}.stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(script), *args], env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, stdout=stdout, stderr=stderr,
        )
    return process, out, err


def finish(started: tuple[subprocess.Popen, Path, Path]) -> str:
    """The child's stdout, once it exited 0; otherwise fail with the tail of its stderr."""
    process, out, err = started
    code = finish_process(process, err, TIMEOUT)
    assert code == 0, f"{err.stem}: exit code {code}:\n{tail(err)}"
    return out.read_text()


def test_eight_devices_equal_one(tiny_ckpt, items, one_device, tmp_path):
    items_file = tmp_path / "items.json"
    items_file.write_text(json.dumps(items))
    out = tmp_path / "vectors.npy"
    env = {"XLA_FLAGS": xla_flags(8)}
    report = json.loads(finish(run_script(EIGHT_DEVICES, [str(tiny_ckpt), str(items_file), str(out)], env, tmp_path)))
    assert report == {"devices": 8, "spec": "P('data',)"}  # a full batch really is split 8 ways
    np.testing.assert_allclose(np.load(out), one_device, atol=ATOL, rtol=0)


def test_two_processes_equal_one(tiny_ckpt, items, one_device, tmp_path):
    items_file = tmp_path / "items.json"
    items_file.write_text(json.dumps(items[::4]))  # every kind of item, fewer shapes to compile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"XLA_FLAGS": xla_flags()}
    outs = [tmp_path / f"vectors{i}.npy" for i in range(2)]
    processes = [
        run_script(TWO_PROCESSES, [str(i), str(port), str(tiny_ckpt), str(items_file), str(outs[i])], env, tmp_path, f"process{i}")
        for i in range(2)
    ]
    for process in processes:
        finish(process)
    for out in outs:  # every host ends with every vector, in item order
        np.testing.assert_allclose(np.load(out), one_device[::4], atol=ATOL, rtol=0)
