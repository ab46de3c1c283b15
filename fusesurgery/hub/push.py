"""``push``: validate a fused checkpoint, write its model card, and upload it in one commit.

Order of events, so that nothing leaves the machine unless it is sound and nothing is left
half-done on the Hub:

1. the token is resolved (``--token``, ``HF_TOKEN``, the saved login): a missing one fails
   before any work;
2. the directory is checked: ``fusion_config.json`` present, no stray weights beside the
   index, every file the writer recorded still there, then ``validate`` (keys, shapes and
   dtypes against the rebuilt module, and by default the forward checks); a failure refuses
   the push;
3. the plan (files, sizes, card) is pure data; ``--dry-run`` stops here, without network;
4. the repo is created if needed, large files are uploaded, then one commit adds everything.
   Uploaded large files only become visible with the commit, so a failure at any point leaves
   the repo as it was; the error says which files reached the Hub's storage (a retry skips
   them) and which did not.
"""

from __future__ import annotations

import fnmatch
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusesurgery._plural import plural
from fusesurgery._sizes import format_bytes
from fusesurgery.errors import CheckpointError, ConfigError, HubError, ValidationError
from fusesurgery.io.checkpoint import SAFETENSORS_SUFFIX, TORCH_SUFFIXES
from fusesurgery.io.hub_client import (
    describe,
    http_status,
    hub_api,
    hub_endpoint,
    hub_offline,
    hub_token,
    is_network_error,
)
from fusesurgery.io.shard_index import INDEX_SUFFIX

CARD_FILE = "README.md"
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
DEFAULT_COMMIT_MESSAGE = "Upload fused checkpoint with fusesurgery"
NO_TOKEN = ("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth "
            "login` (a token with write access, from https://huggingface.co/settings/tokens)")


@dataclass(frozen=True)
class PushFile:
    """One file of the upload: its path in the repo, where it is read from, its size."""

    path_in_repo: str
    local_path: str | None
    size: int


@dataclass(frozen=True)
class PushPlan:
    """Everything a push will do, built before any network access.

    Args:
        out: the fused checkpoint directory.
        repo_id: ``namespace/name`` (or a bare name: the token's own namespace).
        revision: the branch committed to (None: the default branch).
        private: create the repo private (an existing repo keeps its visibility).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit's title.
        files: the files uploaded, the card last.
        card: the model card's text (``README.md``).
        base_models: the Hub ids listed as ``base_model``.
        validation: the validate report (``ValidationReport.to_dict()``).
    """

    out: str
    repo_id: str
    revision: str | None
    private: bool
    create_pr: bool
    commit_message: str
    files: tuple[PushFile, ...]
    card: str
    base_models: tuple[str, ...]
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out, "repo_id": self.repo_id, "revision": self.revision,
            "private": self.private, "create_pr": self.create_pr,
            "commit_message": self.commit_message, "base_model": list(self.base_models),
            "files": [{"path": f.path_in_repo, "size": f.size} for f in self.files],
            "total_bytes": self.total_bytes, "card": self.card, "validation": self.validation,
        }


@dataclass(frozen=True)
class PushResult:
    """What a push did: ``committed`` is False for a dry run and when the repo already held
    exactly these files (``commit`` is then its head); ``commit`` is None for a dry run;
    ``deleted``: files of an earlier checkpoint in the repo, deleted by the commit."""

    plan: PushPlan
    dry_run: bool
    endpoint: str | None = None
    repo_url: str | None = None
    created_repo: bool = False
    commit: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    committed: bool = False
    deleted: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "dry_run": self.dry_run, "endpoint": self.endpoint,
                "repo_url": self.repo_url, "created_repo": self.created_repo,
                "committed": self.committed, "deleted": list(self.deleted),
                "commit": self.commit,
                "commit_url": self.commit_url, "pr_url": self.pr_url}


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"{repo_id!r} is not a Hub repo id (namespace/name): "
                          f"{str(error).splitlines()[0]}") from None


