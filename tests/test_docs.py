"""The docs a newcomer follows: every page is reachable from the README, and every command and flag
they name exists (in vitserve's command line, or in the example client they show), and the configuration
reference is the command line's as it stands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from vitserve.cli import build_parser
from vitserve.cli_reference import reference_markdown
from vitserve.engine.metrics import METRICS, PREFIX

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OTHER_TOOLS = ("vllm serve", "python examples/", "pip install", ".venv/bin/pip", "python3 -m venv")
VLLM_FLAGS = {"--ec-transfer-config", "--port"}  # vLLM's own, named where docs/vllm.md starts it


def vitserve_commands() -> dict[str, set[str]]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: {o for a in command._actions for o in a.option_strings} for name, command in subparsers.choices.items()}
    flags[""] = {o for a in parser._actions for o in a.option_strings}
    return flags


def example_flags() -> set[str]:
    """The flags of the vLLM example and of the tools (tools/*.py), which the docs run too."""
    scripts = [ROOT / "examples/vllm_epd_client.py", *sorted((ROOT / "tools").glob("*.py"))]
    return {flag for script in scripts for flag in re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', script.read_text())}


def test_every_docs_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [page.name for page in PAGES[1:] if f"docs/{page.name}" not in readme] == []


def test_the_commands_and_flags_the_docs_name_exist():
    commands = vitserve_commands()
    known_flags = set().union(*commands.values()) | example_flags() | VLLM_FLAGS
    wrong = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if any(tool in line for tool in OTHER_TOOLS):
                continue
            for command in re.findall(r"`vitserve ([a-z]+)", line) + re.findall(r"^\s*(?:\S*/)?vitserve ([a-z]+)", line):
                if command not in commands and command != "ready":  # (`vitserve ready on ...`: the ready line)
                    wrong.append(f"{page.name}:{number}: vitserve {command}")
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
                if flag not in known_flags:
                    wrong.append(f"{page.name}:{number}: {flag}")
    assert wrong == [], "named in the docs, unknown to the command line"


def test_the_metrics_reference_lists_every_metric():
    reference = (ROOT / "docs/operations.md").read_text()
    names = [PREFIX + name + ("_total" if kind == "counter" else "") for name, kind, _ in METRICS.values()]
    assert [name for name in names if f"`{name}`" not in reference] == []


def test_the_configuration_reference_is_generated_from_the_command_line():
    assert (ROOT / "docs/configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md differs from the command line's flags: regenerate it with "
        "`python -m vitserve.cli_reference > docs/configuration.md`")
