"""``fusesurgery validate`` verdict lines: never claim identity with the original when a check
failed (a decoder given with --against that is not the one fused)."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_failed_against_check_claims_no_identity(tmp_path):
    fused = tmp_path / "fused"
    fusesurgery.fuse(ROOT / "examples" / "tiny-clip-vision", ROOT / "examples" / "tiny-llama",
                     fused, every=2)
    other = tmp_path / "other-llama"
    shutil.copytree(ROOT / "examples" / "tiny-llama", other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})

    same = runner.invoke(app, ["validate", str(fused), "--against",
                               str(ROOT / "examples" / "tiny-llama")])
    assert same.exit_code == 0 and "bit for bit" in same.stdout, same.output
    result = runner.invoke(app, ["validate", str(fused), "--against", str(other)])
    assert result.exit_code == 1, result.output
    assert "some checks FAILED" in result.stdout
    assert "bit for bit" not in result.stdout.splitlines()[-1]


def test_verdict_line_says_what_was_compared(tmp_path, fused_example):
    """After `fuse --dtype f32` the tensors are the source's values, not its bits; without
    --against nothing was compared with the original: the last line says so, and exit is 0."""
    cast = tmp_path / "fused-f32"
    result = runner.invoke(app, ["fuse", str(ROOT / "examples" / "tiny-clip-vision"),
                                 str(ROOT / "examples" / "tiny-llama"), "-o", str(cast),
                                 "--every", "2", "--dtype", "f32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["validate", str(cast), "--against",
                                 str(ROOT / "examples" / "tiny-llama")])
    assert result.exit_code == 0, result.output
    verdict = result.stdout.splitlines()[-1]
    assert "original decoder, bit for bit" not in verdict
    assert "bitwise after a cast bfloat16 -> float32, not the source's bits" in verdict

    result = runner.invoke(app, ["validate", str(fused_example)])
    assert result.exit_code == 0, result.output
    verdict = result.stdout.splitlines()[-1]
    assert "original decoder, bit for bit" not in verdict
    assert verdict.endswith("not compared with the original (no --against)")
    assert "not compared" in result.stdout


def test_swapped_arguments_are_named(tmp_path, fused_example):
    """`validate DECODER --against FUSED` says the two look swapped and how to call it, instead
    of only "not a fused checkpoint"."""
    decoder = ROOT / "examples" / "tiny-llama"
    result = runner.invoke(app, ["validate", str(decoder), "--against", str(fused_example)])
    assert result.exit_code == 2, result.output
    assert "look swapped" in result.output
    assert f"fusesurgery validate {fused_example} --against {decoder}" in " ".join(
        result.output.split())


def test_rows_do_not_wrap_when_piped(fused_example):
    """Piped (not a terminal), each check is one line: grep finds a row whole."""
    result = runner.invoke(app, ["validate", str(fused_example)], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "not compared" in line]
    assert any("give --against DECODER to compare them with the original" in row
               for row in rows), result.stdout
