"""docs/configuration.md: every command's settings as its file key, environment variable and flag, from the
parsers themselves (and cli_config's reading of them), so the page cannot name a setting that does not exist.

    python -m vitserve.cli_reference > docs/configuration.md
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vitserve.cli import build_parser
from vitserve.cli_config import FALSE, TRUE, environment_variable, settings


def _words(words: tuple[str, ...]) -> str:
    return ", ".join(f"`{w}`" for w in words[:-1]) + f" or `{words[-1]}`"


HEADER = f"""# Configuration reference

Generated from the command line by `python -m vitserve.cli_reference > docs/configuration.md`: regenerate
it when a flag changes rather than editing it.

Each setting comes from three places, each over the one before: the command's table in the TOML file
given with `--config FILE` (`[serve]`, `[bench]`, ...), the environment variable, and the flag; a
setting given nowhere takes its default. A variable is read by every command with that flag
(`VITSERVE_DEVICES` by `serve`, `demo`, `soak` and `bench` alike). [operations.md](operations.md#configuration)
shows a file and what happens to a setting that no flag takes.

In the file, a key may have dashes or underscores (`max-budget` or `max_budget`). A switch is `true` or
`false` there, and in the environment {_words(TRUE)} (true) or {_words(FALSE)} (false);
a pair such as `--standby-workers` / `--no-standby-workers` is one setting, `standby-workers`. A list
(`devices`, `budgets`, ...) is one comma-separated string, as on the command line, not a TOML array. An
empty default means none: the description says what happens then. `-v`, `-q`, `--log-format` and
`--config` are flags only (the log format also reads `VITSERVE_LOG_FORMAT`).
"""

COLUMNS = ("flag", "file key", "environment", "value", "default", "description")
KINDS = {int: "integer", float: "number", Path: "path", None: "text"}
# Help texts that name this machine's paths, written as any machine would read them.
MACHINE = {f"/tmp/vitserve-{os.getuid()}/": "/tmp/vitserve-$UID/", str(Path.home()) + "/": "~/"}


def reference_markdown() -> str:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    sections = [HEADER]
    for name, command in commands.items():
        keys: dict[argparse.Action, list[str]] = {}  # (a flag with two long spellings has two keys)
        for key, action in settings(command).items():
            keys.setdefault(action, []).append(key)
        if keys:
            rows = [COLUMNS, ["---"] * len(COLUMNS), *(_row(command, action, names) for action, names in keys.items())]
            sections.append(f"## `vitserve {name}`\n\n" + "".join(_line(cells) for cells in rows))
    return "\n".join(sections)


def _row(command: argparse.ArgumentParser, action: argparse.Action, keys: list[str]) -> list[str]:
    help_text = argparse.HelpFormatter(command.prog)._expand_help(action) if action.help else ""  # (%(default)s)
    return [", ".join(f"`{o}`" for o in action.option_strings), " or ".join(f"`{k}`" for k in keys),
            " or ".join(f"`{environment_variable(k)}`" for k in keys), _kind(action), _default(action), help_text]


def _kind(action: argparse.Action) -> str:
    if action.nargs == 0:  # a switch, as cli_config reads it
        return "`true` or `false`"
    if action.choices is not None:
        return "one of " + ", ".join(f"`{c}`" for c in action.choices)
    return KINDS.get(action.type, getattr(action.type, "__name__", "text"))


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value == argparse.SUPPRESS:
        return ""
    if isinstance(action, argparse._StoreFalseAction):  # the file's `x = true` gives the flag: False
        value = not value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if isinstance(value, (int, float)) else f"`{json.dumps(str(value))}`"  # as the file writes it


def _line(cells) -> str:
    for here, anywhere in MACHINE.items():
        cells = [cell.replace(here, anywhere) for cell in cells]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
