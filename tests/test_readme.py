"""The README cannot rot: its Python snippets run as written, its walk-through runs with the
output it shows, and its command-line reference lists exactly the options the commands take.

Conventions in README.md (keep them when editing it):

- Every fenced ```python block is a script that runs on its own, in a fresh namespace, with
  the current directory a temporary copy of the repository's ``examples/`` parent (so
  ``examples/tiny-llama`` resolves; a snippet writes only into a temporary directory it makes).
  All blocks run in one interpreter, one after the other, to pay for ``import torch`` once
  (and beside the walk-through's commands); a failure is reported at the README line it
  happened on.
- Every fenced ```console block belongs to the walk-through. A line starting with ``$ `` is a
  command (a trailing backslash continues it on the next line); the lines up to the next
  command are an excerpt of what it prints (stdout and stderr together, as on a 120-column
  terminal). Each excerpt line must appear in the real output, in the order shown, compared
  with runs of spaces collapsed; a line ``...`` stands for lines left out, and ``…`` inside a
  line for part of a line left out (a size, a temporary path). Every command must exit 0: one
  whose failing status is the point shows it with ``; echo "exit status $?"``. The commands
  run in order in one temporary directory holding a copy of ``examples/``, with the
  interpreter's ``bin`` first on PATH and ``HF_HUB_OFFLINE=1`` (nothing may need the network).
- Under ``## Command-line reference``, a ``### `fusesurgery CMD ARGS...` `` heading per
  command, followed by a table whose first column names its options; ``### Global options``
  for the options before the command. The options named there must be exactly the ones the
  command accepts, and the arguments in the heading exactly its arguments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    """A fenced block: its info string, the README line of its first content line, its lines."""

    lang: str
    line: int
    lines: list[str]


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    current: Block | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if current is None and match:
            current = Block(match.group(1), number + 1, [])
        elif current is not None and line.strip() == "```":
            blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    assert current is None, f"README.md:{current.line}: fenced block never closed"
    return blocks


@dataclass
class Command:
    """A walk-through command: its README line, the shell text, the output lines shown."""

    line: int
    text: str
    shown: list[str] = field(default_factory=list)


def console_commands(blocks: list[Block]) -> list[Command]:
    commands: list[Command] = []
    for block in blocks:
        if block.lang != "console":
            continue
        continuing = False
        for offset, line in enumerate(block.lines):
            if continuing:
                commands[-1].text += "\n" + line
            elif line.startswith("$ "):
                commands.append(Command(block.line + offset, line[2:]))
            elif line.strip():
                assert commands and commands[-1].line >= block.line, (
                    f"README.md:{block.line + offset}: output before any command in a console "
                    "block")
                commands[-1].shown.append(line)
            continuing = line.endswith("\\") and (line.startswith("$ ") or continuing)
    return commands


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _pattern(shown: str) -> re.Pattern[str]:
    parts = [re.escape(part) for part in _normalise(shown).split("…")]
    return re.compile(".*".join(parts))


def missing_excerpt_line(shown: list[str], output: str) -> str | None:
    """The first shown line (``...`` lines skipped) not found, in order, in ``output``."""
    lines = [_normalise(line) for line in output.splitlines()]
    position = 0
    for expected in shown:
        if expected.strip() == "...":
            continue
        pattern = _pattern(expected)
        while position < len(lines) and not pattern.search(lines[position]):
            position += 1
        if position == len(lines):
            return expected
        position += 1
    return None


BLOCKS = fenced_blocks(README.read_text())
PYTHON_BLOCKS = [block for block in BLOCKS if block.lang == "python"]
COMMANDS = console_commands(BLOCKS)


def _example_copy(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return work


# Runs each block in a fresh namespace; its exception becomes the block's result.
RUNNER = r"""
import json, os, sys, traceback
blocks = json.load(open(sys.argv[1]))
results = {}
home = os.getcwd()
for line, source in blocks:
    os.chdir(home)
    code = compile("\n" * (line - 1) + source, "README.md", "exec")
    try:
        exec(code, {"__name__": "__main__"})
        results[str(line)] = None
    except BaseException:
        results[str(line)] = traceback.format_exc()
