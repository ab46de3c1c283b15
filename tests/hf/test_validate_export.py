"""``validate`` on the transformers export: an export is checked through its fused
checkpoint plus a row that loads it with transformers and compares its logits with
``load_fused``'s; ``--transformers`` adds that row for a native checkpoint. The row fails when
the transformers classes compute something else."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app

pytest.importorskip("transformers")
ROW = "transformers export's logits with an image equal load_fused's"
CODE_ROW = "transformers export's code files are this fusesurgery's"


def _rows(report) -> dict[str, object]:
    return {check.name: check for check in report.checks}


def test_validate_of_an_export_adds_the_transformers_row(gated_export):
    report = fusesurgery.validate(gated_export)
    rows = _rows(report)
    assert report.ok and report.path == str(gated_export)
    assert rows[ROW].status == "pass" and rows[CODE_ROW].status == "pass"
    assert rows["fusion is no longer an identity"].status == "info"  # gates open: trained
    assert "state_dict gives back the checkpoint's tensors" in rows


def test_the_row_fails_when_transformers_computes_something_else(gated_example, monkeypatch):
    from fusesurgery.hf.template import modeling_fusesurgery_fused as modeling

    monkeypatch.setattr(modeling.FusionTanhGate, "forward",
                        lambda self, x: x * torch.sigmoid(self.scale))  # not tanh
    report = fusesurgery.validate(gated_example, transformers=True)
    assert not report.ok and _rows(report)[ROW].status == "fail"
    assert _rows(report)[ROW].figure.startswith("max |diff|")


def test_edited_code_files_are_reported(gated_export, tmp_path):
    import shutil

    copy = tmp_path / "hf"
    shutil.copytree(gated_export, copy)
    modeling = copy / "modeling_fusesurgery_fused.py"
    modeling.write_text(modeling.read_text() + "\n# edited\n")
    rows = _rows(fusesurgery.validate(copy))
    assert rows[CODE_ROW].status == "info" and "modeling_fusesurgery_fused.py" in rows[
        CODE_ROW].detail
    assert rows[ROW].status == "pass"


def test_cli_validate_transformers_flag(fused_example):
    result = CliRunner().invoke(app, ["validate", str(fused_example), "--transformers",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {row["name"]: row for row in report["checks"]}
    assert rows[ROW]["status"] == "pass" and rows[CODE_ROW]["status"] == "pass"
    assert report["identity"]  # zero gates: the identity verdict stands beside the row
