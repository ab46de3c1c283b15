"""Every reader of a transformers export reads it in memory, through the one opener
``load_fused`` uses (``fusesurgery.surgery.exported``): ``generate`` and ``load_processor``
take an export as they take its fused checkpoint, and ``validate`` checks it without writing
a native copy anywhere.

Sources are the bundled examples (written by transformers' own classes) fused, their gates
opened, and exported (``tests/hf/conftest.py``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    pixels = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    PIL.fromarray(pixels.numpy()).save(path)
    return path


def _generate(path: Path, picture: Path) -> dict:
    result = runner.invoke(app, ["generate", str(path), "--image", str(picture), "--prompt",
                                 "word7 <|image|> word8", "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generate_takes_an_export_as_its_fused_checkpoint(gated_example, gated_export,
                                                          picture):
    ours = _generate(gated_export, picture)
    assert ours == _generate(gated_example, picture)
    assert ours["prompt_ids"][1] == 512 and len(ours["new_ids"]) == 5


def test_load_processor_reads_an_export(gated_example, gated_export, picture):
    exported = fusesurgery.load_processor(gated_export)
    native = fusesurgery.load_processor(gated_example)
    assert exported.config == fusesurgery.load_fused(gated_export).fused_config
    assert (exported.image_token_id, exported.eos_ids, exported.pad_id) == (
        native.image_token_id, native.eos_ids, native.pad_id)
    a = exported("word3 <|image|>", [PIL.open(picture)])
    b = native("word3 <|image|>", [PIL.open(picture)])
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.encoder_input["images"], b.encoder_input["images"])


def test_validate_reads_an_export_without_a_native_copy(gated_export, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen: list[list[str]] = []
    real = tempfile.TemporaryDirectory

    def watched(*args, **kwargs):  # what is written there, seen before it is cleaned up
        directory = real(*args, **kwargs)
        seen.append([directory.name])
        return directory

    monkeypatch.setattr(tempfile, "TemporaryDirectory", watched)
    report = fusesurgery.validate(gated_export, transformers=False)
    assert report.ok, report.summary()
    assert report.path == str(gated_export)
    names = [check.name for check in report.checks]
    assert "keys, shapes and dtypes match the rebuilt model" in names
    assert "state_dict gives back the checkpoint's tensors" in names
    assert seen == [] and list(scratch.iterdir()) == []