json.dump(results, open(sys.argv[2], "w"))
"""


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """The environment of every README run: no debug switches or Hub settings of the caller's,
    the Hub offline (nothing the README shows may need the network), unbuffered output (so
    stdout and stderr interleave as on a terminal)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FUSESURGERY_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONUNBUFFERED="1",
               COLUMNS="120", NO_COLOR="1")
    return env


@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
    """The interpreter running every ```python block, started once; it runs beside the
    walk-through (which requests it first), and the snippet tests wait for its results."""
    tmp_path = tmp_path_factory.mktemp("readme_python")
    work = _example_copy(tmp_path)
    blocks_file, results_file = tmp_path / "blocks.json", tmp_path / "results.json"
    blocks_file.write_text(json.dumps([(b.line, "\n".join(b.lines) + "\n")
                                       for b in PYTHON_BLOCKS]))
    with open(tmp_path / "output.txt", "w+") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(blocks_file), str(results_file)], cwd=work,
            env=_clean_env(tmp_path), stdout=output, stderr=subprocess.STDOUT)

        def results() -> dict[str, str | None]:
            returncode = process.wait(timeout=300)
            output.seek(0)
            assert returncode == 0 and results_file.exists(), output.read()[-3000:]
            return json.loads(results_file.read_text())

        yield results
        if process.poll() is None:
            process.kill()
            process.wait()


def _shell_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "fusesurgery").exists():  # an interpreter outside the venv
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "fusesurgery"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fusesurgery "$@"\n')
        wrapper.chmod(0o755)
    env = _clean_env(tmp_path)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_walkthrough_runs_as_shown(tmp_path: Path, python_run) -> None:
    steps = {re.match(r"fusesurgery (\w+)", c.text).group(1) for c in COMMANDS
             if c.text.startswith("fusesurgery ")}
    assert {"inspect", "fuse", "validate", "diff", "unfuse", "push"} <= steps, steps
    work = _example_copy(tmp_path)
    env = _shell_env(tmp_path)
    for command in COMMANDS:
        run = subprocess.run(["bash", "-o", "pipefail", "-c", command.text], cwd=work, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=120)
        where = f"README.md:{command.line}: `{command.text}`"
        assert run.returncode == 0, f"{where} exits {run.returncode}:\n{run.stdout[-3000:]}"
        missing = missing_excerpt_line(command.shown, run.stdout)
        assert missing is None, (f"{where} no longer prints (in this order) the line\n  "
                                 f"{missing}\nits output:\n{run.stdout[-3000:]}")


@pytest.fixture(scope="module")
def python_results(python_run) -> dict[str, str | None]:
    return python_run()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"README.md:{b.line}"
                                                      for b in PYTHON_BLOCKS])
def test_python_snippet_runs(block: Block, python_results) -> None:
    error = python_results[str(block.line)]
    assert error is None, f"the ```python block at README.md:{block.line} fails:\n{error}"


def test_python_snippets_cover_the_api() -> None:
    code = "\n".join("\n".join(block.lines) for block in PYTHON_BLOCKS)
    for name in ("load_decoder", "load_encoder", "fuse", "load_fused", "save_fused", "validate",
                 "unfuse", "FusionLayer", "FusionEmbedding", "DeepFusionModel", "prepare_inputs",
                 "generate"):
        assert re.search(rf"\b{name}\(", code), f"no README snippet calls {name}"


# --------------------------------------------------------------------------------------------
# The command-line reference.

OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def reference_sections() -> dict[str, tuple[str, set[str]]]:
    """Heading ('fusesurgery fuse ENCODER DECODER' or 'Global options') -> (heading, options
    named in the first column of its table)."""
    text = README.read_text()
    start = text.index("\n## Command-line reference")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    sections: dict[str, tuple[str, set[str]]] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip().strip("`")
            if heading == "Global options" or heading.startswith("fusesurgery "):
                current = "" if heading == "Global options" else heading.split()[1]
                sections[current] = (heading, set())
            else:  # another subsection (exit codes): not a command's options
                current = None
        elif current is not None and line.startswith("|") and not line.startswith("|-"):
            first_cell = line.split("|")[1]
            sections[current][1].update(OPTION.findall(first_cell))
    return sections


