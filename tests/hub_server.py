"""A small Hugging Face Hub-compatible HTTP server, for driving the real huggingface_hub client
in tests without the network.

It speaks the part of the Hub's wire protocol that ``HfApi`` and the download functions use
(checked against huggingface_hub 2.4's source):

- ``GET /api/whoami-v2``: who a token belongs to;
- ``POST /api/repos/create``: a 409 whose body carries the repo's ``url`` when it exists, which
  ``create_repo(exist_ok=True)`` reads;
- ``GET /api/models/{repo}[/revision/{rev}]``: the repo info, ``siblings`` (with sizes, blob
  ids and LFS data under ``?blobs=1``), ``sha``, ``private``, ``gated``;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``GET /api/models/{repo}/refs``,
  ``POST /api/models/{repo}/branch/{name}``;
- ``POST /api/models/{repo}/preupload/{rev}``: ``lfs`` for files matching the repo's
  ``.gitattributes`` LFS rules (``*.safetensors``, ``*.bin``, ...) or of 10 MiB and more, as the
  Hub decides;
- ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer) with presigned-style upload URLs
  (``PUT``, no ``Authorization`` header, as S3's) and a verify URL;
- ``POST /api/models/{repo}/commit/{rev}``: the ndjson ``header`` / ``file`` / ``lfsFile`` /
  ``deletedFile`` / ``deletedFolder`` lines, ``parentCommit``, and ``?create_pr=1``
  (a ``refs/pr/N`` ref, the branch left alone);
- ``GET`` and ``HEAD /{repo}/resolve/{rev}/{path}``: ``ETag`` (the git blob id),
  ``X-Repo-Commit``, ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, ``Content-Length``,
  ``Accept-Ranges``, and ``Range: bytes=a-b`` answered 206 with the slice.

No Xet endpoints: clients must run with ``HF_HUB_DISABLE_XET=1`` (huggingface_hub reads it when
imported; :func:`disable_xet` also sets the already-imported constant). Errors carry the
``X-Error-Code`` headers the client maps to its exception types: ``RepoNotFound`` ->
``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``,
``EntryNotFound`` -> ``RemoteEntryNotFoundError``, ``GatedRepo`` -> ``GatedRepoError``.

Tokens come from a table ``{token: {"name": user, "write": bool, "orgs": [...]}}``: an unknown
token is a 401; a write without a token 401, with a read-only token or into a namespace the user
does not own 403; a private repo is a 401 (no token) or 404 (someone else's) to read.

Every request is logged (:attr:`FakeHub.requests`: method, path, endpoint kind, ``Range``,
bytes received and sent, status), and :meth:`FakeHub.fail` injects faults (a status code or a
dropped connection) on the n-th request of a kind, to test network failures.

    with FakeHub({"tok": {"name": "alice", "write": True}}) as hub:
        HfApi(endpoint=hub.url, token="tok").create_repo("alice/model")
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files this large in LFS whatever the rules
# The .gitattributes a new Hub repo starts with (its LFS patterns, abridged to the weight formats).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5",
        "*.joblib", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*tfevents*",
    )
)
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
PR_REF = re.compile(r"refs/pr/(\d+)")


def disable_xet() -> None:
    """Make this process's huggingface_hub use plain HTTP and LFS, never Xet.

    Sets ``HF_HUB_DISABLE_XET=1`` for huggingface_hub imported later and for child processes,
    and the constant huggingface_hub read at import time if it was imported already.
    """
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_DISABLE_XET = True


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob holding ``content`` (what the Hub reports as ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file git stores for an LFS object."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


class FileBlob:
    """An LFS object served from a local file, read range by range (``len`` and slices only),
    so a sparse 800 GB checkpoint can be served without holding it: see
    :meth:`FakeHub.add_local_repo`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.size = os.path.getsize(self.path)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self.size)
        with open(self.path, "rb") as file:
            file.seek(start)
            return file.read(max(stop - start, 0))


