"""The attention kernels agree: splash (TPU's Pallas kernel, run here in interpret mode) and XLA's
fused attention equal the dense masked path on packed rows, forward and backward, in the decoder
(causal, grouped queries) and the vision tower (full, per image)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from training_runs import xla_flags
from vlm2vec_jax import Embedder
from vlm2vec_jax.models.attention import SegmentMask, attention, resolve
from vlm2vec_jax.models.backbones import read_config
from vlm2vec_jax.models.qwen2_vl.config import ConfigError
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.testing.tiny_checkpoint import tiny_image

RTOL = 1e-5
# Two rows: three sequences and padding, then one sequence over a length that is no block multiple.
SEGMENTS = np.zeros((2, 200), np.int32)
SEGMENTS[0, :90], SEGMENTS[0, 90:150], SEGMENTS[0, 150:185] = 1, 2, 3
SEGMENTS[1, :170] = 1


def qkv(heads: int, kv_heads: int, head_dim: int = 16) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(0), 3)
    batch, length = SEGMENTS.shape
    return tuple(jax.random.normal(key, (batch, length, h, head_dim)) for key, h in zip(keys, (heads, kv_heads, kv_heads)))


def real_loss(implementation: str, causal: bool, weights: jax.Array):
    """A loss over the real (non-padding) tokens only: padding outputs are free per kernel."""
    ids = jnp.asarray(SEGMENTS)

    def loss(q, k, v):
        out = attention(q, k, v, SegmentMask.build(ids, causal=causal, implementation=implementation))
        return jnp.sum(out * weights * (ids > 0)[:, :, None, None])

    return loss


@pytest.mark.parametrize("implementation", ["splash", "xla"])
@pytest.mark.parametrize(("causal", "heads", "kv_heads"), [(True, 4, 2), (False, 4, 4)])
def test_kernel_equals_dense(implementation, causal, heads, kv_heads):
    q, k, v = qkv(heads, kv_heads)
    weights = jax.random.normal(jax.random.key(1), q.shape)
    real = SEGMENTS > 0
    outputs = {}
    for name in ("dense", implementation):
        mask = SegmentMask.build(jnp.asarray(SEGMENTS), causal=causal, implementation=name)
        outputs[name] = (np.asarray(attention(q, k, v, mask))[real], jax.grad(real_loss(name, causal, weights), (0, 1, 2))(q, k, v))
    ours, dense = outputs[implementation], outputs["dense"]
    np.testing.assert_allclose(ours[0], dense[0], rtol=RTOL, atol=RTOL)
    for g, g_dense in zip(ours[1], dense[1]):
        np.testing.assert_allclose(g, g_dense, rtol=RTOL, atol=RTOL * np.abs(g_dense).max())


def test_queries_subset_equals_full_rows():
    """`for_queries` (the inference path's last layer) is the full mask's rows at those tokens."""
    q, k, v = qkv(4, 2)
    index = jnp.asarray([[89, 149, 184], [169, 0, 0]])
    mask = SegmentMask.build(jnp.asarray(SEGMENTS), causal=True, implementation="dense")
    full = attention(q, k, v, mask)
    picked = attention(jnp.take_along_axis(q, index[..., None, None], axis=1), k, v, mask.for_queries(index))
    np.testing.assert_allclose(picked, jnp.take_along_axis(full, index[..., None, None], axis=1), rtol=RTOL, atol=RTOL)


def test_model_with_splash_equals_dense(tiny_ckpt):
    """The whole model, packed rows with images: embeddings and parameter gradients agree."""
    items = [{"image": tiny_image(100, 60, 1), "text": "<|image_pad|> what is it?"}, "a short text",
             {"image": [tiny_image(56, 120, 2), tiny_image(40, 40, 3)], "text": "<|image_pad|> and <|image_pad|>"}, "bus"]
    (_, batch), = Embedder.from_pretrained(tiny_ckpt).batches(items, 4)
    assert batch["attention_mask"].max() >= 2  # several sequences share a row
    batch = {key: jnp.asarray(value) for key, value in batch.items()}

    def embeddings_and_grads(implementation):
        model = load_pretrained(tiny_ckpt, attention=implementation)
        graphdef, params = nnx.split(model)
        direction = jax.random.normal(jax.random.key(2), (batch["pool_positions"].size, model.config.text.hidden_size))

        def loss(params):
            return jnp.sum(nnx.merge(graphdef, params).embed(batch) * direction)

        return nnx.merge(graphdef, params).embed(batch), jax.grad(loss)(params)

    dense, splash = embeddings_and_grads("dense"), embeddings_and_grads("splash")
    np.testing.assert_allclose(splash[0], dense[0], rtol=RTOL, atol=RTOL)
    for (path, g_dense), (_, g_splash) in zip(nnx.to_flat_state(dense[1]), nnx.to_flat_state(splash[1])):
        g_dense, g_splash = np.asarray(g_dense.get_value()), np.asarray(g_splash.get_value())
        np.testing.assert_allclose(g_splash, g_dense, rtol=RTOL, atol=RTOL * max(np.abs(g_dense).max(), 1e-12), err_msg=str(path))


def test_unknown_kernel_is_named(tiny_ckpt):
    with pytest.raises(ValueError, match="model.attention='flash'; valid: auto, dense, xla, splash"):
        resolve("flash")
    with pytest.raises(ConfigError, match="attention 'flash' is not one of"):
        read_config(tiny_ckpt, attention="flash")
    assert resolve("auto") == {"cpu": "dense", "gpu": "xla", "tpu": "splash"}[jax.default_backend()]


ON_A_MESH = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
from test_attention import SEGMENTS, qkv
from vlm2vec_jax.models.attention import SegmentMask, attention

mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
q, k, v = qkv(4, 2)
ids = jnp.asarray(SEGMENTS)
rows = NamedSharding(mesh, P("data"))  # 2 rows: the wrapper splits them over data, not fsdp
placed = [jax.device_put(x, rows) for x in (q, k, v, ids)]

def run(implementation):
    f = jax.jit(lambda q, k, v, s: attention(q, k, v, SegmentMask.build(s, causal=True, implementation=implementation)))
    with jax.set_mesh(mesh):
        text = f.lower(*placed).as_text()
        return np.asarray(f(*placed)), text

splash, text = run("splash")
dense, _ = run("dense")
real = SEGMENTS > 0
print(json.dumps({"max_diff": float(np.abs(splash - dense)[real].max()), "shard_map": "shard_map" in text or "manual" in text}))
"""


def test_splash_runs_per_shard_under_a_mesh():
    """Under jit on a mesh (the FSDP/TP step), the Pallas call is wrapped in shard_map over the
    rows (XLA cannot partition it) and still equals dense."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(8)}
    done = subprocess.run([sys.executable, "-c", ON_A_MESH, os.path.dirname(__file__)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shard_map"] and result["max_diff"] < RTOL, result