def collect_files(out: Path) -> list[PushFile]:
    """The files of ``out`` to upload: every regular file but hidden ones (the writer's marker
    among them) and ``README.md``, which the model card replaces; sorted by path.

    Raises:
        CheckpointError: ``out`` holds weights the index does not name, a file whose name is
            not UTF-8, or misses a file its writer recorded.
    """
    import json

    from fusesurgery.io._files import utf8_path
    from fusesurgery.io.shard_index import read_shard_index
    from fusesurgery.write.output_guard import MARKER_FILE

    files: list[PushFile] = []
    seen_dirs: set[str] = set()
    # links are followed (a snapshot from the Hub cache is all links into its blobs), a
    # directory reached twice (a link cycle) only once
    for root, dirs, names in os.walk(out, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            relative = path.relative_to(out).as_posix()
            if name.startswith(".") or relative == CARD_FILE or not path.is_file():
                continue
            # a Hub path is text: a name that is not UTF-8 could be neither sent nor listed
            relative = utf8_path(relative, f"{out}: file name")
            files.append(PushFile(relative, str(path), path.stat().st_size))
    indexes = [f for f in files if "/" not in f.path_in_repo
               and f.path_in_repo.endswith(INDEX_SUFFIX)]
    named: set[str] = set()
    for index in indexes:
        named |= set(read_shard_index(index.local_path).shard_names)
    top_weights = {f.path_in_repo for f in files if "/" not in f.path_in_repo
                   and f.path_in_repo.endswith(WEIGHT_SUFFIXES)}
    stray = sorted(top_weights - named) if indexes else []
    if stray:
        raise CheckpointError(
            f"{out}: {stray[0]} is not named by the index ({plural(len(stray), 'weight file')} "
            "beside the checkpoint that it does not use); remove it or push a clean directory")
    marker = out / MARKER_FILE
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text()).get("files", [])
        except (ValueError, AttributeError, OSError):
            recorded = []
        recorded = recorded if isinstance(recorded, list) else []
        missing = sorted(name for name in recorded if isinstance(name, str)
                         and not (out / name).is_file())
        if missing:
            raise CheckpointError(f"{out}: {missing[0]} is missing ({plural(len(missing), 'file')} "
                                  "its writer recorded are gone); the directory is incomplete")
    return files


# Files of a checkpoint: those of an earlier one left in the repo beside the new one would make
# it a mix (an old model.safetensors beside a new index), so the push deletes them; anything
# else in the repo (a LICENSE, images, notes) is kept.
CHECKPOINT_FILE_PATTERNS = (
    *(f"*{suffix}" for suffix in WEIGHT_SUFFIXES), "*.json", "*.model", "*.tiktoken",
    "merges.txt", "vocab.txt", "source/*",
)


def stale_files(remote: Sequence[str], pushed: set[str]) -> list[str]:
    """The files of the repo a push deletes: checkpoint files (by
    :data:`CHECKPOINT_FILE_PATTERNS`) that the pushed directory does not hold."""
    return sorted(path for path in remote if path not in pushed and path != ".gitattributes"
                  and any(fnmatch.fnmatch(path, pattern)
                          for pattern in CHECKPOINT_FILE_PATTERNS))


def _hub_ids(config: Any) -> dict[str, str]:
    ids = {}
    for part, record in config.sources.items():
        hub = record.get("hub") if isinstance(record, dict) else None
        if isinstance(hub, dict) and isinstance(hub.get("repo_id"), str):
            ids[part] = hub["repo_id"]
    return ids


def _validated_with(report: Any, quick: bool) -> str:
    from fusesurgery._version import __version__

    what = "header-level checks only (--quick)" if quick else f"device {report.device}"
    return f"`fusesurgery validate` {__version__} ({what}, Python {platform.python_version()})"


