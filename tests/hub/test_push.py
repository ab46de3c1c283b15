"""``fusesurgery push``: the real huggingface_hub client against the local fake Hub
(tests/hub_server.py). Push, download back with the client, validate; the card's metadata;
one commit; --dry-run without network; each refusal and failure as one line, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app
from tests.hub.conftest import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN

ROOT = Path(__file__).resolve().parents[2]
DECODER = ROOT / "examples" / "tiny-llama"
ENCODER = ROOT / "examples" / "tiny-clip-vision"
runner = CliRunner()


@pytest.fixture
def fused(fused_example, tmp_path) -> Path:
    """A private copy of a fused example checkpoint (tests may break it)."""
    copy = tmp_path / "my-vlm"
    shutil.copytree(fused_example, copy)
    return copy


@pytest.fixture
def on_hub(hub, monkeypatch):
    """This process talks to ``hub`` (endpoint read at call time), with no token set."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


def push(*args, token: str | None = WRITE_TOKEN):
    words = ["push", *map(str, args)]
    if token is not None:
        words += ["--token", token]
    return runner.invoke(app, words)


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_push_download_validate_round_trip(fused, on_hub, hub_env, tmp_path):
    before = _tree(fused)
    run = subprocess.run(
        [sys.executable, "-m", "fusesurgery", "push", str(fused), "fuse-org/tiny-vlm",
         "--base-model", "fuse-org/tiny-llama", "--base-model", "fuse-org/tiny-clip",
         "--license", "apache-2.0"],
        env=hub_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(f"{on_hub.url}/fuse-org/tiny-vlm/commit/")
    assert "pushed 16 files" in run.stderr and "(new repo)" in run.stderr
    assert _tree(fused) == before  # the local directory is untouched, its README included

    # one commit on top of the repo's initial one, all files in it
    assert len(on_hub.requests_of("commit", "POST")) == 1
    repo = on_hub.repos["fuse-org/tiny-vlm"]
    assert len(repo.commits) == 2

    from huggingface_hub import ModelCard, snapshot_download

    down = Path(snapshot_download("fuse-org/tiny-vlm", endpoint=on_hub.url,
                                  cache_dir=tmp_path / "cache", token=WRITE_TOKEN))
    got = {p.relative_to(down).as_posix() for p in down.rglob("*") if p.is_file()}
    expected = {name for name in before if not name.startswith(".")}
    assert got == expected | {".gitattributes"}
    for name in expected - {"README.md"}:
        assert (down / name).read_bytes() == before[name], name

    card = ModelCard.load(down / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == ["fuse-org/tiny-llama", "fuse-org/tiny-clip"]
    assert data["base_model_relation"] == "finetune"
    assert data["library_name"] == "fusesurgery"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["license"] == "apache-2.0"
    assert {"fusesurgery", "llama", "clip"} <= set(data["tags"])
    text = card.text
    assert "| fusion layers | 1, 3 (of 4)" in text
    assert "`<\\|image\\|>` = 512" in text
    assert "fusesurgery.load_fused(path)" in text
    assert ("| PASS | text-only logits equal its decoder's without the fusion layers | "
            "bitwise equal |") in text
    assert "| INFO | original decoder tensors and logits compared with the source's | " \
        "not compared: no --against |" in text
    assert "merge" in text  # says why the relation is not the inferred one

    result = runner.invoke(app, ["validate", str(down), "--against", str(DECODER), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identity"] is True


def test_dry_run_prints_files_sizes_and_card_without_network(fused, on_hub):
    result = push(fused, "fuse-org/tiny-vlm", "--dry-run", token=None)
    assert result.exit_code == 0, result.output
    assert on_hub.requests == []  # nothing at all reached the Hub
    out = result.stdout
    assert "would upload 16 files" in out and "to fuse-org/tiny-vlm in one commit" in out
    assert "model-00001-of-00003.safetensors" in out and "499 kB" in out
    assert ".fusesurgery.json" not in out
    assert "base_model" not in out.split("---")[1]  # local sources: no Hub id to name
    assert "pipeline_tag: image-text-to-text" in out
    assert "## Validation" in out and "dry run: nothing was uploaded" in result.stderr

    result = push(fused, "fuse-org/tiny-vlm", "--dry-run", "--json", "--quick", token=None)
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is True and doc["commit"] is None
    assert doc["total_bytes"] == sum(f["size"] for f in doc["files"])
    assert doc["validation"]["ok"] is True and len(doc["validation"]["checks"]) == 1
    assert on_hub.requests == []


def test_hub_sources_become_base_model(fused, on_hub):
    config_path = fused / "fusion_config.json"
    config = json.loads(config_path.read_text())
    config["sources"]["decoder"]["hub"] = {"repo_id": "meta-llama/Llama-3.1-8B",
                                           "revision": "main", "commit": "a" * 40}
    config["sources"]["encoder"]["hub"] = {"repo_id": "openai/clip-vit-large-patch14",
                                           "revision": "main", "commit": "b" * 40}
    config_path.write_text(json.dumps(config))
    result = push(fused, "fuse-org/vlm", "--dry-run", "--json", "--quick", token=None)
    doc = json.loads(result.stdout)
    assert doc["base_model"] == ["meta-llama/Llama-3.1-8B", "openai/clip-vit-large-patch14"]
    assert "base_model_relation: finetune" in doc["card"]
    assert f"({on_hub.url}/meta-llama/Llama-3.1-8B)" in doc["card"]  # links to HF_ENDPOINT


def test_existing_repo_pr_branch_and_private(fused, on_hub):
    assert push(fused, "tiny-vlm", "--quick", "--private").exit_code == 0  # alice/tiny-vlm
    repo = on_hub.repos["alice/tiny-vlm"]
    assert repo.private
    main = on_hub.head("alice/tiny-vlm")

    result = push(fused, "alice/tiny-vlm", "--quick", "--create-pr")  # nothing changed
    _one_line_error(result, "no pull request opened", "already holds exactly these files")
    generation = json.loads((fused / "generation_config.json").read_text())
    (fused / "generation_config.json").write_text(json.dumps({**generation, "top_p": 0.9}))
    result = push(fused, "alice/tiny-vlm", "--quick", "--create-pr",
                  "--commit-message", "Try a PR")
    assert result.exit_code == 0, result.output
    assert "/discussions/" in result.stdout
    assert on_hub.head("alice/tiny-vlm") == main  # the PR leaves main alone

    result = push(fused, "alice/tiny-vlm", "--quick", "--revision", "v2")
    assert result.exit_code == 0, result.output
    assert on_hub.head("alice/tiny-vlm", "v2") != main
    assert on_hub.file_bytes("alice/tiny-vlm", "fusion_config.json", "v2") == \
        (fused / "fusion_config.json").read_bytes()


def test_no_token_fails_before_any_work(fused, on_hub):
    result = push(fused, "fuse-org/tiny-vlm", token=None)
    _one_line_error(result, "no Hugging Face token", "--token", "HF_TOKEN")
    assert on_hub.requests == []


@pytest.mark.parametrize("token, repo_id, needles", [
    ("hf_not_a_token", "fuse-org/x", ("refused", "invalid or expired")),
    (READ_TOKEN, "fuse-org/x", ("fuse-org/x", "alice")),
    (OTHER_TOKEN, "fuse-org/x", ("fuse-org/x", "bob", "create")),
])
def test_refusals_are_one_line(fused, on_hub, token, repo_id, needles):
    result = push(fused, repo_id, "--quick", token=token)
    _one_line_error(result, *needles)
    assert "fuse-org/x" not in on_hub.repos
    assert on_hub.requests_of("commit") == []


def test_no_write_permission_on_someone_elses_repo(fused, on_hub):
    on_hub.add_repo("bob/theirs")
    result = push(fused, "bob/theirs", "--quick")
    _one_line_error(result, "no write permission on bob/theirs", "alice")
    assert len(on_hub.repos["bob/theirs"].commits) == 1


def test_upload_failure_says_what_was_and_was_not_uploaded(fused, on_hub):
    # the three shards upload in parallel: the first two PUTs pass, the third and every
    # retry of it fail, so exactly one shard never arrives
    fault = on_hub.fail("lfs-upload", after=2, times=100)
    result = push(fused, "fuse-org/tiny-vlm", "--quick")
    line = _one_line_error(result, "network failure while uploading", "nothing was committed")
    assert fault.fired == 6  # the client's first try and its 5 retries
    assert "2 large files (" in line and "not uploaded: model-0000" in line
    missing = line.split("not uploaded: ")[1]
    assert missing.count("model-0000") == 1 and "and 11 more" in missing
    assert on_hub.requests_of("commit") == []
    assert len(on_hub.repos["fuse-org/tiny-vlm"].commits) == 1  # created, left as it was

    on_hub.faults.clear()
    result = push(fused, "fuse-org/tiny-vlm", "--quick")  # a retry skips what arrived
    assert result.exit_code == 0, result.output
    assert len(on_hub.requests_of("lfs-upload", "PUT")) == 2 + 6 + 1


def test_commit_failure_leaves_the_repo_unchanged(fused, on_hub):
    on_hub.fail("commit", status=500)
    result = push(fused, "fuse-org/tiny-vlm", "--quick")
    _one_line_error(result, "while committing", "nothing was committed", "all 3 large files")
    assert len(on_hub.repos["fuse-org/tiny-vlm"].commits) == 1


def test_unreachable_hub(fused, hub, monkeypatch):
    port = hub.url.rsplit(":", 1)[1]
    hub.stop()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    result = push(fused, "fuse-org/tiny-vlm", "--quick")
    _one_line_error(result, "could not reach the Hub", "nothing was uploaded")


def _drop_fusion_config(out: Path) -> None:
    (out / "fusion_config.json").unlink()


def _stray_shard(out: Path) -> None:
    shutil.copy(out / "model-00003-of-00003.safetensors", out / "model-00004-of-00004.safetensors")


def _missing_tokenizer(out: Path) -> None:
    (out / "tokenizer.json").unlink()


def _missing_shard(out: Path) -> None:
    (out / "model-00002-of-00003.safetensors").unlink()


def _wrong_layers(out: Path) -> None:
    config = json.loads((out / "fusion_config.json").read_text())
    config["fusion"]["fusion_layers"] = [0, 2]
    (out / "fusion_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, needle", [
    (_drop_fusion_config, "no fusion_config.json"),
    (_stray_shard, "model-00004-of-00004.safetensors is not named by the index"),
    (_missing_tokenizer, "tokenizer.json is missing"),
    (_missing_shard, "model-00002-of-00003.safetensors"),
    (_wrong_layers, "gives fusion layers [0, 2], but the checkpoint holds fusion layers [1, 3]"),
], ids=["no-fusion-config", "stray-shard", "missing-file", "missing-shard", "wrong-keys"])
def test_broken_directory_is_refused_before_anything_is_sent(fused, on_hub, damage, needle):
    damage(fused)
    result = push(fused, "fuse-org/tiny-vlm")
    _one_line_error(result, needle)
    # only the token was checked (so a bad one fails before the long checks): no repo was
    # created, nothing of the directory left the machine
    assert [r.endpoint for r in on_hub.requests] == ["whoami"]


def test_bad_repo_id(fused, on_hub):
    _one_line_error(push(fused, "a/b/c", "--dry-run"), "not a Hub repo id")


def test_json_errors_are_json(fused, on_hub):
    result = push(fused, "fuse-org/tiny-vlm", "--json", token=None)
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["code"] == 2 and doc["error"].startswith("no Hugging Face token")


def test_quiet_push_prints_only_data(fused, on_hub):
    result = push(fused, "fuse-org/tiny-vlm", "--quick", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.strip().startswith(f"{on_hub.url}/fuse-org/tiny-vlm/commit/")


def test_fused_from_repo_ids_names_them_as_base_model(on_hub, seed_repo, monkeypatch, tmp_path):
    seed_repo("fuse-org/tiny-llama", DECODER)
    seed_repo("fuse-org/tiny-clip", ENCODER)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    out = tmp_path / "from-hub"
    fusesurgery.fuse("fuse-org/tiny-clip", "hf://fuse-org/tiny-llama@main", out, every=2)
    result = push(out, "fuse-org/tiny-vlm")
    assert result.exit_code == 0, result.output
    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download("fuse-org/tiny-vlm", "README.md", endpoint=on_hub.url,
                                          cache_dir=tmp_path / "cache", token=WRITE_TOKEN))
    assert card.data.base_model == ["fuse-org/tiny-llama", "fuse-org/tiny-clip"]
    assert card.data.base_model_relation == "finetune"
    assert f"[`fuse-org/tiny-llama`]({on_hub.url}/fuse-org/tiny-llama)" in card.text


def test_pushing_the_same_files_again_commits_nothing(fused, on_hub):
    assert push(fused, "fuse-org/tiny-vlm", "--quick").exit_code == 0
    commits = len(on_hub.repos["fuse-org/tiny-vlm"].commits)
    result = push(fused, "fuse-org/tiny-vlm", "--quick", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["committed"] is False and doc["commit"] == on_hub.head("fuse-org/tiny-vlm")
    assert len(on_hub.repos["fuse-org/tiny-vlm"].commits) == commits
    result = push(fused, "fuse-org/tiny-vlm", "--quick")
    assert "nothing to push" in result.stderr and "pushed" not in result.stderr


def test_card_names_local_sources_without_their_paths(fused, on_hub):
    result = push(fused, "fuse-org/vlm", "--dry-run", "--json", "--quick",
                  "--base-model", "fuse-org/tiny-llama", token=None)
    card = json.loads(result.stdout)["card"]
    assert str(ROOT) not in card and "/examples/" not in card
    assert "`tiny-clip-vision` (a local checkpoint)" in card  # no Hub id given for it
    assert f"[`fuse-org/tiny-llama`]({on_hub.url}/fuse-org/tiny-llama)" in card  # HF_ENDPOINT
    assert "several base models" not in card and "set rather than left" in card
    assert "were not run: --quick" in card  # a zero-gate identity not proven by --quick
    assert "15 files besides this card" in card


def test_a_checkpoint_already_in_the_repo_is_replaced_not_mixed(fused, on_hub, seed_repo,
                                                                 hub_env, tmp_path):
    seed_repo("alice/m", DECODER)  # a plain Llama: model.safetensors, config.json, ...
    (tmp_path / "LICENSE").write_text("mine")
    from huggingface_hub import HfApi

    HfApi(endpoint=on_hub.url, token=WRITE_TOKEN).upload_file(
        path_or_fileobj=str(tmp_path / "LICENSE"), path_in_repo="LICENSE", repo_id="alice/m")
    result = push(fused, "alice/m", "--quick", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert "model.safetensors" in doc["deleted"] and "config.json" in doc["deleted"]
    files = set(on_hub.repos["alice/m"].commits[on_hub.head("alice/m")].files)
    assert "model.safetensors" not in files and "config.json" not in files
    assert {"LICENSE", ".gitattributes", "fusion_config.json"} <= files  # the rest is kept
    run = subprocess.run([sys.executable, "-m", "fusesurgery", "validate", "alice/m",
                          "--json"], env=hub_env(), capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr  # what is on the Hub is one fused checkpoint


def test_links_inside_the_directory_are_followed(fused, on_hub, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(fused / "source", moved)
    (fused / "source").symlink_to(moved, target_is_directory=True)
    result = push(fused, "fuse-org/tiny-vlm", "--dry-run", "--json", "--quick", token=None)
    assert result.exit_code == 0, result.output
    paths = {f["path"] for f in json.loads(result.stdout)["files"]}
    assert "source/decoder/config.json" in paths and len(paths) == 16


def test_a_gate_record_the_weights_contradict_is_refused(fused, on_hub):
    config = json.loads((fused / "fusion_config.json").read_text())
    config["gates"] = {key: 0.5 for key in config["gates"]}  # a stale record
    (fused / "fusion_config.json").write_text(json.dumps(config))
    _one_line_error(push(fused, "fuse-org/tiny-vlm", "--dry-run", "--quick", token=None),
                    "is 0.5, but the weights hold 0.0")


def test_refused_metadata_revision_and_offline(fused, on_hub, monkeypatch):
    line = _one_line_error(push(fused, "fuse-org/tiny-vlm", "--quick", "--base-model",
                                "not a repo id!"), "not a Hub repo id")
    assert on_hub.requests_of("commit") == []
    assert push(fused, "fuse-org/tiny-vlm", "--quick").exit_code == 0
    _one_line_error(push(fused, "fuse-org/tiny-vlm", "--quick", "--create-pr", "--revision",
                         "no-such-branch"), "has no revision to commit to")
    on_hub.fail("commit", status=409)
    generation = json.loads((fused / "generation_config.json").read_text())
    (fused / "generation_config.json").write_text(json.dumps({**generation, "top_k": 5}))
    line = _one_line_error(push(fused, "fuse-org/tiny-vlm", "--quick"), "the Hub refused",
                           "HTTP 409", "nothing was committed")
    assert "network" not in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(on_hub.requests)
    _one_line_error(push(fused, "fuse-org/tiny-vlm"), "HF_HUB_OFFLINE is set")
    assert len(on_hub.requests) == before


def test_a_bare_name_is_pushed_and_described_under_the_token_owner(fused, on_hub):
    result = push(fused, "bare-vlm", "--quick", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["repo_id"] == "alice/bare-vlm"
    assert 'snapshot_download("alice/bare-vlm")' in doc["card"]


def test_a_bad_device_fails_before_the_checks(fused, on_hub):
    result = push(fused, "fuse-org/tiny-vlm", "--device", "tpu")
    _one_line_error(result, "unknown device 'tpu'")
    assert "validating" not in result.stderr
