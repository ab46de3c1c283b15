"""What a new user's trial of the command line found: usage errors as one line (JSON under
--json), internal errors as JSON too, unknown devices and fp8 casts refused up front, piped
inspect output that grep can read, plurals, ``-V``, ``dir(fusesurgery)`` and help metavars."""

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
from tests.hardening.conftest import assert_one_line_error, cli, snapshot

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONSOLE_SCRIPT = Path(sys.executable).with_name("fusesurgery")
COMMAND_NAMES = [row[0] for row in COMMANDS]


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> Path:
    """The bundled tiny CLIP fused into the bundled tiny Llama (one new token)."""
    out = tmp_path_factory.mktemp("trial") / "fused"
    result = cli("fuse", EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", "-o", out,
                 "--every", "2")
    assert result.exit_code == 0, result.output
    return out


def run_script(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``fusesurgery ARGS`` as a real process whose stdout and stderr are pipes."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("COLUMNS", "LINES", "FUSESURGERY_DEBUG")}
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env={**environment, **(env or {})}, timeout=120)


# 1. Usage errors: one line on stderr, exit 2, JSON on stdout under --json.

@pytest.mark.parametrize(("args", "expected"), [
    (["fuse", "a", "b", "-o", "x", "--every", "abc"],
     "error: Invalid value for '--every': 'abc' is not a valid integer "
     "(see 'fusesurgery fuse --help')"),
    (["inspect", "x", "--bogus"], "error: No such option: --bogus "
     "(see 'fusesurgery inspect --help')"),
    (["fuse", "a"], "error: Missing argument 'DECODER' (see 'fusesurgery fuse --help')"),
    (["fuze"], "error: No such command 'fuze'. Did you mean 'fuse', 'unfuse'? "
     "(see 'fusesurgery --help')"),
    (["--bogus"], "error: No such option: --bogus (see 'fusesurgery --help')"),
    (["convert", "x", "-o", "y", "--to", "gguf"],
     "error: Invalid value for '--to': unknown layout 'gguf'; valid: native, hf, meta, "
     "mllama, transformers (see 'fusesurgery convert --help')"),
])
def test_usage_error_is_one_line(args, expected):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr == expected + "\n"
    assert result.stdout == ""


def test_usage_error_under_json_is_json_on_stdout():
    result = cli("fuse", "a", "b", "-o", "x", "--every", "abc", "--json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document == {"error": "Invalid value for '--every': 'abc' is not a valid integer",
                        "kind": "usage error", "code": 2}
    assert len(result.stderr.splitlines()) == 1


def test_usage_error_from_the_console_script():
    done = run_script("validate", "x", "--seed", "many")
    assert done.returncode == 2
    assert done.stderr == ("error: Invalid value for '--seed': 'many' is not a valid integer "
                           "(see 'fusesurgery validate --help')\n")
    assert done.stdout == ""


def test_no_arguments_still_show_help():
    done = run_script()
    assert done.returncode == 2
    assert "Usage: fusesurgery" in done.stdout and done.stderr == ""


# 2. An internal error under --json is JSON on stdout too.

def test_internal_error_under_json(monkeypatch, tmp_path):
    import fusesurgery.reports.inspection as inspection

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(inspection, "inspect_checkpoint", broken)
    result = cli("inspect", tmp_path, "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout) == {"error": "ZeroDivisionError: boom",
                                         "kind": "internal error", "code": 3}
    assert "a bug in fusesurgery" in result.stderr
    assert cli("inspect", tmp_path).stdout == ""  # without --json: stderr only


# 3. An unknown device is bad input, named with the valid forms.

@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:0:1"])
def test_validate_unknown_device(fused, device):
    line = assert_one_line_error(cli("validate", fused, "--device", device), repr(device))
    assert "cpu, cuda, cuda:N" in line


def test_validate_library_refuses_unknown_device(fused):
    from fusesurgery.errors import ConfigError
    from fusesurgery.validate import validate_fused

    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        validate_fused(fused, device="tpu")


def test_push_unknown_device(fused):
    result = cli("push", fused, "me/vlm", "--dry-run", "-q", "--device", "tpu")
    line = assert_one_line_error(result, "'tpu'")
    assert "cuda:N" in line


# 4. --dtype casts only to the dtypes that compute; fp8 checkpoints are still read.

