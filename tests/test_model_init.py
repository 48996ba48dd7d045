"""The random init of `model.init=random`: fan-in scaled, and each leaf's draw keyed by its path."""

import numpy as np
from flax import nnx

from vlm2vec_jax.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from vlm2vec_jax.models.qwen2_vl.model import Qwen2VL
from vlm2vec_jax.training.model_init import scale_init_

CONFIG = Qwen2VLConfig(
    vision=VisionConfig(depth=2, embed_dim=16, num_heads=1, out_hidden_size=32),
    text=TextConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    mrope_section=(2, 3, 3)),
)


def initialised(extra_attribute: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    model = Qwen2VL(CONFIG, rngs=nnx.Rngs(1))
    if extra_attribute:  # a module gaining a plain attribute adds a node to the graph
        model.language_model.a_new_setting = "x"
    scale_init_(model, seed)
    return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_init_does_not_depend_on_the_graph_around_a_leaf():
    plain, grown = initialised(), initialised(extra_attribute=True)
    assert plain.keys() == grown.keys()
    for name in plain:
        np.testing.assert_array_equal(plain[name], grown[name], err_msg=name)


def test_init_is_fan_in_scaled_distinct_per_leaf_and_seeded():
    params = initialised()
    kernel = params["language_model/layers/o_proj/kernel"]  # (layers, heads, head_dim, out): fan in heads x head_dim
    assert abs(kernel.std() * (kernel.shape[1] * kernel.shape[2]) ** 0.5 - 1) < 0.1
    assert abs(params["language_model/embed_tokens/embedding"].std() - 1) < 0.1
    up, down = params["visual/blocks/fc1/kernel"], params["visual/blocks/fc2/kernel"].transpose(0, 2, 1)
    assert not np.allclose(up * up.shape[-2] ** 0.5, down * down.shape[-1] ** 0.5)  # not one draw reused
    assert not np.array_equal(kernel, initialised(seed=1)["language_model/layers/o_proj/kernel"])
