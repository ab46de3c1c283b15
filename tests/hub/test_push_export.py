"""``push`` of a transformers-layout fused directory (``fuse --format transformers`` of an
OLMo 2 decoder and an AIMv2 tower): validated through transformers' classes, a card that
loads it with ``AutoModelForImageTextToText``, every file uploaded as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fusesurgery.cli.app import app
from tests.hub.conftest import WRITE_TOKEN

transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture
def export(tmp_path) -> Path:
    torch.manual_seed(0)
    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, pad_token_id=0, eos_token_id=1,
    )).save_pretrained(tmp_path / "olmo2")
    transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(tmp_path / "aimv2")
    out = tmp_path / "vlm"
    result = runner.invoke(app, ["fuse", str(tmp_path / "aimv2"), str(tmp_path / "olmo2"),
                                 "-o", str(out), "--every", "2"])
    assert result.exit_code == 0, result.output
    return out


def test_push_of_a_transformers_layout_directory(export, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = runner.invoke(app, ["push", str(export), "fuse-org/olmo-vlm", "--token",
                                 WRITE_TOKEN, "--base-model", "fuse-org/olmo2"])
    assert result.exit_code == 0, result.output
    from huggingface_hub import ModelCard, snapshot_download

    down = Path(snapshot_download("fuse-org/olmo-vlm", endpoint=hub.url,
                                  cache_dir=tmp_path / "cache", token=WRITE_TOKEN))
    for path in export.rglob("*"):
        name = path.relative_to(export).as_posix()
        if path.is_file() and not name.startswith("."):
            assert (down / name).read_bytes() == path.read_bytes(), name
    card = ModelCard.load(down / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers"
    assert {"olmo2", "aimv2_vision_model"} <= set(card.data.to_dict()["tags"])
    assert "AutoModelForImageTextToText.from_pretrained(\"fuse-org/olmo-vlm\"" in card.text
    assert "| PASS | logits with an image equal its own text model" in card.text


def test_a_broken_export_is_not_pushed(export, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    config = json.loads((export / "config.json").read_text())
    config["fusion_head_dim"] = 4
    (export / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["push", str(export), "fuse-org/olmo-vlm", "--token",
                                 WRITE_TOKEN, "--quick"])
    assert result.exit_code == 2, result.output
    assert "its config.json needs" in result.stderr
    assert "fuse-org/olmo-vlm" not in hub.repos


def test_a_truncated_config_json_is_named_not_taken_for_no_checkpoint(export):
    (export / "config.json").write_bytes((export / "config.json").read_bytes()[:200])
    result = runner.invoke(app, ["push", str(export), "fuse-org/olmo-vlm", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "config.json: not valid JSON" in result.stderr
    assert "no fusion_config.json" not in result.stderr
