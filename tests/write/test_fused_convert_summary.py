"""convert of a fused checkpoint to Mllama counts what it wrote and says what it left out."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app
from tests.fusion_inputs import save_decoder, save_encoder

pytest.importorskip("transformers")


def _stored_keys(directory) -> set[str]:
    keys: set[str] = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as file:
            keys.update(file.keys())
    return keys


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    decoder, _ = save_decoder("llama", root)
    fusesurgery.fuse(save_encoder("clip", root), decoder, root / "fused", every=2)
    return root / "fused"


def test_mllama_summary_counts_the_written_tensors_and_notes_the_tower(fused, tmp_path):
    with fusesurgery.io.open_checkpoint(fused) as source:
        fused_keys = set(source.keys())
    left_out = {k for k in fused_keys if k.startswith(("encoder.vision.", "encoder.projection."))}
    assert left_out  # the CLIP tower and projection travel in the fused checkpoint

    runner = CliRunner()
    text = runner.invoke(app, ["convert", str(fused), "-o", str(tmp_path / "m"),
                               "--to", "mllama"])
    assert text.exit_code == 0, text.output
    written = _stored_keys(tmp_path / "m")
    # the two embedding tables merge into one; the tower and projection are not written
    assert len(written) == len(fused_keys) - len(left_out) - 1
    assert f": {len(written)} tensors," in text.stdout
    note = (f"left out the CLIP tower and projection ({len(left_out)} tensors, encoder.vision.* "
            "and encoder.projection.*): Mllama's vision model is not a CLIP/SigLIP tower, so "
            "the output is MllamaForCausalLM, the fused decoder alone")
    assert note in text.stderr.splitlines()

    as_json = runner.invoke(app, ["convert", str(fused), "-o", str(tmp_path / "j"),
                                  "--to", "mllama", "--json"])
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.stdout)
    assert summary["tensors"] == len(_stored_keys(tmp_path / "j")) == len(written)
    assert note in summary["notes"]


def test_fused_to_native_counts_every_tensor(fused, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(fused), "-o", str(tmp_path / "n"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == len(_stored_keys(tmp_path / "n")) == len(_stored_keys(fused))
    assert summary["notes"] == []
