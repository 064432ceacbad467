"""The command line a newcomer meets: `--version`, -v and -q before or after the command, and a help
line for every flag of every command, with its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from vitserve.cli import build_parser, main


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"vitserve": parser, **subparsers.choices}


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_flag_has_a_help_line(name):
    parser = commands()[name]
    missing = [a.option_strings or a.dest for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, f"`vitserve {name}` flags without help: {missing}"


def test_help_shows_defaults():
    text = commands()["serve"].format_help()
    assert "--max-budget" in text and "(default: 8192)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_version_and_verbosity_anywhere():
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("vitserve ")
    parser = build_parser()
    assert parser.parse_args(["-v", "keys", "d", "n"]).verbose and parser.parse_args(["keys", "d", "n", "-v"]).verbose
    assert parser.parse_args(["keys", "d", "n", "-q"]).quiet
    assert not hasattr(parser.parse_args(["keys", "d", "n"]), "verbose")
    assert main(["-v", "keys", "d", "n", "-q"]) == 2


def test_serve_starts_its_gpu_workers_before_it_imports_torch():
    """`vitserve serve` spawns its GPU workers first thing (launch.py): importing torch before, for
    any command's parser, delays every start on a GPU by the seconds torch takes to import."""
    probe = ("import sys, vitserve.launch as launch\n"
             "def reached(*args, **kwargs):\n"
             "    print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
             "    raise SystemExit(0)\n"
             "launch.launch_early = reached\n"
             "from vitserve.cli import main\n"
             "main(['serve', '--model', 'random:tiny', '--devices', 'cuda:0'])\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "no torch", done.stdout + done.stderr
