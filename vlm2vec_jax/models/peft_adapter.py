"""PEFT adapter directories in and out: `adapter_config.json` + `adapter_model.safetensors`, the
format VLM2Vec and B3 release their LoRA/DoRA adapters in, on top of a separate base model.

Why the mapping is exact. Our decoder fuses q|k|v and gate|up into one linear each, but a fused
LoRA (one A over the concatenated outputs) is not a sum of separate ones: q, k and v would share
A's row space, and DoRA would normalise columns of the fused update. `LoRALinear` therefore keeps
one adapter group per Hugging Face projection, each with its own A, B and magnitude acting on that
projection's column block only, which is what PEFT computes on the separate linear. DoRA's norm is
per output column, so a group's norm sees only its own columns, as PEFT's row norm of the separate
weight does. A PEFT module's tensors are then one group's slice at one layer, transposed:

    lora_A.weight          (r, in)  = a[layer].T          a: (layers, in, r)
    lora_B.weight          (out, r) = b[layer].T          b: (layers, r, out)
    lora_magnitude_vector  (out,)   = magnitude[layer]    magnitude: (layers, out)

with the scale alpha / r from `lora_alpha` and `r` (not rsLoRA). Keys are written as PEFT 0.21 on
transformers 5 names them for the backbone's class (e.g. `Qwen2VLForConditionalGeneration`):
`base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.weight`; read are also
the `Qwen2VLModel` layout (`base_model.model.language_model.layers...`) and transformers 4.x's
(`base_model.model.model.layers...`, released VLM2Vec adapters). Anything in a config or a file
that we would not compute as PEFT does (another peft_type, rsLoRA, bias or embedding training,
per-layer ranks, modules outside the language model's projections, ...) is a ValueError naming
the key and the file, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm2vec_jax.models.lora import HF_TARGETS, LoRAConfig, LoRALinear, apply_lora, lora_config_of
from vlm2vec_jax.models.backbones import ModelConfig, backbone_of, checkpoint_rules
from vlm2vec_jax.models.hf_export import SIDECAR_FILES
from vlm2vec_jax.models.hf_import import load_pretrained
from vlm2vec_jax.models.vision_language_model import VisionLanguageModel
from vlm2vec_jax.models.safetensors_files import iter_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Where each HF projection sits in a decoder layer.
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
WRITE_PREFIX = "base_model.model.model.language_model.layers"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.language_model\.|language_model\.|model\.)layers\.(?P<layer>\d+)\."
    r"(?P<block>self_attn|mlp)\.(?P<target>\w+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)
_KINDS = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude"}

# Keys that change what the adapter computes, and the only value we reproduce (PEFT's default).
_FIXED = {
    "peft_type": ("LORA", "only LoRA / DoRA adapters are supported"),
    "bias": ("none", "bias training is not supported (it changes the base model's biases)"),
    "use_rslora": (False, "rsLoRA scales by alpha / sqrt(r); we scale by alpha / r as PEFT's default does"),
    "fan_in_fan_out": (False, "transposed (Conv1D) weights do not occur in Qwen2-VL"),
    "lora_bias": (False, "a bias on lora_B is not supported"),
    "use_qalora": (False, "QALoRA is not supported"),
}
# Keys that must be unset (None or empty): each adds state or behaviour we do not have.
_UNSET = {
    "modules_to_save": "fully trained modules (modules_to_save) are not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported: one r for every module",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported: one lora_alpha for every module",
    "layers_to_transform": "adapters on some layers only (layers_to_transform) are not supported",
    "layer_replication": "layer replication is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "adapters on raw parameters (target_parameters) are not supported",
    "megatron_config": "Megatron-parallel adapters are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
}
# Keys that do not change the computation (bookkeeping, or initialisation that left the base alone).
_IGNORED = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_dora", "init_lora_weights",
    "layers_pattern", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "qalora_group_size", "runtime_config", "ensure_weight_tying",
}
# Initialisations whose trained adapter applies to the unmodified base. PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA subtract their initial update from the base weights, MiCA changes the forward.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
    """An adapter directory read into our layout: `tensors[(target, leaf)]` is the (layers, ...)
    float32 stack of one HF projection's `a` (in, r), `b` (r, out) or DoRA `magnitude` (out,)."""

    directory: Path
    config: LoRAConfig
    base: str | None  # base_model_name_or_path as written
    tensors: dict[tuple[str, str], np.ndarray]

    @property
    def num_layers(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (it has adapter_config.json), as opposed to a full model directory."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str, tuple)) and not value)


def _unsupported(file: Path, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{file}: {key}={value!r} is not supported: {why}")


def _read_config(directory: str | Path) -> tuple[LoRAConfig, str | None, Any]:
    """(LoRAConfig, base_model_name_or_path, target_modules) of `directory/adapter_config.json`,
    after rejecting every key whose value we would not compute as PEFT does."""
    file = Path(directory).expanduser() / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a PEFT adapter directory needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    for key, (expected, why) in _FIXED.items():
        if raw.get(key, expected) != expected:
            raise _unsupported(file, key, raw[key], why)
    for key, why in _UNSET.items():
        if not _empty(raw.get(key)):
            raise _unsupported(file, key, raw[key], why)
    init = raw.get("init_lora_weights", True)
    if not any(init is plain if isinstance(plain, bool) else init == plain for plain in _PLAIN_INITS):
        raise _unsupported(file, "init_lora_weights", init, "adapters initialised this way are trained against a modified base "
                           f"(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or change the forward (MiCA); supported: {list(_PLAIN_INITS)}")
    unknown = [k for k, v in raw.items() if k not in _FIXED and k not in _UNSET and k not in _IGNORED and not _empty(v)]
    if unknown:
        raise _unsupported(file, unknown[0], raw[unknown[0]], "a key this reader does not know (a newer PEFT?); "
                           "refusing to guess whether it changes the adapter's output")
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise ValueError(f"{file}: missing {key!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        for entry in targets:
            if entry not in HF_TARGETS:
                raise _unsupported(file, "target_modules", entry, f"only the language model's projections {list(HF_TARGETS)} can be "
                                   "placed (the vision tower and other modules are never adapted here)")
    rank, alpha = raw["r"], raw["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise _unsupported(file, "lora_alpha", alpha, "lora_alpha must be a number")
    try:
        config = LoRAConfig(rank, float(alpha), float(raw.get("lora_dropout") or 0.0), HF_TARGETS, bool(raw.get("use_dora", False)))
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    return config, raw.get("base_model_name_or_path"), targets


def read_peft_adapter(directory: str | Path) -> PeftAdapter:
    """The adapter of a PEFT directory in our layout (A and B transposed, stacked over layers,
    float32 whatever the file's dtype), checked for completeness: every targeted projection on
    every layer, ranks equal to `r`, magnitudes exactly when `use_dora`."""
    directory = Path(directory).expanduser()
    config, base, listed = _read_config(directory)
    file = directory / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found (adapter_model.bin, PyTorch pickles, are not read: re-save with safetensors)")
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for key, tensor in iter_tensors(file):
        match = _KEY.match(key)
        target = match["target"] if match else None
        if match is None or target not in HF_TARGETS or BLOCK[target] != match["block"]:
            raise ValueError(
                f"{file}: tensor {key} is not a LoRA tensor of a language-model projection we can place "
                f"({', '.join(HF_TARGETS)} under model.language_model.layers.N.self_attn / .mlp); "
                "adapters on the vision tower, the embeddings or the LM head are not supported"
            )
        leaf = _KINDS[match["kind"]]
        value = np.asarray(tensor, np.float32)
        found.setdefault((target, leaf), {})[int(match["layer"])] = value.T.copy() if leaf in ("a", "b") else value.copy()
    if not found:
        raise ValueError(f"{file}: no LoRA tensors")
    targets = tuple(t for t in HF_TARGETS if (t, "a") in found or (t, "b") in found)
    if isinstance(listed, list) and set(listed) != set(targets):
        raise ValueError(f"{directory / ADAPTER_CONFIG}: target_modules {sorted(listed)} but {file.name} holds adapters for {list(targets)}")
    layers = 1 + max(layer for per_layer in found.values() for layer in per_layer)
    leaves = ("a", "b", "magnitude") if config.use_dora else ("a", "b")
    if not config.use_dora and any(leaf == "magnitude" for _, leaf in found):
        raise ValueError(f"{file}: holds lora_magnitude_vector tensors (DoRA) but {ADAPTER_CONFIG} says use_dora=false")
    tensors = {}
    for target in targets:
        for leaf in leaves:
            per_layer = found.get((target, leaf), {})
            missing = sorted(set(range(layers)) - set(per_layer))
            if missing:
                kind = {"a": "lora_A.weight", "b": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[leaf]
                raise ValueError(f"{file}: no {target}.{kind} for layer(s) {missing} of {layers}: adapters must cover every layer")
            shapes = {per_layer[i].shape for i in range(layers)}
            if len(shapes) > 1:
                raise ValueError(f"{file}: {target} {leaf} tensors differ in shape across layers: {sorted(shapes)}")
            tensors[(target, leaf)] = np.stack([per_layer[i] for i in range(layers)])
        a, b = tensors[(target, "a")], tensors[(target, "b")]
        if a.shape[-1] != config.rank or b.shape[1] != config.rank:
            raise ValueError(f"{file}: {target} has rank {a.shape[-1]} (lora_A) / {b.shape[1]} (lora_B) but {ADAPTER_CONFIG} says r={config.rank}")
    return PeftAdapter(directory, dataclasses.replace(config, targets=targets), base, tensors)


def base_dir(adapter_dir: str | Path, base: str | Path | None = None) -> Path:
    """The base model's local directory: `base` when given, else the adapter's
    base_model_name_or_path. Nothing is downloaded: a hub name must be given as a local copy."""
    adapter_dir = Path(adapter_dir).expanduser()
    _, written, _ = _read_config(adapter_dir)
    source = f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path"
    if base is None:
        if not written:
            raise ValueError(f"{source} is empty: pass the base model's directory (base=...)")
        base, source = written, f"{source} {written!r}"
    else:
        source = f"base {str(base)!r} (for {adapter_dir})"
    path = Path(base).expanduser()
    if is_adapter_dir(path):
        raise ValueError(f"{source} is itself a PEFT adapter directory; stacked adapters are not supported")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{source} is not a local Hugging Face model directory (config.json + *.safetensors); nothing is "
            "downloaded from a model hub: pass base= a local copy of the base model"
        )
    return path


def processor_dir(adapter_dir: str | Path, base: Path) -> Path:
    """Where the tokenizer and preprocessor_config.json come from: the adapter directory when it
    carries both (our exports do), else the base model's directory."""
    adapter_dir = Path(adapter_dir).expanduser()
    if (adapter_dir / "tokenizer_config.json").is_file() and (adapter_dir / "preprocessor_config.json").is_file():
        return adapter_dir
    return base


def apply_peft_adapter(model: VisionLanguageModel, adapter: PeftAdapter, *, dropout: float | None = None) -> None:
    """Add the adapter to `model` (in place) as trainable `LoRALinear` groups holding the file's
    values; `dropout` replaces the file's lora_dropout (a training choice, not part of the adapter)."""
    config = adapter.config if dropout is None else dataclasses.replace(adapter.config, dropout=dropout)
    if adapter.num_layers != model.config.text.num_layers:
        raise ValueError(
            f"{adapter.directory / ADAPTER_WEIGHTS}: adapters for {adapter.num_layers} layers but the base model has "
            f"{model.config.text.num_layers}: the adapter was trained on another base"
        )
    apply_lora(model, config, nnx.Rngs(0))
    for owner, attribute, names in model.lora_sites():
        for name in names:
            if name not in config.targets:
                continue
            group = getattr(owner, attribute).lora[name]
            for leaf in ("a", "b", "magnitude") if config.use_dora else ("a", "b"):
                variable = getattr(group, leaf)
                value = adapter.tensors[(name, leaf)]
                if value.shape != variable[...].shape:
                    raise ValueError(
                        f"{adapter.directory / ADAPTER_WEIGHTS}: {name} {leaf} is {value.shape} (ours, layers first) but the base "
                        f"model implies {variable[...].shape}: the adapter was trained on another base"
                    )
                variable.set_value(jnp.asarray(value))


def load_adapted(
    directory: str | Path, *, base: str | Path | None = None, dropout: float | None = None, **load_options: Any
) -> tuple[VisionLanguageModel, PeftAdapter, Path]:
    """(base model with the adapter applied, unmerged; the adapter; the base directory).
    `load_options` go to `hf_import.load_pretrained` (dtype, param_dtype, remat, attention, sharding_for)."""
    adapter = read_peft_adapter(directory)
    base_path = base_dir(directory, base)
    model = load_pretrained(base_path, **load_options)
    apply_peft_adapter(model, adapter, dropout=dropout)
    return model, adapter, base_path


def _peft_tensors(model: VisionLanguageModel) -> dict[str, np.ndarray]:
    """PEFT's state dict (adapter name stripped) of the model's adapters, per layer and projection."""
    out: dict[str, np.ndarray] = {}
    for owner, attribute, _ in model.lora_sites():
        adapter = getattr(owner, attribute)
        if not isinstance(adapter, LoRALinear):
            continue
        for name, group in adapter.lora.items():
            leaves: list[tuple[str, Callable[[np.ndarray], np.ndarray], Any]] = [
                ("lora_A.weight", np.transpose, group.a), ("lora_B.weight", np.transpose, group.b),
            ]
            if group.magnitude is not None:
                leaves.append(("lora_magnitude_vector", np.asarray, group.magnitude))
            for suffix, layout, variable in leaves:
                stack = np.asarray(variable[...], np.float32)
                for i in range(stack.shape[0]):
                    out[f"{WRITE_PREFIX}.{i}.{BLOCK[name]}.{name}.{suffix}"] = np.ascontiguousarray(layout(stack[i]))
    return out


def peft_target_modules(targets: tuple[str, ...], backbone_config: ModelConfig) -> list[str] | str:
    """PEFT's `target_modules` for adapters on the language model's `targets`: the plain list of
    names (as VLM2Vec's adapters carry) unless the vision tower has modules of those names
    (Qwen2.5-VL's gate/up/down_proj), where PEFT would adapt them too; then a regex that PEFT
    full-matches against module paths, naming the language model's layers only."""
    vision_modules = {template.split(".")[-2] for rule in checkpoint_rules(backbone_config) for template, _ in rule.parts
                      if template.startswith("visual.")}
    if not vision_modules & set(targets):
        return list(targets)
    return rf".*\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(targets)})"


def adapter_config_dict(config: LoRAConfig, backbone_config: ModelConfig, base: str | Path | None) -> dict[str, Any]:
    """The adapter_config.json PEFT would write for `config` on the transformers class of
    `backbone_config`'s backbone (keys it fills with defaults left out)."""
    backbone = backbone_of(backbone_config)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None if base is None else str(base),
        "auto_mapping": {"base_model_class": backbone.architecture, "parent_library": backbone.transformers_module},
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_dora": config.use_dora,
        "target_modules": peft_target_modules(config.targets, backbone_config), "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def write_peft_adapter(model: VisionLanguageModel, out: str | Path, *, base: str | Path | None, processor: str | Path | None = None) -> Path:
    """Write the model's adapters as a PEFT directory: adapter_config.json (base_model_name_or_path
    = `base`, as written) and adapter_model.safetensors (float32), plus the tokenizer and
    preprocessor files of `processor` (a model directory) when given. `PeftModel.from_pretrained(
    <the backbone's transformers class>.from_pretrained(base), out)` loads it."""
    from safetensors.numpy import save_file

    out = Path(out)
    config = lora_config_of(model)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_peft_tensors(model), out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(config, model.config, base), indent=2))
    if processor is not None and Path(processor).resolve() != out.resolve():
        for name in SIDECAR_FILES:
            if (Path(processor) / name).is_file():
                shutil.copy2(Path(processor) / name, out / name)
    return out
