"""The command-line convention every CLI of the project shares (train, mine, eval):

    python -m vlm2vec_jax.<verb> --config configs/<name>.py [--config.key=value ...]

A config file is a Python module whose `get_config()` returns an `ml_collections.ConfigDict`;
`--config.a.b=value` overrides one (nested) key, parsed as that key's type. A CLI module is thin:

    def main(config: ConfigDict) -> int: ...
    if __name__ == "__main__":
        sys.exit(run_cli(main, command="vlm2vec_jax.eval", example_config="configs/eval_mmeb.py"))

Why not plain `absl.app.run`: a misspelt key makes ml_collections raise a KeyError from inside the
flag parser, printed as a three-exception traceback; `run_cli` checks every override against the
config's keys first and prints one line naming the bad key and the closest valid ones, exit code 2
(the usual code for a usage error), as it does for a missing `--config`, an unreadable config file,
a value of the wrong type, and a `ConfigError` raised by `main` for a bad value.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from absl import flags
from ml_collections import ConfigDict, config_flags

__all__ = ["USAGE_ERROR", "ConfigError", "config_keys", "dump_config", "parse_config", "run_cli"]

USAGE_ERROR = 2
# Failures whose message says all a user needs (bad data or file, bad value, NaN loss, out of memory):
# a CLI prints the message alone and exits 1.
REPORTED_ERRORS = (ValueError, FileNotFoundError, MemoryError, FloatingPointError)
_FLAG = "config"
_OVERRIDE_PREFIXES = (f"--{_FLAG}.", f"-{_FLAG}.", f"--no{_FLAG}.", f"-no{_FLAG}.")


class ConfigError(ValueError):
    """A usage error: bad command line, unknown key, or a config value the CLI cannot use."""


def config_keys(config: ConfigDict, prefix: str = "") -> Iterator[str]:
    """Every dotted key path of `config`, nested dicts included as well as their leaves."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, ConfigDict):
            yield from config_keys(value, f"{path}.")


def _override_key(arg: str) -> str | None:
    """The dotted key of a `--config.a.b=v` (or `--noconfig.flag`) argument; None for other args."""
    for prefix in _OVERRIDE_PREFIXES:
        if arg.startswith(prefix):
            return arg[len(prefix) :].split("=", 1)[0]
    return None


def _load(argv: Sequence[str]) -> ConfigDict | None:
    """The config `argv` names, its overrides applied by absl; None when --config is absent."""
    values = flags.FlagValues()
    # sys_argv: override flags are defined from the argument list, by default the real sys.argv.
    holder = config_flags.DEFINE_config_file(
        _FLAG, None, "path to the config file", flag_values=values, sys_argv=list(argv)
    )
    try:
        values(list(argv))
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    config = holder.value
    if config is None:
        return None
    try:
        config.keys()  # an unreadable file yields a placeholder that raises on first use
    except OSError as e:
        raise ConfigError(f"cannot load the config file: {e.__cause__ or e}") from None
    return config


def parse_config(argv: Sequence[str], *, usage: str) -> ConfigDict:
    """The locked config `argv` (program name first) describes; `ConfigError` for any usage error.
    `usage` is the one-line usage shown when --config is missing."""
    overrides = [a for a in argv[1:] if _override_key(a) is not None]
    config = _load([argv[0], *(a for a in argv[1:] if a not in overrides)])
    if config is None:
        raise ConfigError(f"missing --config; usage: {usage}")
    keys = list(config_keys(config))
    for arg in overrides:
        key = _override_key(arg)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}?" if close else f"valid keys: {', '.join(keys)}"
            raise ConfigError(f"unknown config key {key!r} (from {arg}); {hint}")
    return _load(argv)


def run_cli(
    main: Callable[[ConfigDict], int | None],
    argv: Sequence[str] | None = None,
    *,
    command: str,
    example_config: str,
) -> int:
    """Parse `argv` (default `sys.argv`) into a config and run `main(config)`; returns the exit code
    (`main`'s, 0 for None). Usage errors, and `ConfigError`s raised by `main`, print one line to
    stderr and return 2. `command` and `example_config` make the usage line
    (`python -m <command> --config <example_config> [--config.key=value ...]`)."""
    argv = list(sys.argv if argv is None else argv)
    usage = f"python -m {command} --config {example_config} [--config.key=value ...]"
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        print(f"usage: {usage}\nEvery key of the config file can be overridden; see {example_config}.")
        return 0
    try:
        return main(parse_config(argv, usage=usage)) or 0
    except ConfigError as e:
        print(f"{command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return USAGE_ERROR


def dump_config(config: ConfigDict, path: str | os.PathLike) -> Path:
    """Write `config` as sorted, indented JSON (values JSON cannot hold become strings), atomically:
    the record of what a run directory was produced with. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
