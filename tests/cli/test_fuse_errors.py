"""Every way fuse, validate and unfuse can be given bad input: one line, exit 2, no output;
and interrupted fuses that leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.hardening.conftest import assert_one_line_error, cli, snapshot
from tests.hardening.test_interruption import run_child

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def inputs(tmp_path):
    encoder = Path(shutil.copytree(EXAMPLES / "tiny-clip-vision", tmp_path / "clip"))
    decoder = Path(shutil.copytree(EXAMPLES / "tiny-llama", tmp_path / "llama"))
    return encoder, decoder


def _fuse(encoder, decoder, out, *options):
    return cli("fuse", encoder, decoder, "-o", out, *options)


@pytest.mark.parametrize("options, fragments", [
    (["--layers", "4"], ["fusion layer 4 is out of range for a 4-layer decoder"]),
    (["--layers", "1,x"], ["--layers takes comma-separated"]),
    (["--every", "9"], ["--every 9 is larger than the decoder's 4 layers"]),
    (["--every", "2", "--layers", "1"], ["--every or --layers, not both"]),
    (["--projection", "conv"], ["unknown projection 'conv'"]),
    (["--embedding-init", "xavier"], ["unknown embedding init"]),
    (["--encoder-layer", "7"], ["--encoder-layer 7 is outside"]),
    (["--encoder-layer", "penultimate"], ["--encoder-layer takes"]),
    (["--new-token", "<a>", "--new-token", "<a>"], ["new tokens repeat"]),
    (["--new-token", " "], ["non-empty"]),
    (["--dtype", "int8"], ["'--dtype': unknown dtype 'int8'"]),
    (["--max-shard-size", "lots"], ["lots"]),
])
def test_bad_options(inputs, tmp_path, options, fragments):
    encoder, decoder = inputs
    before = snapshot(tmp_path)
    result = _fuse(encoder, decoder, tmp_path / "out", *options)
    assert_one_line_error(result, *fragments)
    assert snapshot(tmp_path) == before


def test_swapped_unrecognised_and_fused_inputs(inputs, tmp_path):
    encoder, decoder = inputs
    assert_one_line_error(_fuse(decoder, encoder, tmp_path / "out"), "swapped")
    assert_one_line_error(_fuse(encoder, encoder, tmp_path / "out"), "DECODER holds a vision")
    assert_one_line_error(_fuse(decoder, decoder, tmp_path / "out"), "ENCODER holds a decoder")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(_fuse(encoder, junk, tmp_path / "out"), "junk.safetensors")
    assert_one_line_error(_fuse(encoder, tmp_path / "missing", tmp_path / "out"), "missing")
    assert _fuse(encoder, decoder, tmp_path / "fused", "--every", "2").exit_code == 0
    assert_one_line_error(_fuse(encoder, tmp_path / "fused", tmp_path / "out"),
                          "already a fused checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["decoder", "inside-decoder", "encoder-file", "parent"])
def test_output_never_touches_an_input(inputs, tmp_path, where):
    encoder, decoder = inputs
    out = {"decoder": decoder, "inside-decoder": decoder / "fused",
           "encoder-file": encoder / "model.safetensors", "parent": tmp_path}[where]
    before = snapshot(tmp_path)
    result = _fuse(encoder, decoder, out, "--every", "2", "--overwrite")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_fusesurgery_output(inputs, tmp_path):
    encoder, decoder = inputs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert_one_line_error(_fuse(encoder, decoder, mine, "--every", "2", "--overwrite"),
                          "not written by fusesurgery")
    assert (mine / "notes.txt").read_text() == "precious"
    out = tmp_path / "out"
    assert _fuse(encoder, decoder, out, "--every", "2").exit_code == 0
    assert_one_line_error(_fuse(encoder, decoder, out, "--every", "2"), "--overwrite")
    result = _fuse(encoder, decoder, out, "--layers", "0", "--overwrite")
    assert result.exit_code == 0, result.output
    assert '"fusion_layers": [\n      0\n    ]' in (out / "fusion_config.json").read_text()


def test_validate_and_unfuse_errors(inputs, tmp_path):
    encoder, decoder = inputs
    assert_one_line_error(cli("validate", decoder), "not a fused checkpoint", "fusion_config.json")
    assert_one_line_error(cli("unfuse", decoder, "-o", tmp_path / "u"), "not a fused checkpoint")
    fused = tmp_path / "fused"
    assert _fuse(encoder, decoder, fused, "--every", "2").exit_code == 0
    assert_one_line_error(cli("validate", fused, "--against", fused), "--against",
                          "fused checkpoint")
    assert_one_line_error(cli("unfuse", fused, "-o", tmp_path / "u", "--part", "head"),
                          "unknown part 'head'")
    assert_one_line_error(cli("unfuse", fused, "-o", tmp_path / "u", "--format", "gguf"),
                          "unknown format 'gguf'")
    assert_one_line_error(cli("unfuse", fused, "-o", tmp_path / "u", "--merge-embeddings",
                              "--part", "encoder"), "--merge-embeddings needs")
    assert_one_line_error(cli("unfuse", fused, "-o", tmp_path / "u", "--merge-embeddings",
                              "--format", "native"), "--merge-embeddings needs")
    assert_one_line_error(cli("unfuse", fused, "-o", fused / "inside"), "input")
    assert_one_line_error(cli("validate", fused, "--dtype", "fp8"), "--dtype")
    if not torch.cuda.is_available():
        assert_one_line_error(cli("validate", fused, "--device", "cuda"), "no CUDA device")
    (fused / "fusion_config.json").write_text('{"format": "fusesurgery-fused", '
                                             '"schema_version": 99}')
    assert_one_line_error(cli("validate", fused), "schema_version 99", "upgrade")


def test_validate_fails_on_a_tampered_checkpoint(inputs, tmp_path):
    """A fusion branch that is not finite fails validation even though its gate is zero."""
    from safetensors.torch import load_file, save_file

    encoder, decoder = inputs
    fused = tmp_path / "fused"
    assert _fuse(encoder, decoder, fused, "--layers", "1").exit_code == 0
    key = "decoder.layers.1.fusion_layer.attn.v_proj.weight"
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    weights = fused / index["weight_map"][key]
    tensors = load_file(weights)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    result = cli("validate", fused, "--json")
    assert result.exit_code == 1, result.output
    assert '"fusion branch is finite"' in result.stdout and '"fail"' in result.stdout


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143),
                                               ("SIGKILL", -signal.SIGKILL)])
def test_an_interrupted_fuse_leaves_no_output_and_a_rerun_works(inputs, tmp_path, signal_name,
                                                               code):
    encoder, decoder = inputs
    out = tmp_path / "out"
    before = snapshot(encoder), snapshot(decoder)
    # the hardening tests' child: the real entry point, signalled as the output's first
    # bytes are written
    child = run_child(signal_name, "fuse", encoder, decoder, "-o", out, "--every", "2")
    assert child.returncode == code, child.stderr
    assert "Traceback" not in child.stderr
    assert not out.exists()
    assert (snapshot(encoder), snapshot(decoder)) == before
    result = _fuse(encoder, decoder, out, "--every", "2")
    assert result.exit_code == 0, result.output
    assert [n for n in os.listdir(tmp_path) if ".partial-" in n or ".old-" in n] == []


@pytest.mark.parametrize("command", ["unfuse", "convert-native", "convert-mllama"])
@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_fused_outputs_never_touch_their_input(inputs, tmp_path, command, where):
    encoder, decoder = inputs
    fused = tmp_path / "fused"
    assert _fuse(encoder, decoder, fused, "--every", "2").exit_code == 0
    out = {"itself": fused, "inside": fused / "x", "parent": tmp_path}[where]
    args = {"unfuse": ["unfuse", fused, "-o", out],
            "convert-native": ["convert", fused, "-o", out],
            "convert-mllama": ["convert", fused, "-o", out, "--to", "mllama"]}[command]
    before = snapshot(tmp_path)
    result = cli(*args, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before