@pytest.mark.parametrize("command", ["fuse", "convert", "validate"])
@pytest.mark.parametrize("name", ["f8_e4m3", "F8_E5M2", "int8"])
def test_dtype_refuses_what_does_not_compute(fused, tmp_path, command, name):
    args = {"fuse": ["fuse", EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", "-o",
                     tmp_path / "out"],
            "convert": ["convert", EXAMPLES / "tiny-llama", "-o", tmp_path / "out"],
            "validate": ["validate", fused]}[command]
    before = snapshot(tmp_path)
    line = assert_one_line_error(cli(*args, "--dtype", name), "--dtype", "bf16", "f32", "f16",
                                 "f64")
    assert "f8" not in line.split("valid:")[1]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["bf16", "BF16", "float16", "half", "f32", "double"])
def test_dtype_accepts_the_computing_names(name):
    from fusesurgery.cli.options import parse_dtype_option

    assert parse_dtype_option(name).is_floating_point


def test_dtype_choices_are_the_cast_dtypes():
    import torch

    from fusesurgery.cli.options import CAST_DTYPE_NAMES, parse_dtype_option
    from fusesurgery.errors import ConfigError

    assert {parse_dtype_option(name) for name in CAST_DTYPE_NAMES} == {
        torch.float32, torch.bfloat16, torch.float16, torch.float64}
    with pytest.raises(ConfigError, match="--dtype: unknown dtype 'f8_e4m3'; valid: "):
        parse_dtype_option("f8_e4m3")


def test_fp8_checkpoints_are_still_read(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(EXAMPLES / "tiny-llama" / "model.safetensors")
    (tmp_path / "config.json").write_bytes((EXAMPLES / "tiny-llama" / "config.json").read_bytes())
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()},
              tmp_path / "model.safetensors")
    result = cli("inspect", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["dtypes"]) == {"f8_e4m3"}


# 5. Piped output: wide enough that no key is split across lines.

def test_piped_inspect_keeps_keys_whole(tmp_path):
    from tests.tiny_models import TINY_DECODER, save_tiny_hf_decoder

    # fusion layers at every odd index of 16: key rows such as
    # decoder.layers.{1,3,5,7,9,11,13,15}.fusion_layer.attn.output_proj.weight, over 70 columns
    decoder = save_tiny_hf_decoder("llama", tmp_path / "deep",
                                   {**TINY_DECODER, "num_hidden_layers": 16})
    fused = tmp_path / "fused"
    result = cli("fuse", EXAMPLES / "tiny-clip-vision", decoder, "-o", fused, "--layers",
                 ",".join(map(str, range(1, 16, 2))))
    assert result.exit_code == 0, result.output
    rows = json.loads(run_script("inspect", fused, "--json").stdout)["key_tree"]
    names = [row["name"] for row in rows]
    assert max(map(len, names)) > 70
    done = run_script("inspect", fused)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in names:
        assert any(re.match(rf"{re.escape(name)}\s+\[", line) for line in lines), name
    assert "config from fusion_config.json" in done.stdout
    narrow = run_script("inspect", fused, env={"COLUMNS": "60"})
    assert max(map(len, narrow.stdout.splitlines())) <= 60  # COLUMNS still rules


# 6. Plurals.

@pytest.mark.parametrize(("count", "text"), [(0, "0 checks"), (1, "1 check"), (2, "2 checks"),
                                             (1234, "1,234 checks")])
def test_plural(count, text):
    from fusesurgery._plural import plural

    assert plural(count, "check", spec=",") == text


def test_plural_irregular():
    from fusesurgery._plural import plural

    assert plural(1, "entry", "entries") == "1 entry"
    assert plural(3, "entry", "entries") == "3 entries"


def test_inspect_counts_one_new_token(fused):
    result = cli("inspect", fused)
    assert result.exit_code == 0, result.output
    assert re.search(r"fusion vocab\s+1 new token\b", result.stdout), result.stdout
    assert "1 new tokens" not in result.stdout


# 7. -V as git and hf print it.

@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_names_the_program(flag):
    result = CliRunner().invoke(app, [flag])
    assert result.exit_code == 0
    assert result.stdout == f"fusesurgery {fusesurgery.__version__}\n"


# 8. dir(fusesurgery) is the public API.

