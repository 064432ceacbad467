"""One configuration story: a TOML file (`--config`), then VITSERVE_<FLAG> environment variables, then
flags, each over the one before; a setting no flag takes, or a value its flag refuses, is an error
that names it, before anything slow starts."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from vitserve.cli import build_parser
from vitserve.cli_config import SettingsError, settings_defaults


def serve_settings(config_file=None, environ=None, flags=()):
    parser = build_parser()
    command = parser._subparsers._group_actions[0].choices["serve"]
    command.set_defaults(**settings_defaults(command, "serve", config_file, environ or {}))
    return parser.parse_args(["serve", *flags])


def test_file_then_environment_then_flags(tmp_path):
    file = tmp_path / "vitserve.toml"
    file.write_text('[serve]\nmax-budget = 4096\nmin_budget = 128\ndevices = "cuda:0"\nstandby-workers = true\n'
                    'policy = "immediate"\n[bench]\nrequests = 3\n')
    args = serve_settings(file)
    assert (args.max_budget, args.min_budget, args.devices, args.standby_workers, args.policy) == (
        4096, 128, "cuda:0", True, "immediate")
    args = serve_settings(file, {"VITSERVE_MAX_BUDGET": "2048", "VITSERVE_STANDBY_WORKERS": "off"})
    assert (args.max_budget, args.min_budget, args.standby_workers) == (2048, 128, False)
    args = serve_settings(file, {"VITSERVE_MAX_BUDGET": "2048"}, ["--max-budget", "1024", "--no-standby-workers"])
    assert (args.max_budget, args.min_budget, args.standby_workers) == (1024, 128, False)
    assert serve_settings().max_budget == 8192  # nothing given: the default


@pytest.mark.parametrize("text, environ, message", [
    ("[serve]\nmax-budgte = 4096\n", {}, "'max-budgte', which is no setting of `vitserve serve`"),
    ("[serve]\nmax-budget = \"big\"\n", {}, "max-budget must be a valid int, got 'big'"),
    ("[serve]\nstandby-workers = 1\n", {}, "standby-workers must be true or false"),
    ("[serve]\npolicy = \"fastest\"\n", {}, "policy must be one of deadline, immediate, max_delay"),
    ("[serve\n", {}, "is not valid TOML"),
    ("serve = 3\n", {}, "serve must be a table"),
    ("", {"VITSERVE_MAX_BUDGET": "lots"}, "the environment's VITSERVE_MAX_BUDGET: --max-budget must be a valid int"),
    ("", {"VITSERVE_STANDBY_WORKERS": "maybe"}, "VITSERVE_STANDBY_WORKERS: --standby-workers must be one of"),
])
def test_a_wrong_setting_is_named(tmp_path, text, environ, message):
    file = tmp_path / "vitserve.toml"
    file.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("`", ".")):
        serve_settings(file, environ)


def test_serve_refuses_a_wrong_setting_at_once_with_its_name(tmp_path):
    file = tmp_path / "vitserve.toml"
    file.write_text("[serve]\nmax-budget = -5\n")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--config", str(file), "--endpoint",
                           f"ipc://{tmp_path}/s.sock"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - began < 20 and "Traceback" not in done.stderr
    assert "max_budget" in done.stderr or "max-budget" in done.stderr, done.stderr
    missing = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.toml: cannot read it" in missing.stderr


def numeric_serve_settings() -> list[tuple[str, str]]:
    from vitserve.cli_config import settings

    command = build_parser()._subparsers._group_actions[0].choices["serve"]
    cases = []
    for key, action in settings(command).items():
        if action.type in (int, float):
            cases += [(key, "-1")] + ([(key, "nan"), (key, "inf")] if action.type is float else [])
    return cases


@pytest.mark.parametrize("key, value", numeric_serve_settings())
def test_every_numeric_serve_setting_refuses_a_wrong_value_by_its_name(key, value, capsys):
    """serve's settings are all checked before anything starts (serve_settings: no model is loaded, no
    worker spawned), and the error names the setting, by its flag or its configuration field."""
    from vitserve.cli_serve import serve_settings

    try:
        args = build_parser().parse_args(["serve", "--endpoint", "ipc:///tmp/unused.sock", f"--{key}", value])
    except SystemExit:  # argparse refused it, naming the flag
        assert f"--{key}" in capsys.readouterr().err
        return
    with pytest.raises(ValueError) as refused:
        serve_settings(args)
    message = str(refused.value)
    assert f"--{key}" in message or key.replace("-", "_") in message, message
