"""Settings of a command from a TOML file (`--config FILE`) and environment variables, under its flags.

One precedence: a flag given wins over `VITSERVE_<FLAG>` in the environment, which wins over the
file's table for the command, which wins over the default. In the file, a command's table holds its
flags by name (`max-budget = 4096` or `max_budget = 4096`); a setting of no flag is an error that
names it, as is a value the flag would refuse:

    [serve]
    model = "random:qwen3-vl-8b"
    devices = "cuda:0"
    max-budget = 16384
    standby-workers = true

`VITSERVE_MAX_BUDGET=16384 vitserve serve` does the same from the environment (booleans: 1, true,
yes, on or 0, false, no, off).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "VITSERVE_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting from the file or the environment that no flag takes, or a value its flag refuses."""


def settings_defaults(command: argparse.ArgumentParser, name: str, config_file: Path | None,
                      environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The command's defaults from the file's `[name]` table, then the environment over them, as
    destinations of its flags (`dest` -> value, converted and checked as its flags would be)."""
    flags = settings(command)
    values: dict[str, Any] = {}
    if config_file is not None:
        table = _read_table(config_file, name)
        for key, value in table.items():
            action = flags.get(_key(key))
            if action is None:
                raise SettingsError(f"{config_file}: [{name}] has {key!r}, which is no setting of `vitserve {name}`; "
                                    f"its settings: {', '.join(sorted(flags))}")
            values[action.dest] = _from_file(action, key, value, f"{config_file} [{name}]")
    for option, action in flags.items():
        variable = environment_variable(option)
        if variable in environ:
            values[action.dest] = _from_text(action, environ[variable], f"the environment's {variable}")
    return values


def settings(command: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The command's settings by key (`max-budget`): its long flags but --help, --config and the
    logging flags (given before the command as well), and of a --x/--no-x pair only --x."""
    return {_key(option): action for action in command._actions for option in action.option_strings
            if option.startswith("--") and action.dest not in ("help", "config", "verbose", "quiet", "log_format")
            and not (isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-"))}


def environment_variable(key: str) -> str:
    return ENV_PREFIX + key.replace("-", "_").upper()


def _key(name: str) -> str:
    return name.removeprefix("--").replace("_", "-")


def _read_table(path: Path, name: str) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SettingsError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SettingsError(f"--config {path} is not valid TOML: {err}") from None
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: {name} must be a table ([{name}]) of its flags' settings")
    return table


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0  # store_true, store_false, BooleanOptionalAction


def _from_file(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    if _is_switch(action):
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: {key} must be true or false, got {value!r}")
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise SettingsError(f"{where}: {key} must be a {'number' if action.type in (int, float) else 'string'}, "
                            f"got {value!r}")
    return _from_text(action, str(value), where, key)


def _from_text(action: argparse.Action, text: str, where: str, key: str | None = None) -> Any:
    name = key or action.option_strings[0]  # (of a --x/--no-x pair, --x)
    if _is_switch(action):
        word = text.strip().lower()
        if word not in TRUE + FALSE:
            raise SettingsError(f"{where}: {name} must be one of {', '.join(TRUE + FALSE)}, got {text!r}")
        value = word in TRUE
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    try:
        value = action.type(text) if action.type is not None else text
    except (TypeError, ValueError):
        kind = getattr(action.type, "__name__", "value")
        raise SettingsError(f"{where}: {name} must be a valid {kind}, got {text!r}") from None
    if action.choices is not None and value not in action.choices:
        raise SettingsError(f"{where}: {name} must be one of {', '.join(map(str, action.choices))}, got {text!r}")
    return value