def plan_push(
    out: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
    base_models: Sequence[str] = (),
    license: str | None = None,
    quick: bool = False,
    device: str = "cpu",
    on_stage: Callable[[str], None] | None = None,
) -> PushPlan:
    """Check ``out`` and build the push: files, sizes and model card. No network.

    Args:
        out: a fused checkpoint directory written by ``fuse`` or ``save_fused``.
        repo_id: the target repo.
        revision: the branch to commit to.
        private: create the repo private.
        create_pr: open a pull request.
        commit_message: the commit title (default: :data:`DEFAULT_COMMIT_MESSAGE`).
        base_models: Hub ids for the card's ``base_model``, decoder first; by default the
            sources' own Hub ids, recorded by ``fuse`` when they came from the Hub.
        license: a license id for the card's metadata.
        quick: run only the header-level checks, not the forward passes.
        device: where the forward checks run.
        on_stage: called with a short message as each stage starts.

    Returns:
        The plan.

    Raises:
        ConfigError: a bad repo id or option.
        CheckpointError: ``out`` is not a complete fused checkpoint directory.
        ValidationError: ``out`` fails validation.
    """
    from fusesurgery.hub.card import build_model_card
    from fusesurgery.io.checkpoint import FUSION_CONFIG_FILE
    from fusesurgery.surgery.fused import read_fused_config
    from fusesurgery.validate import validate_fused, validate_layout

    stage = on_stage or (lambda message: None)
    _check_repo_id(repo_id)
    for base in base_models:  # every option before any long work
        _check_repo_id(base)
    if not quick:  # a bad --device fails before any work
        from fusesurgery.validate.checks import check_device

        check_device(device)
    license = license.strip() if license and license.strip() else None
    directory = Path(out)
    if not directory.is_dir():
        raise CheckpointError(f"{out}: not a directory; push uploads a fused checkpoint "
                              "directory written by `fusesurgery fuse`")
    from fusesurgery.hf import is_export_directory

    export = is_export_directory(directory)
    if not export and not (directory / FUSION_CONFIG_FILE).is_file():
        from fusesurgery.write.side_files import read_json_side_file

        # a damaged export's config.json: say so, not that it is no fused checkpoint
        read_json_side_file(directory / "config.json")
        raise CheckpointError(f"{out}: no {FUSION_CONFIG_FILE}; push uploads fused checkpoints "
                              "written by `fusesurgery fuse` or fusesurgery.save_fused")
    files = collect_files(directory)
    if export:
        return _plan_export_push(directory, files, repo_id, revision=revision,
                                 private=private, create_pr=create_pr,
                                 commit_message=commit_message, base_models=base_models,
                                 license=license, quick=quick, device=device, stage=stage)
    config = read_fused_config(directory)
    from fusesurgery.reports.inspection import inspect_checkpoint

    fusion = inspect_checkpoint(directory).fusion  # the gates as the weights hold them
    if fusion is not None and fusion.gates:
        config = config.replace(gates=dict(fusion.gates))
    stage(f"validating {out}" + (" (header-level checks)" if quick else ""))
    report = validate_layout(directory)  # header-level first: a broken layout stops here
    if report.ok and not quick:
        report = validate_fused(directory, device=device)
    if report.ok:
        passed = sum(c.status == "pass" for c in report.checks)
        stage(f"validated: {plural(passed, 'check')} passed")
    else:
        failed = next(c for c in report.checks if c.status == "fail")
        raise ValidationError(
            f"{out} fails validation, so it is not pushed: {failed.name}: {failed.figure}"
            + (f" ({failed.detail})" if failed.detail else "") + f"; see `fusesurgery "
            f"validate {out}`")
    hub_ids = _hub_ids(config)
    chosen = tuple(base_models) or tuple(hub_ids[p] for p in ("decoder", "encoder")
                                         if p in hub_ids)
    for base in chosen:
        _check_repo_id(base)
    hub_ids.update(zip(("decoder", "encoder"), base_models, strict=False))  # decoder first
    card = build_model_card(
        config, repo_id=repo_id, base_models=chosen, hub_ids=hub_ids,
        checks=report.checks,
        files=[(f.path_in_repo, f.size) for f in files],
        validated_with=_validated_with(report, quick), forward_checked=not quick,
        endpoint=hub_endpoint(), license=license)
    text = str(card)
    files.append(PushFile(CARD_FILE, None, len(text.encode())))
    return PushPlan(
        out=str(out), repo_id=repo_id, revision=revision, private=private,
        create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        files=tuple(files), card=text, base_models=chosen, validation=report.to_dict())


