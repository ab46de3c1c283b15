"""A Hub repo whose files are a transformers export (``convert --to transformers``, pushed or
uploaded) is read as a local export is: ``load_fused("org/name")``, ``generate``,
``validate``, ``unfuse`` and ``inspect`` take the repo id (``inspect`` from its config and
remote headers, downloading no weights). Against the local fake Hub; nothing else is reached.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app
from tests.hub.conftest import READ_TOKEN
from tests.hub_server import FakeHub

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """The bundled examples fused, a gate opened, exported."""
    base = tmp_path_factory.mktemp("hub-export")
    fusesurgery.fuse(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", base / "fused",
                     every=2)
    model = fusesurgery.load_fused(base / "fused")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("ca_scale.scale")).fill_(0.5)
    fusesurgery.save_fused(model, base / "gated")
    fusesurgery.export_transformers(base / "gated", base / "hf")
    return base / "hf"


@pytest.fixture
def repo(hub: FakeHub, seed_repo, export, monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    seed_repo("alice/vlm", export)
    hub.clear_log()
    return "alice/vlm"


def _weight_downloads(hub: FakeHub) -> list:
    return [r for r in hub.requests_of("resolve", "GET")
            if r.path.endswith(".safetensors") and r.range is None]


def test_load_fused_of_a_repo_id_is_the_local_exports(repo, export):
    remote, local = fusesurgery.load_fused(repo), fusesurgery.load_fused(export)
    assert remote.fused_config == local.fused_config and remote.fused_config.trained
    theirs = local.state_dict()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in remote.state_dict().items())


def test_inspect_reads_the_repo_without_its_weights(repo, hub):
    result = runner.invoke(app, ["inspect", repo])
    assert result.exit_code == 0, result.output
    assert "a transformers export (convert --to transformers)" in result.stdout
    assert "trained: 1 of 4 gates nonzero" in result.stdout and "note:" not in result.stdout
    assert _weight_downloads(hub) == []


def test_validate_generate_and_unfuse_take_the_repo_id(repo, export, tmp_path):
    result = runner.invoke(app, ["validate", repo, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"] == repo
    assert any(c["name"] == "transformers export's logits with an image equal load_fused's"
               and c["status"] == "pass" for c in report["checks"])

    args = ["--prompt", "word7 word8", "--max-new-tokens", "3", "--json"]
    remote = runner.invoke(app, ["generate", repo, *args])
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout) == json.loads(
        runner.invoke(app, ["generate", str(export), *args]).stdout)

    out = tmp_path / "llama"
    result = runner.invoke(app, ["unfuse", repo, "-o", str(out)])
    assert result.exit_code == 0, result.output
    source = load_file(EXAMPLES / "tiny-llama" / "model.safetensors")
    ours = load_file(out / "model.safetensors")
    assert ours.keys() == source.keys()
    assert all(torch.equal(ours[key], value) for key, value in source.items())
