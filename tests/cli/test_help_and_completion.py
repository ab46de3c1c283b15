"""Help that reads like git's and hf's, -V, --quiet/-q, and typer's shell completion
(issue 8, 4.4 and 5)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import COMMANDS, app
from fusesurgery.cli.errors import stderr as messages_console

runner = CliRunner()
CONSOLE_SCRIPT = Path(sys.executable).with_name("fusesurgery")
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
COMMAND_NAMES = [row[0] for row in COMMANDS]


def help_text(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.stdout


def usage_line(text: str) -> str:
    return next(line for line in text.splitlines() if "Usage:" in line).strip()


@pytest.mark.parametrize("command", ["", *COMMAND_NAMES])
def test_help_shows_no_bool_placeholders_or_braces(command):
    text = help_text(*([command] if command else []))
    assert "<bool>" not in text
    assert "{" not in usage_line(text)
    assert re.search(r"--help\s+-h\s+Show this message", text), text  # no <bool> between


@pytest.mark.parametrize(("command", "usage"), [
    ("fuse", "Usage: fusesurgery fuse [OPTIONS] ENCODER DECODER"),
    ("validate", "Usage: fusesurgery validate [OPTIONS] FUSED"),
    ("unfuse", "Usage: fusesurgery unfuse [OPTIONS] FUSED"),
    ("inspect", "Usage: fusesurgery inspect [OPTIONS] PATH"),
    ("diff", "Usage: fusesurgery diff [OPTIONS] A B"),
    ("convert", "Usage: fusesurgery convert [OPTIONS] SOURCE"),
    ("generate", "Usage: fusesurgery generate [OPTIONS] FUSED"),
])
def test_positionals_are_shown_by_name(command, usage):
    text = help_text(command)
    assert usage_line(text) == usage
    for name in usage.split("[OPTIONS]")[1].split():
        assert re.search(rf"\*\s+{name}\s", text), f"{name} not in the arguments panel"


def test_flags_show_no_value_but_valued_options_do():
    text = help_text("inspect")
    assert re.search(r"--json\s+Print a JSON document", text), text
    assert re.search(r"--num-heads\s+N\s+Decoder attention heads", text), text


def test_root_lists_each_command_with_one_short_line():
    text = help_text()
    for name in COMMAND_NAMES:
        assert re.search(rf"│ {name}\s+\S", text), name
    assert "Check a fused checkpoint" in text
    assert "--against that" not in text  # the full docstring is for `validate --help`


def test_short_and_long_version():
    short, long = runner.invoke(app, ["-V"]), runner.invoke(app, ["--version"])
    assert short.exit_code == long.exit_code == 0
    assert short.stdout == long.stdout == f"fusesurgery {fusesurgery.__version__}\n"


def test_bad_value_is_a_usage_error():
    result = runner.invoke(app, ["inspect", "x", "--num-heads", "seven"])
    assert result.exit_code == 2
    assert "'seven' is not a valid int" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_every_command_takes_quiet(command):
    text = help_text(command)
    assert re.search(r"--quiet\s+-q\s+No progress bars", text), text


# --quiet: the demo's informational line goes, its stdout data stays, errors still show.

@pytest.mark.parametrize("args", [["-q", "demo", "--json"], ["demo", "--json", "-q"],
                                  ["demo", "--quiet", "--json"], ["--quiet", "demo", "--json"]])
def test_quiet_silences_messages_not_data(args):
    loud = runner.invoke(app, ["demo", "--json"])
    quiet = runner.invoke(app, args)
    assert loud.exit_code == quiet.exit_code == 0, quiet.output
    assert "building a tiny decoder" in loud.stderr
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout) == json.loads(loud.stdout)
    # the next command line starts loud again (one console serves every in-process run)
    again = runner.invoke(app, ["demo", "--json"])
    assert "building a tiny decoder" in again.stderr
    assert not messages_console.quiet


@pytest.mark.parametrize("args", [["-q", "inspect", "missing"], ["inspect", "missing", "-q"],
                                  ["diff", "missing", "other", "--quiet", "--json"]])
def test_quiet_never_hides_errors(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "missing" in result.stderr and "error" in result.stderr
    if "--json" in args:
        assert json.loads(result.stdout)["code"] == 2


def test_quiet_disables_the_progress_bar(monkeypatch):
    from fusesurgery.cli import errors, progress

    seen = {}
    real = progress.Progress

    def spy(*columns, **options):
        seen["disable"] = options["disable"]
        return real(*columns, **options)

    monkeypatch.setattr(progress, "Progress", spy)
    monkeypatch.setattr(type(errors.stderr), "is_terminal", property(lambda self: True))
    try:
        errors.set_quiet(True)
        with progress.byte_progress("x") as update:
            update(1, 2)
        assert seen["disable"] is True
        errors.set_quiet(False)
        with progress.byte_progress("x") as update:
            update(1, 2)
        assert seen["disable"] is False
    finally:
        errors.set_quiet(False)


# Shell completion, as typer provides it, through the lazily loaded commands.

def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(CONSOLE_SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o default -F"),
                                               ("zsh", "#compdef fusesurgery")])
def test_show_completion_prints_the_script(shell, marker):
    # the shell given explicitly: no detection from $SHELL or the parent process
    done = run_script("--show-completion", shell,
                      env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert done.returncode == 0, done.stderr
    assert marker in done.stdout
    assert "_FUSESURGERY_COMPLETE" in done.stdout


def test_root_help_offers_completion():
    text = help_text()
    assert "--install-completion" in text and "--show-completion" in text


@pytest.mark.parametrize(("words", "cword", "expected"), [
    ("fusesurgery ", "1", COMMAND_NAMES),
    ("fusesurgery in", "1", ["inspect"]),
    ("fusesurgery d", "1", ["diff", "demo"]),
    ("fusesurgery g", "1", ["generate"]),
    ("fusesurgery inspect --js", "2", ["--json"]),
    ("fusesurgery diff --val", "2", ["--values"]),
])
def test_completion_of_commands_and_options(words, cword, expected):
    done = run_script(env={"_FUSESURGERY_COMPLETE": "complete_bash", "COMP_WORDS": words,
                           "COMP_CWORD": cword})
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(expected)
