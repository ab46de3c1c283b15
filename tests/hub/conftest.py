"""Fixtures for tests that drive the real huggingface_hub client against the local fake Hub
(tests/hub_server.py): the running server, a seeding helper that uploads through the client,
and the environment a child process needs to use it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hub_server import FakeHub, disable_xet

WRITE_TOKEN = "hf_write_alice"  # alice, who also writes to the org "fuse-org"
READ_TOKEN = "hf_read_alice"
OTHER_TOKEN = "hf_write_bob"  # a different user, with his own namespace only
TOKENS = {
    WRITE_TOKEN: {"name": "alice", "write": True, "orgs": ["fuse-org"]},
    READ_TOKEN: {"name": "alice", "write": False, "orgs": ["fuse-org"]},
    OTHER_TOKEN: {"name": "bob", "write": True, "orgs": []},
}

disable_xet()  # before any test here imports huggingface_hub's upload path


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[FakeHub]:
    """A running fake Hub with :data:`TOKENS`; this process's Hub settings cleared, so no
    test reads a real token, endpoint or offline flag (``HF_HOME`` is a fresh directory)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_ENDPOINT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    with FakeHub(TOKENS) as server:
        yield server


@pytest.fixture
def hub_cache(tmp_path: Path) -> Path:
    """A fresh huggingface_hub cache directory (pass as ``cache_dir=``)."""
    return tmp_path / "hf_cache"


@pytest.fixture
def seed_repo(hub: FakeHub) -> Callable[..., str]:
    """``seed_repo(repo_id, folder, private=False, token=WRITE_TOKEN, revision=None)``:
    create the repo and upload a local directory to it with the real client
    (``create_repo`` + ``upload_folder``), so seeding exercises the upload path; returns the
    commit sha."""
    from huggingface_hub import HfApi

    def seed(repo_id: str, folder: str | os.PathLike[str], *, private: bool = False,
             token: str = WRITE_TOKEN, revision: str | None = None,
             commit_message: str = "seed") -> str:
        api = HfApi(endpoint=hub.url, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message)
        return info.oid

    return seed


@pytest.fixture
def hub_env(hub: FakeHub, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """``hub_env(token=WRITE_TOKEN, **extra)``: the environment for a child process (a CLI
    run) that talks to ``hub``: ``HF_ENDPOINT``, ``HF_TOKEN`` (omitted for ``token=None``), a
    private ``HF_HOME``, ``HF_HUB_DISABLE_XET=1``, no telemetry; ``extra`` overrides."""

    def env(token: str | None = WRITE_TOKEN, **extra: str) -> dict[str, str]:
        out = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
        out.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "child_hf_home"),
                   HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_UPDATE_CHECK="1", NO_COLOR="1")
        if token is not None:
            out["HF_TOKEN"] = token
        out.update(extra)
        return out

    return env
