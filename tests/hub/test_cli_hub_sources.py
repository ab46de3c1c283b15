"""The command line with Hub repo ids as sources, run as child processes against the fake Hub
(HF_ENDPOINT, HF_TOKEN, HF_HOME set in the child's environment)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import FakeHub
from tests.tiny_models import TINY_VISION, save_tiny_hf_decoder


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusesurgery", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def repos(hub: FakeHub, seed_repo, tmp_path: Path) -> dict[str, str]:
    """A tiny CLIP vision tower and a tiny Llama on the fake Hub; their commits."""
    import transformers

    vision = tmp_path / "vision"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).save_pretrained(
        vision)
    llama = save_tiny_hf_decoder("llama", tmp_path / "llama")
    (llama / "model.onnx").write_bytes(b"\0" * 500_000)  # never fetched
    return {"enc/vision": seed_repo("enc/vision", vision, token="hf_write_enc"),
            "alice/llama": seed_repo("alice/llama", llama)}


@pytest.fixture
def hub(hub: FakeHub) -> FakeHub:
    hub.tokens["hf_write_enc"] = {"name": "enc", "write": True, "orgs": []}
    return hub


def test_fuse_from_repo_ids_then_validate_against_one(hub: FakeHub, repos, hub_env,
                                                      tmp_path: Path):
    env = hub_env()
    out = tmp_path / "out"
    fused = _run(env, "fuse", "enc/vision", "alice/llama", "-o", str(out), "--layers", "1")
    assert fused.returncode == 0, fused.stderr
    sources = json.loads((out / "fusion_config.json").read_text())["sources"]
    assert sources["decoder"]["hub"] == {"repo_id": "alice/llama", "revision": "main",
                                         "commit": repos["alice/llama"]}
    assert sources["encoder"]["path"] == "enc/vision"
    assert not any(r.path.endswith(".onnx") for r in hub.requests)

    hub.clear_log()
    validated = _run(env, "validate", str(out), "--against", "hf://alice/llama")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "all checks passed" in validated.stdout
    # the decoder came from the cache: the Hub was asked which commit main is, not for data
    assert [r for r in hub.requests_of("resolve", "GET")] == []


def test_inspect_and_diff_read_headers_only(hub: FakeHub, repos, hub_env):
    env = hub_env(token=None)  # public repos need no token
    hub.clear_log()
    inspected = _run(env, "inspect", "alice/llama", "--json")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["path"] == "alice/llama" and report["config"]["family"] == "llama"
    data = [r for r in hub.requests_of("resolve", "GET") if r.path.endswith(".safetensors")]
    assert [r.range for r in data][0] == "bytes=0-7" and len(data) == 2
    assert all(r.range is not None for r in data)
    assert sum(r.sent for r in data) < 10_000  # the model file is about 100 kB

    hub.clear_log()
    diffed = _run(env, "diff", "hf://alice/llama", f"alice/llama@{repos['alice/llama']}")
    assert diffed.returncode == 0, diffed.stdout + diffed.stderr
    assert "values not compared" in diffed.stdout
    data = [r for r in hub.requests_of("resolve", "GET") if r.path.endswith(".safetensors")]
    assert data and all(r.range is not None for r in data)


def test_hub_errors_are_one_line(hub: FakeHub, repos, hub_env):
    missing = _run(hub_env(), "inspect", "alice/nope")
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "no model repo alice/nope" in missing.stderr
    assert "Traceback" not in missing.stderr
    offline = _run(hub_env(HF_HUB_OFFLINE="1"), "fuse", "enc/vision", "alice/llama", "-o",
                   "never-written")
    assert offline.returncode == 2
    assert "no repo of that name in the local Hub cache while HF_HUB_OFFLINE" in offline.stderr
    assert offline.stderr.strip().count("\n") == 0, offline.stderr
    assert not Path("never-written").exists()


def test_key_level_diff_of_a_remote_repo_says_why_values_were_skipped(hub: FakeHub, repos,
                                                                      hub_env):
    run = subprocess.run([sys.executable, "-m", "fusesurgery", "diff", "alice/llama",
                          "alice/llama", "--json"], env=hub_env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["values_compared"] is False
    assert doc["values_skipped"].startswith("alice/llama is read from its remote headers")


def test_quiet_and_logs_get_no_hub_progress_bars(hub: FakeHub, repos, hub_env, tmp_path):
    for extra in (["-q"], []):  # -q, and a stderr that is a pipe (a log)
        run = subprocess.run([sys.executable, "-m", "fusesurgery", *extra, "fuse",
                              "enc/vision", "alice/llama", "-o", str(tmp_path / f"out{extra}"),
                              "--every", "1"],  # both sources downloaded
                             env=hub_env(HF_HOME=str(tmp_path / f"home{len(extra)}")),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "Fetching" not in run.stderr and "%|" not in run.stderr, run.stderr
