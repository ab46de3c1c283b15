"""The fake Hub (tests/hub_server.py) against the real huggingface_hub client: what the
client uploads arrives, what it downloads is what was uploaded, and the server's refusals
become the client's own exception types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

from tests.hub.conftest import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN
from tests.hub_server import FakeHub, git_blob_sha

REPO = "alice/tiny"


def _model_dir(directory: Path) -> dict[str, torch.Tensor]:
    """A small Hugging Face style directory: config, tokenizer, one safetensors file
    (2 tensors), an onnx file; returns the tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"embed.weight": torch.arange(64 * 16, dtype=torch.float32).reshape(64, 16),
               "norm.weight": torch.ones(16, dtype=torch.bfloat16)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden": 16}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (directory / "onnx").mkdir(exist_ok=True)
    (directory / "onnx" / "model.onnx").write_bytes(b"\x08\x07" * 300)
    return tensors


def test_upload_folder_classifies_uploads_and_commits_them(hub: FakeHub, tmp_path: Path):
    _model_dir(tmp_path / "m")
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    url = api.create_repo(REPO)
    assert url == f"{hub.url}/{REPO}" and url.repo_id == REPO
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # the 409 the client expects
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(REPO)
    assert error.value.response.status_code == 409

    info = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "m", commit_message="add")

    assert len(info.oid) == 40 and hub.head(REPO) == info.oid
    # safetensors and onnx are LFS by the repo's .gitattributes (though small), JSON is not
    uploaded = {r.endpoint for r in hub.requests}
    assert {"preupload", "lfs-batch", "lfs-upload", "lfs-verify", "commit"} <= uploaded
    puts = hub.requests_of("lfs-upload", "PUT")
    assert sorted(r.received for r in puts) == sorted(
        [(tmp_path / "m" / "model.safetensors").stat().st_size, 600])
    model_info = api.model_info(REPO, files_metadata=True)
    siblings = {s.rfilename: s for s in model_info.siblings}
    assert set(siblings) == {".gitattributes", "config.json", "tokenizer.json",
                             "model.safetensors", "onnx/model.onnx"}
    assert siblings["model.safetensors"].lfs is not None
    assert siblings["config.json"].lfs is None
    config = (tmp_path / "m" / "config.json").read_bytes()
    assert siblings["config.json"].blob_id == git_blob_sha(config)
    assert model_info.sha == info.oid and model_info.private is False
    assert hub.file_bytes(REPO, "model.safetensors") == (
        tmp_path / "m" / "model.safetensors").read_bytes()
    assert hub.repos[REPO].commits[info.oid].title == "add"


def test_download_round_trip_with_cache(hub: FakeHub, seed_repo, tmp_path: Path,
                                        hub_cache: Path):
    _model_dir(tmp_path / "m")
    sha = seed_repo(REPO, tmp_path / "m")
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=hub_cache,
                           token=False)
    assert Path(path).read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    assert f"snapshots/{sha}/" in Path(path).as_posix()
    # the blob is stored under its sha256 (X-Linked-Etag), as for the real Hub's LFS files
    assert Path(path).resolve().name == hub.repos[REPO].commits[sha].files[
        "model.safetensors"].lfs_sha256
    heads = hub.requests_of("resolve", "HEAD")
    assert heads and heads[-1].status == 200 and heads[-1].sent == 0

    hub.clear_log()
    again = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=hub_cache)
    assert again == path
    assert hub.requests_of("resolve", "GET") == []  # from the cache, after one HEAD


def test_snapshot_download_fetches_only_allowed_files(hub: FakeHub, seed_repo,
                                                      tmp_path: Path, hub_cache: Path):
    _model_dir(tmp_path / "m")
    seed_repo(REPO, tmp_path / "m")
    hub.clear_log()
    folder = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=hub_cache,
                                    allow_patterns=["*.json", "*.safetensors"]))
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    fetched = sorted(r.path.rsplit("/", 1)[-1] for r in hub.requests_of("resolve", "GET"))
    assert fetched == ["config.json", "model.safetensors", "tokenizer.json"]
    assert hub.requests_of("tree")  # the file list came from the tree endpoint


