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
    "atol", "value_changes", "values_skipped",
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
    assert {"key": "model.embed_tokens.weight", "normalised_key": "model.embed_tokens.weight"
            } in payload["only_in_a"]


def test_values_json_schema(checkpoints):
    result = _diff(checkpoints["hf"], checkpoints["changed"], "--values", "--json")
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == REPORT_FIELDS
    assert set(payload["a"]) == set(payload["b"]) == SIDE_FIELDS
    assert payload["identical"] is False and payload["keys_identical"] is True
    assert payload["values_compared"] is True and payload["num_values_different"] == 1
    (change,) = payload["value_changes"]
    assert set(change) == {"key_a", "key_b", "normalised_key", "max_abs_diff", "num_different",
                           "numel"}
    assert change["key_a"] == change["key_b"] == "model.layers.0.mlp.down_proj.weight"
    assert change["normalised_key"] == "layers.0.mlp.w2.weight"
    assert change["num_different"] == 1
    assert change["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)
    assert result.stderr == ""

    human = _diff(checkpoints["hf"], checkpoints["changed"], "--values")
    assert "values: 20 equal, 1 different of 21 compared" in human.stdout
    assert "  model.layers.0.mlp.down_proj.weight: max |a-b| 0.5 " in human.stdout
    assert "w2" not in human.stdout  # both files are HF: no native name anywhere
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
                           "--atol must be a number >= 0, got -1.0")
    _assert_one_line_error(_diff(checkpoints["hf"], checkpoints["hf"], "--max-lines", "0"),
                           "--max-lines must be at least 1")


# ------------------------------------------------------------------------------ names shown


def _save_changed_hf(hf: Path, directory: Path) -> Path:
    """The HF checkpoint with one shape, two dtypes and one key changed, still HF-named."""
    tensors = read_safetensors(hf / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(tensors["model.norm.weight"].shape[0] + 1)
    for layer in (0, 1):
        key = f"model.layers.{layer}.mlp.up_proj.weight"
        tensors[key] = tensors[key].to(torch.float16)
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    directory.mkdir()
    shutil.copy(hf / "config.json", directory / "config.json")
    save_file(tensors, directory / "model.safetensors")
    return directory


def test_hf_against_hf_names_keys_as_the_files_do(checkpoints, tmp_path):
    changed = _save_changed_hf(checkpoints["hf"], tmp_path / "changed")
    result = _diff(checkpoints["hf"], changed, "--no-values")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "  model.layers.1.mlp.gate_proj.weight" in lines  # only in A
    assert "  model.norm.weight: [32] -> [33]" in lines
    assert "  model.layers.{0,1}.mlp.up_proj.weight: f32 -> f16" in lines
    # no native (torchtune) spelling leaks into a diff of two HF checkpoints
    for native in ("w1", "w3", "norm.scale", "sa_norm", "(B:"):
        assert native not in result.stdout, native

    payload = json.loads(_diff(checkpoints["hf"], changed, "--no-values", "--json").stdout)
    assert payload["only_in_a"] == [{"key": "model.layers.1.mlp.gate_proj.weight",
                                     "normalised_key": "layers.1.mlp.w1.weight"}]
    assert payload["shape_changes"] == [{
        "key_a": "model.norm.weight", "key_b": "model.norm.weight",
        "normalised_key": "norm.scale", "shape_a": [32], "shape_b": [33]}]
    assert [(c["key_a"], c["key_b"], c["normalised_key"]) for c in payload["dtype_changes"]] == [
        (f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.mlp.up_proj.weight",
         f"layers.{i}.mlp.w3.weight") for i in (0, 1)]


def test_hf_against_native_shows_both_spellings(checkpoints, tmp_path):
    changed = _save_changed_hf(checkpoints["hf"], tmp_path / "changed")
    result = _diff(checkpoints["native"], changed, "--no-values")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "  layers.1.mlp.w1.weight" in lines  # only in A, as the native file spells it
    assert "  norm.scale (B: model.norm.weight): [32] -> [33]" in lines
    assert ("  layers.{0,1}.mlp.w3.weight (B: model.layers.{0,1}.mlp.up_proj.weight): "
            "f32 -> f16") in lines

    payload = json.loads(_diff(checkpoints["native"], changed, "--no-values", "--json").stdout)
    assert payload["only_in_a"] == [{"key": "layers.1.mlp.w1.weight",
                                     "normalised_key": "layers.1.mlp.w1.weight"}]
    assert payload["shape_changes"][0] == {
        "key_a": "norm.scale", "key_b": "model.norm.weight", "normalised_key": "norm.scale",
        "shape_a": [32], "shape_b": [33]}

    # values across layouts: each side's own spelling, after the RoPE permutation
    tensors = read_safetensors(checkpoints["hf"] / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] += 2.0
    edited = tmp_path / "edited"
    edited.mkdir()
    shutil.copy(checkpoints["hf"] / "config.json", edited / "config.json")
    save_file(tensors, edited / "model.safetensors")
    values = _diff(checkpoints["native"], edited, "--values")
    assert values.exit_code == 1, values.output
    assert ("  layers.1.attn.q_proj.weight (B: model.layers.1.self_attn.q_proj.weight): "
            "max |a-b| 2 (1 of") in values.stdout


def test_native_against_fused_names_each_side_as_stored(checkpoints, tmp_path):
    tensors = torch.load(checkpoints["native"], weights_only=True)
    tensors["layers.0.mlp.w2.weight"] = tensors["layers.0.mlp.w2.weight"].to(torch.float16)
    native = tmp_path / "native.pt"
    torch.save(tensors, native)
    result = _diff(native, checkpoints["fused"], "--no-values")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "  layers.0.mlp.w2.weight (B: decoder.layers.0.mlp.w2.weight): f16 -> f32" in lines
    assert f"  decoder.layers.{FUSION_LAYER}.fusion_layer.* (13 keys)" in lines
    payload = json.loads(_diff(native, checkpoints["fused"], "--no-values", "--json").stdout)
    assert payload["dtype_changes"] == [{
        "key_a": "layers.0.mlp.w2.weight", "key_b": "decoder.layers.0.mlp.w2.weight",
        "normalised_key": "decoder.layers.0.mlp.w2.weight", "dtype_a": "f16", "dtype_b": "f32"}]
    only_b = {entry["key"] for entry in payload["only_in_b"]}
    assert "decoder.tok_embeddings.fusion_embedding.weight" in only_b
    assert all(entry["key"] == entry["normalised_key"] for entry in payload["only_in_b"])