def _plan_export_push(directory: Path, files: list[PushFile], repo_id: str, *,
                      revision: str | None, private: bool, create_pr: bool,
                      commit_message: str | None, base_models: Sequence[str],
                      license: str | None, quick: bool, device: str,
                      stage: Callable[[str], None]) -> PushPlan:
    """``plan_push`` of a transformers export: validated through transformers' classes (the
    keys and shapes alone with ``quick``), its card from its config.json."""
    from fusesurgery.hf.validate_export import check_export_layout, validate_export
    from fusesurgery.hub.card import build_export_card
    from fusesurgery.io import open_checkpoint
    from fusesurgery.validate.checks import ValidationReport

    stage(f"validating {directory}" + (" (header-level checks)" if quick else ""))
    if quick:
        report = ValidationReport(path=str(directory))
        check_export_layout(report, str(directory))
    else:
        report = validate_export(directory, device=device)
    if not report.ok:
        failed = next(c for c in report.checks if c.status == "fail")
        raise ValidationError(f"{directory} fails validation, so it is not pushed: "
                              f"{failed.name}: {failed.figure}; see `fusesurgery validate "
                              f"{directory}`")
    stage(f"validated: {plural(sum(c.status == 'pass' for c in report.checks), 'check')} "
          "passed")
    with open_checkpoint(directory) as source:
        document = source.config
    record = document.get("fusesurgery_fuse") or document.get("fusesurgery_fusion_config") or {}
    hub_ids = {part: r["hub"]["repo_id"] for part, r in (record.get("sources") or {}).items()
               if isinstance(r, dict) and isinstance(r.get("hub"), dict)
               and isinstance(r["hub"].get("repo_id"), str)}
    chosen = tuple(base_models) or tuple(hub_ids[p] for p in ("decoder", "encoder")
                                         if p in hub_ids)
    for base in chosen:
        _check_repo_id(base)
    card = build_export_card(document, repo_id=repo_id, base_models=chosen,
                             checks=report.checks,
                             files=[(f.path_in_repo, f.size) for f in files],
                             validated_with=_validated_with(report, quick), license=license)
    text = str(card)
    files.append(PushFile(CARD_FILE, None, len(text.encode())))
    return PushPlan(
        out=str(directory), repo_id=repo_id, revision=revision, private=private,
        create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        files=tuple(files), card=text, base_models=chosen, validation=report.to_dict())


def _refusal(error: BaseException, repo_id: str, user: str | None, doing: str) -> str | None:
    """A message for a refusal (401/403/404) while ``doing``; None if it is not one."""
    status = http_status(error)
    who = f"the token of {user}" if user else "the token"
    reason = describe(error)
    if type(error).__name__ == "RevisionNotFoundError":
        return (f"{repo_id} has no revision to commit to ({reason}): --revision names a branch "
                "(created from main if missing) or refs/pr/N of an open pull request")
    if status == 401:
        return (f"the Hub refused {who} ({reason}): it is invalid or expired; pass --token or "
                "log in again with `hf auth login`")
    if status == 403:
        return (f"no write permission on {repo_id}: {who} may not {doing} ({reason}); use a "
                "token with write access to that namespace")
    if status == 404:
        return (f"{repo_id} does not exist and could not be created ({reason}); check the "
                "namespace, or create the repo on the Hub first")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return (f"the Hub refused to {doing} ({reason}); nothing was committed and the repo "
                "is unchanged")
    return None


def _not_uploaded_message(repo_id: str, operations: Sequence[Any], error: BaseException,
                          committing: bool) -> str:
    """What reached the Hub before ``error``. Large files go to its storage one by one before
    the commit (each is marked once it is there); small files travel inside the commit."""
    sent = [op for op in operations if getattr(op, "_is_uploaded", False)]
    size = format_bytes(sum(op.upload_info.size for op in sent))
    if committing:
        return (f"network failure while committing to {repo_id} ({describe(error)}): nothing "
                f"was committed and the repo is unchanged; all {plural(len(sent), 'large file')} "
                f"({size}) had reached the Hub's storage and are not sent again when you run "
                "the same command again")
    unsent = [op.path_in_repo for op in sorted(  # the large files first
        (op for op in operations if op not in sent),
        key=lambda op: getattr(op, "_upload_mode", None) != "lfs")]
    names = ", ".join(unsent[:3]) + (f" and {len(unsent) - 3} more" if len(unsent) > 3 else "")
    return (f"network failure while uploading to {repo_id} ({describe(error)}): nothing was "
            f"committed and the repo is unchanged; {plural(len(sent), 'large file')} ({size}) "
            "reached the Hub's storage and are skipped when you run the same command again; not "
            f"uploaded: {names}")