def test_revisions_branches_and_pull_requests(hub: FakeHub, seed_repo, tmp_path: Path,
                                              hub_cache: Path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "a.txt").write_text("one")
    first = seed_repo(REPO, tmp_path / "v1")
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "a.txt").write_text("two")
    on_branch = seed_repo(REPO, tmp_path / "v2", revision="dev")
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    pr = api.upload_file(path_or_fileobj=b"three", path_in_repo="a.txt", repo_id=REPO,
                         create_pr=True)

    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert hub.head(REPO) == first  # a pull request leaves main alone
    for revision, text in (("main", "one"), ("dev", "two"), (first, "one"),
                           (on_branch, "two"), ("refs/pr/1", "three")):
        path = hf_hub_download(REPO, "a.txt", revision=revision, endpoint=hub.url,
                               cache_dir=hub_cache)
        assert Path(path).read_text() == text, revision
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "a.txt", revision="nope", endpoint=hub.url, cache_dir=hub_cache)
    with pytest.raises(HfHubHTTPError) as error:  # parentCommit that is not the head
        api.upload_file(path_or_fileobj=b"x", path_in_repo="b.txt", repo_id=REPO,
                        parent_commit="0" * 40)
    assert error.value.response.status_code == 412


def test_get_safetensors_metadata_reads_only_the_header(hub: FakeHub, seed_repo,
                                                        tmp_path: Path):
    directory = tmp_path / "sharded"
    directory.mkdir()
    # big enough that the client's first 100 kB range does not cover the tensors
    first = {"a.weight": torch.zeros(256, 256)}  # 256 KiB of data
    second = {"b.weight": torch.zeros(300, 200, dtype=torch.float16), "b.bias": torch.ones(3)}
    save_file(first, str(directory / "model-00001-of-00002.safetensors"))
    save_file(second, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {"a.weight": "model-00001-of-00002.safetensors",
                  "b.weight": "model-00002-of-00002.safetensors",
                  "b.bias": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    seed_repo(REPO, directory)
    hub.clear_log()

    metadata = HfApi(endpoint=hub.url).get_safetensors_metadata(REPO)

    assert metadata.sharded and metadata.weight_map == weight_map
    b_weight = metadata.files_metadata["model-00002-of-00002.safetensors"].tensors["b.weight"]
    assert (b_weight.dtype, b_weight.shape) == ("F16", [300, 200])
    gets = hub.requests_of("resolve", "GET")
    shard_gets = [r for r in gets if r.path.endswith(".safetensors")]
    assert shard_gets and all(r.range == "bytes=0-100000" and r.status == 206
                              for r in shard_gets)
    assert all(r.sent <= 100001 for r in shard_gets)
    size = (directory / "model-00001-of-00002.safetensors").stat().st_size
    assert size > 200_000  # so the 100 kB answer is a strict prefix


def test_range_requests(hub: FakeHub, seed_repo, tmp_path: Path):
    from huggingface_hub.utils import get_session

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "data.bin").write_bytes(bytes(range(256)))
    seed_repo(REPO, tmp_path / "r")
    url = f"{hub.url}/{REPO}/resolve/main/data.bin"
    session = get_session()
    for header, status, expected in (("bytes=10-19", 206, bytes(range(10, 20))),
                                     ("bytes=250-", 206, bytes(range(250, 256))),
                                     ("bytes=-4", 206, bytes(range(252, 256))),
                                     ("bytes=200-999", 206, bytes(range(200, 256)))):
        response = session.get(url, headers={"Range": header})
        assert (response.status_code, response.content) == (status, expected), header
        assert response.headers["Accept-Ranges"] == "bytes"
    response = session.get(url, headers={"Range": "bytes=300-400"})
    assert response.status_code == 416
    head = session.head(url)
    assert head.headers["X-Linked-Size"] == "256" and head.headers["Content-Length"] == "256"
    assert head.headers["X-Repo-Commit"] == hub.head(REPO)
    assert hub.requests_of("resolve")[-1].sent == 0


def test_refusals_map_to_the_client_exceptions(hub: FakeHub, seed_repo, tmp_path: Path,
                                               hub_cache: Path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.txt").write_text("secret")
    seed_repo("alice/private", tmp_path / "p", private=True)
    anonymous = HfApi(endpoint=hub.url, token=False)

    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/missing", "a.txt", endpoint=hub.url, cache_dir=hub_cache,
                        token=False)
    with pytest.raises(RepositoryNotFoundError):  # private: not visible without a token
        anonymous.model_info("alice/private")
    with pytest.raises(RepositoryNotFoundError):  # ... nor to another user
        HfApi(endpoint=hub.url, token=OTHER_TOKEN).model_info("alice/private")
    assert HfApi(endpoint=hub.url, token=READ_TOKEN).model_info("alice/private").private
    path = hf_hub_download("alice/private", "a.txt", endpoint=hub.url, cache_dir=hub_cache,
                           token=READ_TOKEN)
    assert Path(path).read_text() == "secret"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/private", "nope.txt", endpoint=hub.url, cache_dir=hub_cache,
                        token=READ_TOKEN)

    def status_of(call) -> int:
        with pytest.raises(HfHubHTTPError) as error:
            call()
        return error.value.response.status_code

    assert status_of(lambda: HfApi(endpoint=hub.url, token="hf_bogus").whoami()) == 401
    assert status_of(lambda: anonymous.create_repo("alice/new")) == 401
    assert status_of(lambda: HfApi(endpoint=hub.url, token=READ_TOKEN)
                     .create_repo("alice/new")) == 403
    assert status_of(lambda: HfApi(endpoint=hub.url, token=WRITE_TOKEN)
                     .create_repo("someone-else/new")) == 403
    assert status_of(lambda: HfApi(endpoint=hub.url, token=READ_TOKEN).upload_file(
        path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/private")) == 403
    assert status_of(lambda: HfApi(endpoint=hub.url, token=OTHER_TOKEN).upload_file(
        path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="fuse-org/none")) == 404
    assert "alice/new" not in hub.repos
    # an org the user belongs to is writable
    assert HfApi(endpoint=hub.url, token=WRITE_TOKEN).create_repo(
        "fuse-org/new").repo_id == "fuse-org/new"
    whoami = HfApi(endpoint=hub.url, token=READ_TOKEN).whoami()
    assert whoami["name"] == "alice" and whoami["auth"]["accessToken"]["role"] == "read"


def test_gated_repo(hub: FakeHub, seed_repo, tmp_path: Path, hub_cache: Path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.txt").write_text("gated")
    seed_repo("alice/gated", tmp_path / "g")
    hub.repos["alice/gated"].gated = True
    with pytest.raises(GatedRepoError):
        hf_hub_download("alice/gated", "a.txt", endpoint=hub.url, cache_dir=hub_cache,
                        token=OTHER_TOKEN)
    hub.repos["alice/gated"].gated_allowed.add("bob")
    assert Path(hf_hub_download("alice/gated", "a.txt", endpoint=hub.url, cache_dir=hub_cache,
                                token=OTHER_TOKEN)).read_text() == "gated"


def test_fault_injection(hub: FakeHub, tmp_path: Path):
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(REPO)
    before = hub.head(REPO)
    # a transient failure of the upload PUT: the client retries and the commit goes through
    dropped = hub.fail("lfs-upload", status=None)
    api.upload_file(path_or_fileobj=b"w" * 100, path_in_repo="w.safetensors", repo_id=REPO)
    assert dropped.fired == 1
    assert [r.status for r in hub.requests_of("lfs-upload")] == [0, 200]
    assert hub.file_bytes(REPO, "w.safetensors") == b"w" * 100
    # an upload refused for good (a 403, which the client does not retry): nothing committed
    after_first = hub.head(REPO)
    assert after_first != before
    refused = hub.fail("lfs-upload", status=403)
    with pytest.raises(RuntimeError, match="Error while uploading 'v.safetensors'"):
        api.upload_file(path_or_fileobj=b"v" * 100, path_in_repo="v.safetensors", repo_id=REPO)
    assert refused.fired == 1 and hub.head(REPO) == after_first
    assert hub.requests_of("commit")[-1].status == 200  # no commit was attempted
    # the commit itself failing
    hub.fail("commit", status=500)
    with pytest.raises(HfHubHTTPError) as error:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert error.value.response.status_code == 500
    assert hub.head(REPO) == after_first
    with pytest.raises(ValueError, match="unknown endpoint kind"):
        hub.fail("uploads")


def test_child_process_uses_hub_env(hub: FakeHub, hub_env, seed_repo, tmp_path: Path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("child")
    seed_repo(REPO, tmp_path / "c")
    code = ("from huggingface_hub import HfApi, hf_hub_download; "
            "import huggingface_hub.constants as c; "
            "print(HfApi().whoami()['name'], c.HF_HUB_DISABLE_XET, "
            "open(hf_hub_download('alice/tiny', 'a.txt')).read())")
    env = hub_env(token=READ_TOKEN)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alice", "True", "child"]
    assert os.path.isdir(Path(env["HF_HOME"]) / "hub" / "models--alice--tiny")
    assert {r.user for r in hub.requests_of("whoami")} == {"alice"}