@dataclass(frozen=True)
class RepoFileEntry:
    """One file at one commit. ``content`` for a regular file, ``lfs_sha256`` for LFS."""

    path: str
    size: int
    content: bytes | None = None
    lfs_sha256: str | None = None

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def blob_id(self) -> str:
        """The git blob id: of the content, or of the LFS pointer for an LFS file."""
        if self.lfs_sha256 is not None:
            return git_blob_sha(lfs_pointer(self.lfs_sha256, self.size))
        assert self.content is not None
        return git_blob_sha(self.content)

    def pointer_size(self) -> int:
        assert self.lfs_sha256 is not None
        return len(lfs_pointer(self.lfs_sha256, self.size))


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    description: str
    files: dict[str, RepoFileEntry]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    gated: bool = False
    gated_allowed: set[str] = field(default_factory=set)  # user names let through the gate
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    pull_requests: dict[int, str] = field(default_factory=dict)  # number -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = ""


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it.

    Attributes:
        method: ``GET``, ``HEAD``, ``POST``, ``PUT``.
        path: the URL path, percent-decoded, without the query.
        query: the raw query string.
        endpoint: the kind of request (``resolve``, ``lfs-upload``, ``commit``... see
            :data:`ENDPOINT_KINDS`).
        range: the ``Range`` header, None when not sent.
        received: bytes of request body read.
        sent: bytes of response body written (0 for HEAD).
        status: the response status (0 for a dropped connection).
        user: whose token came with it, None for none.
    """

    method: str
    path: str
    query: str
    endpoint: str
    range: str | None
    received: int
    sent: int
    status: int
    user: str | None


ENDPOINT_KINDS = (
    "whoami", "create-repo", "repo-info", "tree", "refs", "create-branch", "preupload",
    "commit", "lfs-batch", "lfs-upload", "lfs-verify", "resolve", "agent-harnesses",
    "validate-yaml", "unknown",
)


@dataclass
class Fault:
    """Make requests of one kind fail: the ``after``-th one (0-based) and ``times`` - 1 more.

    ``status`` None drops the connection without an answer; otherwise the status is sent with
    ``Retry-After: 0`` (so the client's retries of 5xx answers do not sleep for long).
    """

    endpoint: str
    method: str | None
    status: int | None
    after: int
    times: int
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, endpoint: str) -> bool:
        if endpoint != self.endpoint or (self.method is not None and method != self.method):
            return False
        index = self.seen
        self.seen += 1
        if self.after <= index < self.after + self.times:
            self.fired += 1
            return True
        return False


class HubHTTPError(Exception):
    """An error answer: status, message and the Hub's ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_card_yaml(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    """``POST /api/validate-yaml``: the checks the Hub makes of a model card's metadata that
    fusesurgery's cards exercise (``base_model`` ids, ``base_model_relation``), answered as
    the Hub answers: 200 ``{"errors": [], "warnings": []}`` or 400 with ``errors``."""
    import yaml

    content = str(body.get("content", ""))
    errors: list[dict[str, str]] = []
    match = re.match(r"---\n(.*?)\n---\n", content, re.S)
    try:
        meta = yaml.safe_load(match[1]) if match else {}
    except yaml.YAMLError as error:
        meta, errors = {}, [{"message": f"invalid YAML: {error}"}]
    meta = meta if isinstance(meta, dict) else {}
    bases = meta.get("base_model") or []
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str) or not REPO_ID.fullmatch(base):
            errors.append({"message": f'"base_model" must be Hub model ids, got {base!r}'})
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        errors.append({"message": f'"base_model_relation" must be one of '
                                  f"{list(BASE_MODEL_RELATIONS)}, got {relation!r}"})
    payload = json.dumps({"errors": errors, "warnings": []}).encode()
    return (400 if errors else 200), {"Content-Type": "application/json"}, payload


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class FakeHub:
    """An in-memory Hub on ``127.0.0.1`` (a free port), served from a daemon thread.

    Args:
        tokens: ``{token: {"name": user, "write": bool, "orgs": [org, ...]}}``.

    Attributes:
        url: the endpoint to give the client (``http://127.0.0.1:PORT``).
        requests: every request served, in order (:class:`LoggedRequest`).
        repos: ``{repo_id: Repo}``; tests may inspect them.
        lfs_objects: ``{sha256: bytes}``, every LFS object uploaded.
    """

    def __init__(self, tokens: dict[str, dict[str, Any]]) -> None:
        self.tokens = {token: {"write": False, "orgs": [], **info}
                       for token, info in tokens.items()}
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[LoggedRequest] = []
        self.faults: list[Fault] = []
        self._upload_secrets: dict[str, tuple[str, str, int]] = {}  # secret -> (repo, oid, size)
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubRequestHandler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-hub")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers ----------------------------------------------------------------------

    def fail(self, endpoint: str, *, status: int | None = 500, method: str | None = None,
             after: int = 0, times: int = 1) -> Fault:
        """Make the ``after``-th request (0-based) of kind ``endpoint`` and ``times - 1`` more
        fail with ``status`` (None: the connection is dropped without an answer).

        The client retries 5xx answers and dropped connections on LFS uploads, preupload and
        the LFS batch (5 retries; ``Retry-After: 0`` makes each wait 1 s; a drop waits 1, 2,
        4, 8, 8 s): ``times=6`` fails an upload for good; the commit POST is not retried.

        Returns:
            The :class:`Fault`; its ``fired`` counts the requests it failed.
        """
        if endpoint not in ENDPOINT_KINDS:
            raise ValueError(f"unknown endpoint kind {endpoint!r}; one of {ENDPOINT_KINDS}")
        fault = Fault(endpoint=endpoint, method=method, status=status, after=after, times=times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def requests_of(self, endpoint: str, method: str | None = None) -> list[LoggedRequest]:
        """The logged requests of one kind (and method)."""
        return [r for r in list(self.requests)
                if r.endpoint == endpoint and (method is None or r.method == method)]

    def add_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """Create a repo directly (no request), with the Hub's initial ``.gitattributes``
        commit."""
        with self._lock:
            if repo_id in self.repos:
                raise ValueError(f"{repo_id} exists")
            repo = Repo(repo_id=repo_id, private=private, gated=gated, created_at=_now())
            self.repos[repo_id] = repo
            content = DEFAULT_GITATTRIBUTES.encode()
            entry = RepoFileEntry(".gitattributes", len(content), content=content)
            sha = self._new_commit(repo, None, "initial commit", "", {entry.path: entry})
            repo.branches["main"] = sha
            return repo

    def add_local_repo(self, repo_id: str, directory: str | os.PathLike[str]) -> str:
        """Create ``repo_id`` holding the files of a local directory, without uploading them:
        ``*.safetensors`` files become LFS objects served from disk by range
        (:class:`FileBlob`, a stand-in sha256 instead of hashing them), the rest regular files.
        For benchmarks of header-only reads of checkpoints too big to hold. Returns the commit.
        """
        with self._lock:
            repo = self.add_repo(repo_id)
            files = dict(repo.commits[repo.branches["main"]].files)
            for root, _, names in os.walk(directory):
                for name in sorted(names):
                    path = os.path.join(root, name)
                    relative = os.path.relpath(path, directory).replace(os.sep, "/")
                    if name.endswith(".safetensors"):
                        blob = FileBlob(path)
                        sha = hashlib.sha256(f"{relative}:{blob.size}".encode()).hexdigest()
                        self.lfs_objects[sha] = blob  # type: ignore[assignment]
                        files[relative] = RepoFileEntry(relative, blob.size, lfs_sha256=sha)
                    else:
                        with open(path, "rb") as file:
                            content = file.read()
                        files[relative] = RepoFileEntry(relative, len(content), content=content)
            sha = self._new_commit(repo, repo.branches["main"], "add local files", "", files)
            repo.branches["main"] = sha
            return sha

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """A file's content at a revision, as a download would give it."""
        with self._lock:
            repo = self.repos[repo_id]
            entry = repo.commits[self._resolve_revision(repo, revision)].files[path]
            return self._content(entry)

    def head(self, repo_id: str, revision: str = "main") -> str:
        """The commit sha a branch or ``refs/pr/N`` points at."""
        with self._lock:
            return self._resolve_revision(self.repos[repo_id], revision)

    # -- state -----------------------------------------------------------------------------

    def _new_commit(self, repo: Repo, parent: str | None, title: str, description: str,
                    files: dict[str, RepoFileEntry]) -> str:
        self._counter += 1
        digest = hashlib.sha1(json.dumps(
            [repo.repo_id, parent, title, self._counter, sorted(
                (p, e.blob_id) for p, e in files.items())]).encode()).hexdigest()
        repo.commits[digest] = Commit(digest, parent, title, description, dict(files), _now())
        return digest

    def _resolve_revision(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if (match := PR_REF.fullmatch(revision)) and int(match[1]) in repo.pull_requests:
            return repo.pull_requests[int(match[1])]
        if COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _content(self, entry: RepoFileEntry) -> bytes:
        if entry.lfs_sha256 is not None:
            return self.lfs_objects[entry.lfs_sha256]
        assert entry.content is not None
        return entry.content

    def _user(self, token: str | None) -> dict[str, Any] | None:
        if token is None:
            return None
        info = self.tokens.get(token)
        if info is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header",
                               headers={"X-Error-Message":
                                        "Invalid credentials in Authorization header"})
        return info

    @staticmethod
    def _owns(user: dict[str, Any] | None, namespace: str) -> bool:
        return user is not None and (namespace == user["name"] or namespace in user["orgs"])

    def _readable_repo(self, repo_id: str, user: dict[str, Any] | None) -> Repo:
        repo = self.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        if repo is None or (repo.private and not self._owns(user, namespace)):
            raise HubHTTPError(401 if user is None else 404, "Repository not found",
                               "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str, user: dict[str, Any] | None) -> Repo:
        self._require_write(user)
        repo = self._readable_repo(repo_id, user)
        if not self._owns(user, repo_id.split("/")[0]):
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _require_write(user: dict[str, Any] | None) -> None:
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to do this: pass a token")
        if not user["write"]:
            raise HubHTTPError(403, "This token is read-only: a write token is needed")

    def _check_gate(self, repo: Repo, user: dict[str, Any] | None) -> None:
        if not repo.gated or self._owns(user, repo.repo_id.split("/")[0]):
            return
        if user is None or user["name"] not in repo.gated_allowed:
            raise HubHTTPError(401 if user is None else 403,
                               f"Access to model {repo.repo_id} is restricted; request access",
                               "GatedRepo")

    # -- endpoints -------------------------------------------------------------------------

    def whoami(self, user: dict[str, Any] | None) -> dict[str, Any]:
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header",
                               headers={"X-Error-Message":
                                        "Invalid credentials in Authorization header"})
        role = "write" if user["write"] else "read"
        return {
            "type": "user", "id": hashlib.sha1(user["name"].encode()).hexdigest()[:24],
            "name": user["name"], "fullname": user["name"], "isPro": False,
            "orgs": [{"type": "org", "name": org, "roleInOrg": role} for org in user["orgs"]],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": f"{user['name']}-token", "role": role}},
        }

    def create_repo(self, user: dict[str, Any] | None, body: dict[str, Any]) -> dict[str, Any]:
        self._require_write(user)
        repo_type = body.get("type") or "model"
        if repo_type != "model":
            raise HubHTTPError(400, f"this fake Hub only holds model repos, not {repo_type}")
        name = body.get("name")
        namespace = body.get("organization") or user["name"]  # type: ignore[index]
        if not name or not re.fullmatch(r"[\w.-]+", name):
            raise HubHTTPError(400, f"Invalid repo name {name!r}")
        repo_id = f"{namespace}/{name}"
        private = body.get("private")
        if "visibility" in body:
            private = body["visibility"] == "private"
        if not self._owns(user, namespace):
            raise HubHTTPError(403, f"You don't have the rights to create a model under the "
                                    f"namespace \"{namespace}\"")
        if repo_id in self.repos:
            raise HubHTTPError(409, "You already created this model repo",
                               headers={"_body_url": f"{self.url}/{repo_id}"})
        self.add_repo(repo_id, private=bool(private))
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def repo_info(self, user: dict[str, Any] | None, repo_id: str, revision: str | None,
                  blobs: bool) -> dict[str, Any]:
        repo = self._readable_repo(repo_id, user)
        sha = self._resolve_revision(repo, revision or "main")
        commit = repo.commits[sha]
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.is_lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256,
                                      "pointerSize": entry.pointer_size()}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
            "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": "auto" if repo.gated else False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }

    def tree(self, user: dict[str, Any] | None, repo_id: str, revision: str, path: str,
             recursive: bool) -> list[dict[str, Any]]:
        repo = self._readable_repo(repo_id, user)
        sha = self._resolve_revision(repo, revision)
        files = repo.commits[sha].files
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubHTTPError(404, f"{path} does not exist on {revision}", "EntryNotFound",
                               headers={"X-Repo-Commit": sha})
        entries: dict[str, dict[str, Any]] = {}
        for file_path in sorted(files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                if not recursive and depth > 1:
                    break
                folder = prefix + "/".join(rest[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if not recursive and len(rest) > 1:
                continue
            entry = files[file_path]
            item: dict[str, Any] = {"type": "file", "path": file_path, "size": entry.size,
                                    "oid": entry.blob_id}
            if entry.is_lfs:
                item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size,
                               "pointerSize": entry.pointer_size()}
            entries[file_path] = item
        return [entries[key] for key in sorted(entries)]

    def refs(self, user: dict[str, Any] | None, repo_id: str,
             include_prs: bool) -> dict[str, Any]:
        repo = self._readable_repo(repo_id, user)
        out: dict[str, Any] = {
            "branches": [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                         for name, sha in sorted(repo.branches.items())],
            "converts": [], "tags": [],
        }
        if include_prs:
            out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}",
                                    "targetCommit": sha}
                                   for n, sha in sorted(repo.pull_requests.items())]
        return out

    def create_branch(self, user: dict[str, Any] | None, repo_id: str, branch: str,
                      body: dict[str, Any]) -> dict[str, Any]:
        repo = self._writable_repo(repo_id, user)
        if branch in repo.branches:
            raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._resolve_revision(repo, body.get("startingPoint") or "main")
        repo.branches[branch] = start
        return {}

    def _is_lfs(self, files: dict[str, RepoFileEntry], path: str, size: int) -> bool:
        if size >= LFS_SIZE_THRESHOLD:
            return True
        attributes = files.get(".gitattributes")
        rules = (attributes.content or b"").decode() if attributes is not None else ""
        name = path.rsplit("/", 1)[-1]
        for line in rules.splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                pattern = parts[0]
                if fnmatch.fnmatch(path if "/" in pattern else name, pattern):
                    return True
        return False

    def preupload(self, user: dict[str, Any] | None, repo_id: str, revision: str,
                  body: dict[str, Any]) -> dict[str, Any]:
        repo = self._writable_repo(repo_id, user)
        files = repo.commits[self._resolve_revision(repo, revision)].files
        answers = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            lfs = self._is_lfs(files, path, size)
            existing = files.get(path)
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if existing.is_lfs else existing.blob_id
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
        return {"files": answers, "commitOid": self._resolve_revision(repo, revision)}

    def lfs_batch(self, user: dict[str, Any] | None, repo_id: str,
                  body: dict[str, Any]) -> dict[str, Any]:
        repo = self._writable_repo(repo_id, user)
        if body.get("operation") != "upload":
            raise HubHTTPError(400, "this fake Hub's LFS batch takes uploads only")
        if (ref := body.get("ref")) is not None:
            self._resolve_revision(repo, ref["name"])
        objects = []
        for item in body.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:
                secret = secrets.token_hex(16)
                self._upload_secrets[secret] = (repo_id, oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/__lfs/upload/{secret}", "header": {}},
                    "verify": {"href": f"{self.url}/__lfs/verify/{repo_id}",
                               "header": {}},
                }
            objects.append(answer)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_upload(self, secret: str, data: bytes) -> dict[str, Any]:
        if secret not in self._upload_secrets:
            raise HubHTTPError(403, "SignatureDoesNotMatch: unknown upload URL")
        _, oid, size = self._upload_secrets[secret]
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubHTTPError(400, f"uploaded object does not match oid {oid} / size {size}")
        self.lfs_objects[oid] = data
        del self._upload_secrets[secret]
        return {}

    def lfs_verify(self, user: dict[str, Any] | None, repo_id: str,
                   body: dict[str, Any]) -> dict[str, Any]:
        self._writable_repo(repo_id, user)
        data = self.lfs_objects.get(body.get("oid", ""))
        if data is None or len(data) != body.get("size"):
            raise HubHTTPError(404, f"LFS object {body.get('oid')} was not uploaded")
        return {}

    def commit(self, user: dict[str, Any] | None, repo_id: str, revision: str,
               create_pr: bool, ndjson: bytes) -> dict[str, Any]:
        repo = self._writable_repo(repo_id, user)
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        if create_pr and PR_REF.fullmatch(revision) is None and revision not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if not create_pr and revision not in repo.branches and not PR_REF.fullmatch(revision):
            # commits go to branches (or an open PR); a sha or unknown name is refused
            self._resolve_revision(repo, revision)
            raise HubHTTPError(400, f"Cannot commit to {revision}: not a branch")
        head = self._resolve_revision(repo, revision)
        parent_commit = header.get("parentCommit")
        if parent_commit:
            if create_pr:
                head = self._resolve_revision(repo, parent_commit)
            elif not head.startswith(parent_commit):
                raise HubHTTPError(412, f"A commit has happened since. parentCommit "
                                        f"{parent_commit} is not the head {head}")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubHTTPError(400, f"{path}: unsupported encoding")
                content = base64.b64decode(value["content"])
                files[path] = RepoFileEntry(path, len(content), content=content)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in self.lfs_objects:
                    raise HubHTTPError(422, f"{path}: LFS object {oid} was never uploaded")
                files[path] = RepoFileEntry(path, len(self.lfs_objects[oid]), lfs_sha256=oid)
            elif key == "deletedFile":
                if path not in files:
                    raise HubHTTPError(404, f"{path} does not exist", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for file_path in [p for p in files if p.startswith(prefix)]:
                    del files[file_path]
            else:
                raise HubHTTPError(400, f"unknown commit operation {key!r}")
        sha = self._new_commit(repo, head, header.get("summary", ""),
                               header.get("description", ""), files)
        out: dict[str, Any] = {"success": True, "commitOid": sha,
                               "commitUrl": f"{self.url}/{repo_id}/commit/{sha}"}
        if create_pr:
            number = max([0, *repo.pull_requests]) + 1
            repo.pull_requests[number] = sha
            out["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{number}"
        elif (match := PR_REF.fullmatch(revision)) is not None:
            repo.pull_requests[int(match[1])] = sha
        else:
            repo.branches[revision] = sha
        return out

    def resolve(self, user: dict[str, Any] | None, repo_id: str, revision: str,
                path: str) -> tuple[RepoFileEntry, str, bytes]:
        repo = self._readable_repo(repo_id, user)
        sha = self._resolve_revision(repo, revision)
        self._check_gate(repo, user)
        entry = repo.commits[sha].files.get(path)
        if entry is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound",
                               headers={"X-Repo-Commit": sha})
        return entry, sha, self._content(entry)


class _HubRequestHandler(BaseHTTPRequestHandler):
    server_hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass  # the hub's own log is FakeHub.requests

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    # -- plumbing ------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        raw_segments = split.path.split("/")[1:]
        query = parse_qs(split.query)
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        endpoint, handler = self._route(raw_segments, query, body)
        token = None
        authorization = self.headers.get("Authorization", "")
        if authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        with hub._lock:
            fault = next((f for f in hub.faults if f.matches(self.command, endpoint)), None)
        if fault is not None and fault.status is None:
            self._log(endpoint, split, len(body), 0, 0, token)
            self.close_connection = True
            self.connection.close()  # dropped: no answer at all
            return
        status, headers, payload = 200, {}, b""
        try:
            if fault is not None:
                raise HubHTTPError(fault.status or 500, "injected fault",
                                   headers={"Retry-After": "0"})
            with hub._lock:
                user = hub._user(token)
                status, headers, payload = handler(user)
        except HubHTTPError as error:
            status = error.status
            body_json: dict[str, Any] = {"error": error.message}
            headers = {k: v for k, v in error.headers.items() if not k.startswith("_")}
            if "_body_url" in error.headers:
                body_json["url"] = error.headers["_body_url"]
            if error.code is not None:
                headers["X-Error-Code"] = error.code
                headers.setdefault("X-Error-Message", error.message)
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body_json).encode()
        except Exception as error:  # noqa: BLE001 - a bug in the fake shows as a 500 answer
            status, headers = 500, {"Content-Type": "application/json"}
            payload = json.dumps({"error": f"fake hub bug: {type(error).__name__}: "
                                           f"{error}"}).encode()
        sent = len(payload) if self.command != "HEAD" else 0
        # logged before answering, so a test that looks right after a call sees its requests
        self._log(endpoint, split, len(body), sent, status, token)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if sent:
            self.wfile.write(payload)

    def _log(self, endpoint: str, split: Any, received: int, sent: int, status: int,
             token: str | None) -> None:
        hub = self.server_hub
        user = hub.tokens.get(token or "", {}).get("name")
        with hub._lock:
            hub.requests.append(LoggedRequest(
                method=self.command, path=unquote(split.path), query=split.query,
                endpoint=endpoint, range=self.headers.get("Range"), received=received,
                sent=sent, status=status, user=user))

    def _route(self, seg: list[str], query: dict[str, list[str]],
               body: bytes) -> tuple[str, Callable[[Any], tuple[int, dict[str, str], bytes]]]:
        """``(endpoint kind, handler(user) -> (status, headers, payload))`` for a request."""
        hub = self.server_hub
        method = self.command
        flag = lambda name: query.get(name, [""])[0].lower() in ("1", "true")  # noqa: E731

        def js(make: Callable[[Any], Any]) -> Callable[[Any], tuple[int, dict, bytes]]:
            return lambda user: (200, {"Content-Type": "application/json"},
                                 json.dumps(make(user)).encode())

        def body_json() -> dict[str, Any]:
            try:
                return json.loads(body or b"{}")
            except json.JSONDecodeError as error:
                raise HubHTTPError(400, f"invalid JSON body: {error}") from None

        def unknown(user: Any) -> tuple[int, dict, bytes]:
            raise HubHTTPError(404, f"no such endpoint: {method} {self.path}")

        s = [unquote(part) for part in seg]
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return "whoami", js(hub.whoami)
        if seg[:2] == ["api", "agent-harnesses"]:
            return "agent-harnesses", js(lambda user: {"standardEnvVars": [], "harnesses": {}})
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return "validate-yaml", lambda user: validate_card_yaml(body_json())
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return "create-repo", js(lambda user: hub.create_repo(user, body_json()))
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo_id = f"{s[2]}/{s[3]}"
            rest, raw_rest = s[4:], seg[4:]
            if not rest and method == "GET":
                return "repo-info", js(lambda user: hub.repo_info(user, repo_id, None,
                                                                  flag("blobs")))
            if rest[:1] == ["revision"] and len(rest) >= 2 and method == "GET":
                revision = "/".join(rest[1:])
                return "repo-info", js(lambda user: hub.repo_info(user, repo_id, revision,
                                                                  flag("blobs")))
            if rest[:1] == ["tree"] and len(rest) >= 2 and method == "GET":
                revision, path = rest[1], "/".join(rest[2:])
                return "tree", js(lambda user: hub.tree(user, repo_id, revision, path,
                                                        flag("recursive")))
            if rest == ["refs"] and method == "GET":
                return "refs", js(lambda user: hub.refs(user, repo_id,
                                                        flag("include_prs")))
            if rest[:1] == ["branch"] and len(rest) >= 2 and method == "POST":
                branch = "/".join(rest[1:])
                return "create-branch", js(lambda user: hub.create_branch(
                    user, repo_id, branch, body_json()))
            if rest[:1] == ["preupload"] and len(raw_rest) == 2 and method == "POST":
                revision = rest[1]
                return "preupload", js(lambda user: hub.preupload(user, repo_id, revision,
                                                                  body_json()))
            if rest[:1] == ["commit"] and len(raw_rest) == 2 and method == "POST":
                revision = rest[1]
                return "commit", js(lambda user: hub.commit(user, repo_id, revision,
                                                            flag("create_pr"), body))
        if seg[:2] == ["__lfs", "upload"] and len(seg) == 3 and method == "PUT":
            return "lfs-upload", js(lambda user: hub.lfs_upload(s[2], body))
        if seg[:2] == ["__lfs", "verify"] and len(seg) == 4 and method == "POST":
            repo_id = f"{s[2]}/{s[3]}"
            return "lfs-verify", js(lambda user: hub.lfs_verify(user, repo_id, body_json()))
        if (len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects",
                                                                       "batch"]
                and method == "POST"):
            repo_id = f"{s[0]}/{s[1].removesuffix('.git')}"
            return "lfs-batch", js(lambda user: hub.lfs_batch(user, repo_id, body_json()))
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, revision, path = f"{s[0]}/{s[1]}", s[3], "/".join(s[4:])
            return "resolve", lambda user: self._resolve(user, repo_id, revision, path)
        return "unknown", unknown

    def _resolve(self, user: Any, repo_id: str, revision: str,
                 path: str) -> tuple[int, dict[str, str], bytes]:
        entry, sha, content = self.server_hub.resolve(user, repo_id, revision, path)
        headers = {
            "X-Repo-Commit": sha, "ETag": f'"{entry.blob_id}"', "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if entry.is_lfs:
            headers["X-Linked-Etag"] = f'"{entry.lfs_sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        range_header = self.headers.get("Range")
        if range_header is None:
            headers["Content-Length"] = str(len(content))
            return 200, headers, content if isinstance(content, bytes) else content[:]
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
        size = len(content)
        if match is None or (not match[1] and not match[2]):
            raise HubHTTPError(416, f"unsupported Range {range_header!r}",
                               headers={"Content-Range": f"bytes */{size}"})
        if match[1]:
            start = int(match[1])
            end = min(int(match[2]), size - 1) if match[2] else size - 1
        else:  # a suffix: the last N bytes
            start, end = max(size - int(match[2]), 0), size - 1
        if start >= size or start > end:
            raise HubHTTPError(416, f"Range {range_header!r} not satisfiable (size {size})",
                               headers={"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        return 206, headers, content[start:end + 1]