def _upload_large_files(api: Any, repo_id: str, operations: Sequence[Any], plan: PushPlan,
                        workers: int = 4) -> None:
    """Send the large files to the Hub's storage before the commit, one request per file
    (biggest first, ``workers`` at a time), so that each is marked uploaded as soon as it is
    there; on the first failure no further file starts and the error is raised.

    The workers are daemon threads, joined in short waits: Ctrl-C or SIGTERM reaches this
    thread at once and the process exits without waiting for uploads in flight (they only
    reach the Hub's storage; nothing is committed)."""
    import threading

    pending = sorted(operations, key=lambda op: op.upload_info.size)  # popped: biggest first
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if errors or not pending:
                    return
                op = pending.pop()
            try:
                api.preupload_lfs_files(repo_id, additions=[op], revision=plan.revision,
                                        create_pr=plan.create_pr or None, num_threads=1,
                                        free_memory=False)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                with lock:
                    errors.append(error)
                return

    threads = [threading.Thread(target=work, daemon=True, name=f"fusesurgery-push-{i}")
               for i in range(min(workers, len(pending)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.25)
    if errors:
        raise errors[0]


def _failure(error: BaseException, repo_id: str, user: str | None, doing: str) -> HubError:
    """The one-line error for a client or network ``error`` while ``doing``."""
    error = _hub_cause(error) or error
    message = _refusal(error, repo_id, user, doing)
    if message is None:
        message = (f"could not reach the Hub at {hub_endpoint()} to {doing} "
                   f"({describe(error)}); nothing was uploaded")
    return HubError(message)


def whoami(api: Any, repo_id: str) -> str:
    """The user name the token belongs to (one request; checks the token).

    Raises:
        HubError: the token is refused, or the Hub cannot be reached.
    """
    try:
        return api.whoami()["name"]
    except Exception as error:  # noqa: BLE001 - narrowed by _is_hub_error
        if not _is_hub_error(error):
            raise
        raise _failure(error, repo_id, None, "check the token") from error


def push_plan(plan: PushPlan, *, token: str | None = None, user: str | None = None,
              on_stage: Callable[[str], None] | None = None) -> PushResult:
    """Carry out a :class:`PushPlan`: create the repo if needed, upload, commit once.

    Args:
        plan: from :func:`plan_push`.
        token: a Hub token; None uses ``HF_TOKEN`` or the saved login.
        user: whom the token belongs to, if already asked (saves a request).
        on_stage: called with a short message as each stage starts.

    Returns:
        What was done: the commit, its URL, the pull request's URL.

    Raises:
        HubError: no token, a refused token, no write permission, a repo that is missing and
            cannot be created, or a network failure (saying what was uploaded).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    stage = on_stage or (lambda message: None)
    token = hub_token(token)
    if not token:
        raise HubError(NO_TOKEN)
    api = hub_api(token)
    endpoint = hub_endpoint()
    repo_id = plan.repo_id

    user = user or whoami(api, repo_id)
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    created = False
    try:
        try:
            api.repo_info(repo_id)
        except HfHubHTTPError as error:
            if http_status(error) != 404:
                raise
            stage(f"creating {repo_id}" + (" (private)" if plan.private else ""))
            api.create_repo(repo_id, private=plan.private or None, exist_ok=True)
            created = True
        if plan.revision and not plan.create_pr and not plan.revision.startswith("refs/"):
            api.create_branch(repo_id, branch=plan.revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=plan.revision).sha  # to tell a no-op commit
        remote = [] if created else api.list_repo_files(repo_id, revision=plan.revision)
    except Exception as error:  # noqa: BLE001 - narrowed by _is_hub_error
        if not _is_hub_error(error):
            raise
        doing = f"write to {repo_id}" if created else f"create {repo_id}"
        raise _failure(error, repo_id, user, doing) from error
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=f.path_in_repo,
                           path_or_fileobj=f.local_path if f.local_path else plan.card.encode())
        for f in plan.files]
    stale = stale_files(remote, {f.path_in_repo for f in plan.files})
    if stale:
        stage(f"replacing the checkpoint already in {repo_id}: {plural(len(stale), 'file')} "
              f"({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}) are deleted in the "
              "same commit")
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    where = f"{repo_id}" + (f"@{plan.revision}" if plan.revision else "")
    committing = False
    stage(f"uploading {plural(len(plan.files), 'file')} ({format_bytes(plan.total_bytes)}) to "
          f"{where} in one commit" + (" as a pull request" if plan.create_pr else ""))
    try:
        validate_card = getattr(api, "_validate_yaml", None)  # the client's own early check
        if validate_card is not None:
            validate_card(plan.card, repo_type="model")
        _upload_large_files(api, repo_id, [op for op in operations if isinstance(
            op, CommitOperationAdd) and op.path_in_repo != CARD_FILE], plan)
        committing = True
        info = api.create_commit(repo_id, operations=operations,
                                 commit_message=plan.commit_message, revision=plan.revision,
                                 create_pr=plan.create_pr or None)
    except Exception as failure:  # noqa: BLE001 - narrowed below
        if type(failure) is ValueError and str(failure).startswith("Invalid metadata"):
            details = " ".join(str(failure).split()).removeprefix("Invalid metadata in README.md.")
            raise HubError(f"the Hub refused the model card's metadata:{details}; nothing was "
                           "uploaded (check --base-model and --license)") from failure
        error = _hub_cause(failure)
        if error is None:
            raise
        message = _refusal(error, repo_id, user, f"write to {repo_id}")
        if message is None:
            message = _not_uploaded_message(repo_id, operations, error, committing)
        raise HubError(message) from failure
    unchanged = info.oid == head and not info.pr_url  # the client skipped an empty commit
    if unchanged and plan.create_pr:
        raise HubError(f"no pull request opened: {where} already holds exactly these files "
                       f"(commit {head[:10]}); there is nothing to propose")
    return PushResult(plan=plan, dry_run=False, endpoint=endpoint,
                      repo_url=f"{endpoint}/{repo_id}", created_repo=created,
                      commit=info.oid, commit_url=info.commit_url, pr_url=info.pr_url,
                      committed=not unchanged, deleted=tuple(stale))


def _hub_cause(error: BaseException) -> BaseException | None:
    """The client or network error behind ``error``: itself, or one it wraps (the client
    raises ``RuntimeError("Error while uploading ...")`` from the HTTP error)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (HfHubHTTPError, OfflineModeIsEnabled)) or \
                is_network_error(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def _is_hub_error(error: BaseException) -> bool:
    return _hub_cause(error) is not None


def push_fused(
    out: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    dry_run: bool = False,
    on_stage: Callable[[str], None] | None = None,
    **options: Any,
) -> PushResult:
    """Validate a fused checkpoint and push it to the Hub in one commit with a model card.

    Args:
        out: a fused checkpoint directory.
        repo_id: the target repo (``namespace/name``).
        token: a Hub token (default: ``HF_TOKEN``, then the saved login).
        dry_run: build and return the plan, without network.
        on_stage: called with a short message as each stage starts.
        **options: :func:`plan_push`'s options (revision, private, create_pr,
            commit_message, base_models, license, quick, device).

    Returns:
        What was (or, for a dry run, would be) done.

    Raises:
        HubError: as :func:`push_plan`; a missing or refused token is reported before the
            checks run.
        FuseSurgeryError: as :func:`plan_push`.
    """
    user = None
    if not dry_run and hub_offline():
        raise HubError("HF_HUB_OFFLINE is set and push needs the network: unset it, or look "
                       "at what would be pushed with --dry-run")
    if not dry_run:  # the token is checked (and a bare name placed) before the long checks
        token = hub_token(token)
        if not token:
            raise HubError(NO_TOKEN)
        _check_repo_id(repo_id)
        user = whoami(hub_api(token), repo_id)
        repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    plan = plan_push(out, repo_id, on_stage=on_stage, **options)
    if dry_run:
        return PushResult(plan=plan, dry_run=True)
    return push_plan(plan, token=token, user=user, on_stage=on_stage)
