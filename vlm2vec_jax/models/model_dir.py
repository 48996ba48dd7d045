"""Which model directory a command line's model argument names (eval's `model`, mine's `teacher`):
a Hugging Face directory, a PEFT adapter directory, or a training workdir's exported model.
Checked before anything is loaded, so a wrong path is a usage error, not a load failure."""

from __future__ import annotations

from pathlib import Path

from vlm2vec_jax.cli_config import ConfigError
from vlm2vec_jax.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_dir, is_adapter_dir

EXPORT_DIR = "export"  # where a training run exports its model, inside its workdir


def resolve_model_dir(path: str) -> Path:
    """A Hugging Face directory or a PEFT adapter directory as given, or a training workdir's
    `export/` (either kind); an adapter is merged onto its base_model_name_or_path when loaded."""
    if not path:
        raise ConfigError("set --config.model to a Hugging Face model directory, a PEFT adapter directory or a training workdir")
    root = Path(path)
    export = root / EXPORT_DIR
    if export.is_dir():
        root = export
    elif not root.is_dir():
        raise ConfigError(f"model {path}: no such directory")
    if is_adapter_dir(root):
        if not (root / ADAPTER_WEIGHTS).is_file():
            raise ConfigError(f"model {path}: {root / ADAPTER_CONFIG} without {ADAPTER_WEIGHTS}")
        try:
            base_dir(root)  # before anything is loaded: a supported adapter config, and its base on disk
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"model {path}: {err}") from None
        return root
    if not (root / "config.json").is_file() or not any(root.glob("*.safetensors")):
        raise ConfigError(
            f"model {path}: neither a Hugging Face model directory (config.json + *.safetensors), a PEFT adapter directory "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) nor a training workdir with an exported model in {export} "
            "(export the trained weights first)"
        )
    return root