def test_dir_is_the_public_api():
    names = dir(fusesurgery)
    for private in ("sys", "types", "Any", "annotations", "TYPE_CHECKING", "importlib"):
        assert private not in names
    public = [name for name in names if not (name.startswith("__") and name.endswith("__"))]
    assert sorted(public) == sorted(set(fusesurgery.__all__) - {"__version__"})
    assert "__version__" in names and "__doc__" in names
    for name in fusesurgery.__all__:
        assert getattr(fusesurgery, name) is not None


# 9. Help metavars and choices.

def _commands():
    import typer.main

    group = typer.main.get_command(app)
    ctx = group.context_class(group)
    return ctx, {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_help_shows_meaningful_metavars(command):
    result = CliRunner().invoke(app, [command, "--help"],
                                env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    assert not re.search(r"<(str|int|float|list\[str\]|path)>", result.stdout), result.stdout
    ctx, commands = _commands()
    for param in commands[command].get_params(ctx):
        if param.param_type_name == "option" and not param.is_flag:
            assert re.fullmatch(r"[A-Z][A-Z_]*", param.metavar or ""), (param.name,
                                                                        param.metavar)


@pytest.mark.parametrize(("command", "option", "metavar"), [
    ("fuse", "--output", "DIR"), ("fuse", "--every", "N"), ("fuse", "--dtype", "DTYPE"),
    ("fuse", "--max-shard-size", "SIZE"), ("fuse", "--layers", "LIST"),
    ("fuse", "--new-token", "TOKEN"), ("validate", "--device", "DEVICE"),
    ("validate", "--against", "CHECKPOINT"), ("push", "--base-model", "REPO_ID"),
    ("push", "--token", "TOKEN"), ("push", "--revision", "BRANCH"),
    ("inspect", "--rope-base", "NUMBER"), ("convert", "--to", "LAYOUT"),
])
def test_named_metavars(command, option, metavar):
    result = CliRunner().invoke(app, [command, "--help"],
                                env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert re.search(rf"{re.escape(option)}\s+(-\w\s+)?{metavar}\s", result.stdout), \
        result.stdout


def test_choices_agree_with_the_library():
    from fusesurgery.convert.keymaps import LAYOUTS
    from fusesurgery.surgery.fused_config import EMBEDDING_INITS, PROJECTIONS
    from fusesurgery.write.convert_checkpoint import CONFIG_WRITERS
    from fusesurgery.write.unfuse_checkpoint import PARTS

    ctx, commands = _commands()

    def choices(command: str, name: str) -> set[str]:
        param = next(p for p in commands[command].get_params(ctx) if p.name == name)
        return set(param.type_descriptor.choices)

    assert choices("fuse", "projection") == set(PROJECTIONS)
    assert choices("fuse", "embedding_init") == set(EMBEDDING_INITS)
    from fusesurgery.hf import EXPORT_TARGET

    assert choices("convert", "to") == {*LAYOUTS, EXPORT_TARGET}
    assert choices("unfuse", "part") == set(PARTS)
    assert choices("unfuse", "format") == set(CONFIG_WRITERS)
    from fusesurgery.cli.options import CAST_DTYPE_NAMES

    for command in ("fuse", "convert", "validate"):
        assert choices(command, "dtype") == set(CAST_DTYPE_NAMES)


@pytest.mark.parametrize(("words", "expected"), [
    ("fusesurgery fuse --projection ", ["linear", "mlp"]),
    ("fusesurgery fuse --embedding-init ", ["mean", "normal", "zeros"]),
    ("fusesurgery fuse --dtype bf", ["bf16", "bfloat16"]),
    ("fusesurgery convert --to ", ["hf", "meta", "mllama", "native", "transformers"]),
    ("fusesurgery unfuse --part ", ["decoder", "encoder"]),
    ("fusesurgery unfuse --format ", ["hf", "meta", "native"]),
])
def test_completion_offers_choices(words, expected):
    done = run_script(env={"_FUSESURGERY_COMPLETE": "complete_bash", "COMP_WORDS": words,
                           "COMP_CWORD": str(len(words.split(" ")) - 1)})
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == expected


def test_choice_values_reach_the_command(tmp_path):
    out = tmp_path / "out"
    result = cli("convert", EXAMPLES / "tiny-llama", "-o", out, "--to", "hf", "--dtype", "F16",
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["to"] == "hf"
    from fusesurgery.io import open_checkpoint

    with open_checkpoint(out) as source:
        assert {info.dtype_name for info in source.infos().values()} == {"f16"}
