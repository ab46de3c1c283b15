"""Fixtures of the hardening tests: real tiny checkpoints to damage, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusesurgery.cli.app import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A copy of the bundled tiny Llama (config.json, generation_config.json, weights)."""
    return Path(shutil.copytree(EXAMPLES / "tiny-llama", tmp_path / "llama"))


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLES / "tiny-clip-vision", tmp_path / "clip"))


def edit_config(directory: Path, **changes) -> None:
    """Set (or, with a value of ``...``, delete) top-level config.json fields."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))  # json writes NaN/Infinity for float('nan'), as wanted


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under ``root``: path -> sha256 of its bytes (or its link target)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_file():
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


_runner = CliRunner()


def cli(*args: object):
    return _runner.invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result, *fragments: str, code: int = 2) -> str:
    """The command failed with ``code``, printing one ``error:`` line holding ``fragments``."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
