"""The shared CLI config convention (`cli_config`) and the eval CLI's model resolution and config file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from vlm2vec_jax.cli_config import USAGE_ERROR, ConfigError, config_keys, dump_config, run_cli
from vlm2vec_jax.eval import main as eval_main
from vlm2vec_jax.models.model_dir import resolve_model_dir

# ml_collections loads config files with the deprecated importlib `load_module`
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
EVAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval_mmeb.py"

CONFIG_FILE = '''
import ml_collections

def get_config():
    config = ml_collections.ConfigDict()
    config.batch_size = 16
    config.model = ""
    config.data = ml_collections.ConfigDict({"root": "data", "max_rows": 0})
    config.positive_prompts = True
    return config
'''


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "example.py"
    path.write_text(CONFIG_FILE)
    return str(path)


def run(argv: list[str], seen: list[ConfigDict] | None = None) -> int:
    def main(config: ConfigDict) -> int:
        if seen is not None:
            seen.append(config)
        return 0

    return run_cli(main, ["prog", *argv], command="vlm2vec_jax.test", example_config="configs/example.py")


def one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("vlm2vec_jax.test: error: ")
    return err


def test_overrides_reach_main_typed_and_locked(config_file):
    seen: list[ConfigDict] = []
    assert run(["--config", config_file, "--config.batch_size=4", "--config.data.root", "elsewhere",
                "--noconfig.positive_prompts"], seen) == 0
    (config,) = seen
    assert (config.batch_size, config.data.root, config.positive_prompts) == (4, "elsewhere", False)
    assert config.data.max_rows == 0
    with pytest.raises(AttributeError):
        config.batch_sise = 3  # locked: a typo in code cannot add a key either


@pytest.mark.parametrize(
    ("override", "bad", "suggestion"),
    [("--config.batch_sise=3", "batch_sise", "did you mean batch_size?"),
     ("--config.data.rot=x", "data.rot", "did you mean data.root"),
     ("--noconfig.positve_prompts", "positve_prompts", "did you mean positive_prompts?"),
     ("--config.zzzz=1", "zzzz", "valid keys: batch_size, data, data.max_rows, data.root, model, positive_prompts")],
)
def test_unknown_key_is_one_line_naming_it_and_the_closest(config_file, capsys, override, bad, suggestion):
    assert run(["--config", config_file, override]) == USAGE_ERROR
    err = one_line_error(capsys)
    assert f"unknown config key '{bad}'" in err and suggestion in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [([], "missing --config; usage: python -m vlm2vec_jax.test --config configs/example.py"),
     (["--config", "no/such/file.py"], "cannot load the config file"),
     (["--config", "{file}", "--config.batch_size=many"], "--config.batch_size=many"),
     (["--config", "{file}", "--bogus"], "bogus")],
)
def test_other_usage_errors_are_one_line(config_file, capsys, argv, message):
    assert run([a.format(file=config_file) for a in argv]) == USAGE_ERROR
    assert message in one_line_error(capsys)


def test_config_error_from_main_is_one_line(config_file, capsys):
    def main(config: ConfigDict) -> int:
        raise ConfigError("model is not set")

    argv = ["prog", "--config", config_file]
    assert run_cli(main, argv, command="vlm2vec_jax.test", example_config="x") == USAGE_ERROR
    assert "model is not set" in one_line_error(capsys)


def test_dump_config_round_trips(config_file, tmp_path):
    seen: list[ConfigDict] = []
    run(["--config", config_file, "--config.data.max_rows=7"], seen)
    path = dump_config(seen[0], tmp_path / "run" / "config.json")
    assert json.loads(path.read_text()) == {
        "batch_size": 16, "data": {"max_rows": 7, "root": "data"}, "model": "", "positive_prompts": True,
    }
    keys = ["batch_size", "data", "data.max_rows", "data.root", "model", "positive_prompts"]
    assert list(config_keys(seen[0])) == keys


def test_every_eval_config_key_is_documented():
    lines = EVAL_CONFIG.read_text().splitlines()
    assigned = [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"\s+config\.([\w.]+) = ", line))]
    required = {"model", "data.root", "datasets", "out", "batch_size", "dtype", "positive_prompts", "position_rule"}
    assert required <= {key for _, key in assigned}
    for i, key in assigned:
        above = i - 1
        while lines[above].strip().startswith("config.") and not lines[above].strip().startswith("config.data ="):
            above -= 1  # a comment may cover a group of consecutive keys (min_pixels, max_pixels)
        assert lines[above].strip().startswith("#") or key == "data", f"config.{key} has no comment"


def test_model_resolution(tiny_ckpt, tmp_path):
    assert resolve_model_dir(str(tiny_ckpt)) == tiny_ckpt
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"nor a training workdir with an exported model in {workdir}/export"):
        resolve_model_dir(str(workdir))
    (workdir / "export").symlink_to(tiny_ckpt)
    assert resolve_model_dir(str(workdir)) == workdir / "export"
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_model_dir(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("override", "message"),
    [("--config.model=", "set --config.model"),
     ("--config.dtype=float16", "config.dtype must be one of ['float32', 'bfloat16'], got 'float16'"),
     ("--config.position_rule=hf4", "config.position_rule must be one of"),
     ("--config.data.bad_data=ignore", "config.data.bad_data must be one of ['error', 'skip']"),
     ("--config.batch_size=0", "config.batch_size must be a positive multiple"),
     ("--config.datasets= ,", "config.datasets is empty")],
)
def test_eval_cli_rejects_bad_values_before_loading_anything(tiny_ckpt, capsys, override, message):
    argv = ["eval", "--config", str(EVAL_CONFIG), f"--config.model={tiny_ckpt}", override]
    assert run_cli(eval_main, argv, command="vlm2vec_jax.eval", example_config="configs/eval_mmeb.py") == USAGE_ERROR
    assert message in capsys.readouterr().err
