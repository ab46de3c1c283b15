import io
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fusesurgery.cli.app import app
from fusesurgery.cli.inspect_render import render_report
from fusesurgery.io import TensorInfo
from fusesurgery.reports import inspect_checkpoint
from fusesurgery.testing import write_sparse_safetensors
from tests.reports.inspect_checkpoints import (
    save_fused,
    save_hf_llama,
    save_hf_vision,
    save_native_pt,
    write_405b,
)

runner = CliRunner()

GATES = {"decoder.layers.1.fusion_layer.ca_scale.scale": 0.5,
         "decoder.layers.3.fusion_layer.mlp_scale.scale": -0.25}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect_cli")
    return {
        "llama": save_hf_llama(root / "llama"),
        "native": save_native_pt(root / "native.pt"),
        "fused": save_fused(root / "fused" / "model.safetensors"),
        "gated": save_fused(root / "gated" / "model.safetensors", GATES),
    }


def invoke(*args):
    return runner.invoke(app, ["inspect", *map(str, args)])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def render(report, width=100, **kwargs):
    buffer = io.StringIO()
    Console(file=buffer, width=width, highlight=False).print(render_report(report, **kwargs))
    return buffer.getvalue()


def test_human_output(checkpoints):
    result = invoke(checkpoints["llama"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "decoder · llama · hf layout · config from config.json" in out
    assert "model.layers.{0..2}.self_attn.q_proj.weight" in out
    assert "final norm + output" in out and "31,968" in out  # total parameters
    assert "llama3 x8 (low 1, high 4, orig 8192)" in out
    assert result.stderr == ""


def test_json_output(checkpoints):
    result = invoke(checkpoints["llama"], "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["format"] == "safetensors"
    assert payload["architecture"]["kind"] == "decoder"
    config = payload["config"]
    assert [config[k] for k in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                                "num_kv_heads", "head_dim", "intermediate_dim")] == [
        64, 32, 3, 4, 2, 8, 64]
    assert payload["num_parameters"] == 31_968 and payload["total_bytes"] == 4 * 31_968
    assert payload["provenance"]["head_dim"] in ("read", "inferred")
    assert payload["dtypes"] == {"f32": {"num_tensors": 30, "num_parameters": 31_968,
                                         "nbytes": 4 * 31_968}}
    assert payload["fusion"] is None
    assert {"name": "model.layers.{0..2}.mlp.up_proj.weight", "template":
            "model.layers.{i}.mlp.up_proj.weight", "layers": [0, 1, 2], "shape": [64, 32],
            "dtype": "f32", "num_tensors": 3, "num_parameters": 3 * 64 * 32} in payload["key_tree"]


def test_keys_lists_every_key(checkpoints):
    result = invoke(checkpoints["llama"], "--keys", "--json")
    keys = json.loads(result.stdout)["keys"]
    assert len(keys) == 30
    assert {"name": "model.layers.1.mlp.up_proj.weight", "shape": [64, 32],
            "dtype": "f32"} in keys
    human = invoke(checkpoints["llama"], "--keys").stdout
    assert "model.layers.2.self_attn.o_proj.weight" in human
    assert "{0..2}" not in human


def test_missing_head_count_shows_what_the_weights_tell_and_names_the_flag(checkpoints,
                                                                           tmp_path):
    # inspect is a metadata viewer: without a head count it still shows files, tensors,
    # dtypes, parameters, key rows and the dims the shapes give, and says what needs the flag
    result = invoke(checkpoints["native"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "decoder · llama · native layout · no config file" in out
    for shown in ("vocab_size 256 inferred", "embed_dim 64 inferred", "num_layers 4 inferred",
                  "intermediate_dim 128 inferred", "num_heads ? needs --num-heads",
                  "head_dim ? needs --num-heads", "num_kv_heads ? needs --num-heads",
                  "layers.{0..3}.attn.q_proj.weight [64, 64] f32", "180,800",
                  "num_heads, head_dim and num_kv_heads need --num-heads: neither a config "
                  "file nor the shapes tell them (layers.0.attn.q_proj.weight has 64 rows, "
                  "layers.0.attn.k_proj.weight has 32 rows"):
        assert shown in out, shown
    payload = json.loads(invoke(checkpoints["native"], "--json").stdout)
    assert payload["architecture"] == {"kind": "decoder", "layout": "native",
                                       "fused_style": None, "resolved": False}
    assert payload["config"]["embed_dim"] == 64 and "num_heads" not in payload["config"]
    assert payload["missing"] == {"num_heads": "--num-heads", "head_dim": "--num-heads",
                                  "num_kv_heads": "--num-heads"}
    assert payload["attention_rows"] == {"layers.0.attn.q_proj.weight": 64,
                                         "layers.0.attn.k_proj.weight": 32}
    assert payload["num_parameters"] == 180_800 and len(payload["key_tree"]) == 12
    # the commands that build or write the model still ask, in one line
    for command in (["convert", str(checkpoints["native"]), "-o", str(tmp_path / "out")],
                    ["fuse", str(save_hf_vision("clip", tmp_path / "clip")),
                     str(checkpoints["native"]), "-o", str(tmp_path / "fused")]):
        assert_one_line_error(runner.invoke(app, command), "--num-heads")
    result = invoke(checkpoints["native"], "--num-heads", "4", "--rope-base", "500000",
                    "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["architecture"]["layout"] == "native"
    assert payload["config"]["num_heads"] == 4 and payload["provenance"]["num_heads"] == "given"
    assert payload["config"]["rope_base"] == 500_000.0
    assert_one_line_error(invoke(checkpoints["native"], "--num-heads", "3"),
                          "not a multiple of num_heads 3")


def test_fused_identity(checkpoints):
    result = invoke(checkpoints["fused"], "--num-heads", "4", "--encoder-num-heads", "4")
    assert result.exit_code == 0, result.output
    assert "identity: all gates 0 (4 gates)" in result.stdout
    assert "2 at layers {1,3}" in result.stdout and "8 new tokens" in result.stdout
    assert "encoder config" in result.stdout
    payload = json.loads(invoke(checkpoints["fused"], "--num-heads", "4", "--json").stdout)
    assert payload["architecture"] == {"kind": "fused", "layout": "native",
                                       "fused_style": "fusesurgery"}
    assert payload["config"]["family"] == "llama"
    assert payload["fusion"]["is_identity"] is True
    assert payload["fusion"]["encoder"] is None  # no --encoder-num-heads: noted instead
    assert any("--encoder-num-heads" in note for note in payload["notes"])


def test_fused_with_open_gates(checkpoints):
    result = invoke(checkpoints["gated"], "--num-heads", "4", "--encoder-num-heads", "4")
    assert result.exit_code == 0, result.output
    assert "2 of 4 gates non-zero" in result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.strip()[:1] in ("1", "3") and len(line.split()) == 3}
    assert rows == {"1": ["0.5", "0"], "3": ["0", "-0.25"]}
    payload = json.loads(invoke(checkpoints["gated"], "--num-heads", "4", "--json").stdout)
    assert payload["fusion"]["is_identity"] is False
    assert {k: v for k, v in payload["fusion"]["gates"].items() if v} == GATES


def test_vision_tower(tmp_path):
    result = invoke(save_hf_vision("clip", tmp_path), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["architecture"]["kind"] == "vision"
    assert {"image_size", "patch_size", "embed_dim", "num_layers", "num_heads",
            "intermediate_dim"} <= set(payload["config"])
    names = [component["name"] for component in payload["components"]]
    assert "not converted (text tower of a CLIP/SigLIP checkpoint)" in names


def test_output_fits_100_columns(checkpoints, tmp_path):
    reports = [
        inspect_checkpoint(checkpoints["llama"]),
        inspect_checkpoint(checkpoints["gated"], {"num_heads": 4, "encoder_num_heads": 4}),
        inspect_checkpoint(save_hf_vision("clip", tmp_path / "clip")),
        inspect_checkpoint(write_405b(tmp_path / "405b"), {"num_heads": 128}),
    ]
    for report in reports:
        text = render(report)
        assert max(len(line.rstrip()) for line in text.splitlines()) <= 100
        for row in report.key_rows:  # no key is wrapped
            assert row.name in text


def test_405b_inspect_through_the_cli(tmp_path):
    # timings are benchmarks/bench_inspect_diff.py's business; this checks the figures
    directory = write_405b(tmp_path)
    result = invoke(directory, "--num-heads", "128")
    assert result.exit_code == 0, result.output
    assert "405.85B parameters" in result.stdout and "812 GB" in result.stdout


def test_bad_inputs_give_one_line(tmp_path):
    assert_one_line_error(invoke(tmp_path / "missing.safetensors"), "no such file")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert_one_line_error(invoke(garbage), str(garbage))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke(empty), "no checkpoint found")
    odd = tmp_path / "odd.safetensors"
    write_sparse_safetensors(odd, [TensorInfo("foo.weight", (2, 2), torch.float32)])
    assert_one_line_error(invoke(odd), "no known decoder, vision encoder or fused layout")
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    write_sparse_safetensors(bad_config / "model.safetensors",
                             [TensorInfo("foo.weight", (2,), torch.float32)])
    (bad_config / "config.json").write_text("{not json")
    assert_one_line_error(invoke(bad_config), "config.json: config file is not valid JSON")
