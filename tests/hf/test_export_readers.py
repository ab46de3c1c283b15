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
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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


# --- unfuse: one rule for kept source files, whatever the layout -----------------------------


@pytest.fixture(params=["native", "export"])
def fused_copy(request, fused_example, zero_export, tmp_path) -> Path:
    """A copy to damage of the fused example, or of its transformers export."""
    import shutil

    source = fused_example if request.param == "native" else zero_export
    return Path(shutil.copytree(source, tmp_path / request.param))


def test_unfuse_refuses_a_lost_kept_tokenizer_unless_allowed(fused_copy, tmp_path):
    from tests.hardening.conftest import assert_one_line_error, cli

    (fused_copy / "source" / "decoder" / "tokenizer.json").unlink()
    out = tmp_path / "back"
    assert_one_line_error(cli("unfuse", fused_copy, "-o", out),
                          "source/decoder/ lacks tokenizer.json", "--allow-missing")
    assert not out.exists()
    result = cli("unfuse", fused_copy, "-o", out, "--allow-missing")
    assert result.exit_code == 0, result.output
    assert "written without tokenizer.json: missing from source/decoder/" in result.stderr
    assert not (out / "tokenizer.json").exists()
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (EXAMPLES / "tiny-llama" / name).read_bytes()


def test_unfuse_takes_what_the_fused_directory_holds_unchanged(fused_copy, tmp_path):
    """source/ gone: the tower's preprocessor config is the fused directory's copy, its config
    derived, each with a note; nothing else is needed for the tower."""
    import shutil

    from tests.hardening.conftest import cli

    shutil.rmtree(fused_copy / "source")
    out = tmp_path / "back"
    result = cli("unfuse", fused_copy, "-o", out, "--part", "encoder")
    assert result.exit_code == 0, result.output
    assert ("source/encoder/preprocessor_config.json is missing: preprocessor_config.json is "
            "the fused directory's copy") in result.stderr
    assert "source/encoder/config.json is missing: config.json written from" in result.stderr
    name = "preprocessor_config.json"
    assert (out / name).read_bytes() == (EXAMPLES / "tiny-clip-vision" / name).read_bytes()
    assert not (out / "processor_config.json").exists()


def test_read_fused_config_reads_an_export(gated_example, gated_export):
    config = fusesurgery.read_fused_config(gated_export)
    assert config == fusesurgery.read_fused_config(gated_example) and config.trained
