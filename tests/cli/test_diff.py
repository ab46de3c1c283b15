"""``fusesurgery diff``: exit codes like diff(1), human and JSON output, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fusesurgery.cli.app import app
from tests.reports.diff_checkpoints import (
    FUSION_LAYER,
    NUM_HEADS,
    read_safetensors,
    save_fused,
    save_hf_llama,
    save_native_pt,
)

runner = CliRunner()

REPORT_FIELDS = {
    "identical", "keys_identical", "mode", "a", "b", "num_common", "only_in_a", "only_in_b",
    "shape_changes", "dtype_changes", "dropped_a", "dropped_b", "unmapped_a", "unmapped_b",
    "values_compared", "num_values_compared", "num_values_equal", "num_values_different",
    "atol", "value_changes",
}
SIDE_FIELDS = {"path", "format", "kind", "layout", "num_tensors", "total_bytes", "key_prefix"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diff_cli")
    hf = save_hf_llama(root / "hf")
    tensors = read_safetensors(hf / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][2, 3] += 0.5
    changed = root / "changed"
    changed.mkdir()
    shutil.copy(hf / "config.json", changed / "config.json")
    save_file(tensors, changed / "model.safetensors")
    bare = root / "bare.safetensors"
    shutil.copy(hf / "model.safetensors", bare)
    return {
        "hf": hf,
        "changed": changed,
        "bare": bare,
        "native": save_native_pt(hf, root / "native.pt"),
        "fused": save_fused(hf, root / "fused.safetensors"),
    }


def _diff(*args: object):
    return runner.invoke(app, ["diff", *map(str, args)])


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_identical_exits_0(checkpoints):
    result = _diff(checkpoints["hf"], checkpoints["native"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "identical"
    assert "hf decoder" in result.stdout and "native decoder" in result.stdout


def test_fused_exits_1_with_collapsed_key_lists(checkpoints):
    result = _diff(checkpoints["hf"], checkpoints["fused"])
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "only in B (" in out and "only in A" not in out
    assert f"decoder.layers.{FUSION_LAYER}.fusion_layer.* (13 keys)" in out  # no q/k/v bias
    assert "encoder.vision.layers.{0,1}.* (16 keys each)" in out
    assert "encoder.vision.ln_post.{bias,weight}" in out
    assert out.strip().splitlines()[-1] == "different"
    assert "(A under decoder.)" in out

    short = _diff(checkpoints["hf"], checkpoints["fused"], "--max-lines", "3")
    assert short.exit_code == 1 and "more keys" in short.stdout


def test_raw_compares_stored_names(checkpoints):
    result = _diff(checkpoints["hf"], checkpoints["native"], "--raw", "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["mode"] == "raw" and payload["num_common"] == 0
    assert "model.embed_tokens.weight" in payload["only_in_a"]


def test_values_json_schema(checkpoints):
    result = _diff(checkpoints["hf"], checkpoints["changed"], "--values", "--json")
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == REPORT_FIELDS
    assert set(payload["a"]) == set(payload["b"]) == SIDE_FIELDS
    assert payload["identical"] is False and payload["keys_identical"] is True
    assert payload["values_compared"] is True and payload["num_values_different"] == 1
    (change,) = payload["value_changes"]
    assert set(change) == {"key", "max_abs_diff", "num_different", "numel"}
    assert change["key"] == "layers.0.mlp.w2.weight" and change["num_different"] == 1
    assert change["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert result.stderr == ""

    human = _diff(checkpoints["hf"], checkpoints["changed"], "--values")
    assert "values: 20 equal, 1 different of 21 compared" in human.stdout
    loose = _diff(checkpoints["hf"], checkpoints["changed"], "--values", "--atol", "1")
    assert loose.exit_code == 0


def test_values_across_layouts(checkpoints):
    assert _diff(checkpoints["native"], checkpoints["hf"], "--values").exit_code == 0
    result = _diff(checkpoints["hf"], checkpoints["fused"], "--values", "--json")
    payload = json.loads(result.stdout)
    assert result.exit_code == 1 and payload["value_changes"] == []
    assert payload["num_values_equal"] == payload["num_common"] == 21


def test_missing_path_is_one_line(checkpoints, tmp_path):
    _assert_one_line_error(_diff(checkpoints["hf"], tmp_path / "nope"), "nope",
                           "no such file")


def test_unrecognised_keys_are_one_line(checkpoints, tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file({"alpha": torch.zeros(2)}, odd)
    _assert_one_line_error(_diff(odd, checkpoints["hf"]), "odd.safetensors", "--raw")
    assert _diff(odd, odd, "--raw").exit_code == 0


def test_head_count_needed_for_values_names_the_flag(checkpoints):
    _assert_one_line_error(
        _diff(checkpoints["bare"], checkpoints["native"], "--values"), "--num-heads"
    )
    result = _diff(checkpoints["bare"], checkpoints["native"], "--values",
                   "--num-heads", str(NUM_HEADS))
    assert result.exit_code == 0, result.output


def test_bad_option_values_are_one_line(checkpoints):
    _assert_one_line_error(_diff(checkpoints["hf"], checkpoints["hf"], "--atol", "-1"),
                           "atol must be a number >= 0, got -1.0")
    _assert_one_line_error(_diff(checkpoints["hf"], checkpoints["hf"], "--max-lines", "0"),
                           "max_lines must be at least 1")