def _command_tree():
    """The root command and its subcommands, as click objects (typer vendors its own click)."""
    import typer.main  # noqa: PLC0415

    from fusesurgery.cli.app import app  # noqa: PLC0415

    group = typer.main.get_command(app)
    ctx = group.context_class(group)
    return group, {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def _options(command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts, param.secondary_opts)
    return names - {"--help", "-h"}


def test_cli_reference_lists_every_command_and_option() -> None:
    group, commands = _command_tree()
    sections = reference_sections()
    assert set(sections) == {"", *commands}, (
        f"README reference sections {sorted(sections)} vs commands {sorted(commands)}")
    assert sections[""][1] == _options(group), (
        f"Global options table: {sorted(sections[''][1])}, the command takes "
        f"{sorted(_options(group))}")
    for name, command in commands.items():
        heading, documented = sections[name]
        actual = _options(command)
        assert documented == actual, (
            f"README reference of `{name}`: documents {sorted(documented - actual)} that it "
            f"does not take, misses {sorted(actual - documented)}")
        arguments = [param.metavar or param.name.upper() for param in command.params
                     if param.param_type_name == "argument"]
        assert heading.split()[2:2 + len(arguments)] == arguments, (
            f"README reference heading `{heading}`: the arguments are {arguments}")


def test_exit_codes_documented() -> None:
    from fusesurgery.cli import errors  # noqa: PLC0415

    text = README.read_text()
    table = text[text.index("\n### Exit codes"):]
    rows = {int(m.group(1)) for m in re.finditer(r"^\| `?(\d+)`? ", table, re.MULTILINE)}
    codes = {errors.EXIT_OK, errors.EXIT_DIFFERENT, errors.EXIT_ERROR, errors.EXIT_BUG,
             errors.EXIT_INTERRUPTED, 143}
    assert codes <= rows, f"exit codes {sorted(codes - rows)} are not in the README's table"


# --------------------------------------------------------------------------------------------
# The conventions above, on inputs whose answer is known.


def test_excerpt_matching() -> None:
    output = "a  b\n  PASS   keys match: 109 tensors\nfused at /tmp/x/out\nlast"
    assert missing_excerpt_line(["PASS keys match: 109 tensors", "...", "last"], output) is None
    assert missing_excerpt_line(["fused at …/out"], output) is None
    assert missing_excerpt_line(["last", "a b"], output) == "a b"  # order matters
    assert missing_excerpt_line(["PASS keys match: 110 tensors"], output) is not None


def test_console_parsing() -> None:
    blocks = fenced_blocks("x\n```console\n$ one \\\n  --flag\nout 1\n$ two\n```\n```python\n"
                           "print(1)\n```\n")
    commands = console_commands(blocks)
    assert [(c.line, c.text, c.shown) for c in commands] == [
        (3, "one \\\n  --flag", ["out 1"]), (6, "two", [])]
    assert [(b.lang, b.line) for b in blocks] == [("console", 3), ("python", 9)]


def test_quick_start_commands_are_what_ci_and_the_main_job_run() -> None:
    text = README.read_text()
    start = text.index("\n## Quick start")
    section = text[start:text.index("\n## ", start + 1)]
    main_job, suite = [block.lines for block in fenced_blocks(section) if block.lang == "sh"]
    assert len(main_job) == len(suite) == 1
    setup = suite[0].rsplit(" && ", 1)[0]
    assert main_job[0] == f"{setup} && bash examples/main_job.sh"
    assert (ROOT / "examples" / "main_job.sh").is_file()
    ci_lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci_lines[-1] == suite[0], "the README's test command is not what CI runs"
