"""Hugging Face Hub repo ids as checkpoint sources: ``org/name``, ``org/name@revision``,
``hf://org/name[@revision]`` and ``hf://models/org/name[@revision]`` (the ``hf`` CLI's URIs).

:func:`fusesurgery.io.open_checkpoint` comes here for a path that does not exist locally (a
local path always wins over a repo id of the same name). Two ways to open a repo:

- downloaded (:func:`download_checkpoint`): only the files a checkpoint needs (the weights,
  safetensors preferred as transformers does, their index, config, generation config,
  tokenizer and processor files; never ONNX, GGUF, Flax or TF weights, nor pickles beside
  safetensors) through huggingface_hub's cache, then opened like any local directory;
- remote headers (:func:`open_remote_checkpoint`, for ``inspect`` and key-level ``diff``): a
  safetensors repo's headers are read with two range requests a file (the 8-byte length, then
  the header), so a 400B-parameter repo is described without downloading it; a data file is
  downloaded into the cache the first time one of its tensors is read.

Settings are read when called, not when huggingface_hub was imported: ``HF_ENDPOINT``,
``HF_TOKEN`` (else the saved login), ``HF_HUB_OFFLINE`` (cache only), ``HF_HUB_CACHE`` /
``HF_HOME``; every request times out (:func:`fusesurgery.io.hub_client.hub_timeouts`). Client
and network errors become one-line :class:`~fusesurgery.errors.HubError`, never showing the
token. huggingface_hub is imported inside functions only, so start-up does not pay for it.
"""

from __future__ import annotations

import glob
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fusesurgery.errors import HubError
from fusesurgery.io.checkpoint import (
    FORMAT_SAFETENSORS,
    FORMAT_SAFETENSORS_SHARDED,
    HF_CONFIG_FILE,
    META_SHARD_PATTERN,
    NOT_WEIGHTS_PATTERN,
    SAFETENSORS_SUFFIX,
    TOKENIZER_FILES,
    TORCH_SUFFIXES,
    CheckpointSource,
    _read_config,
    _SafetensorsReader,
    open_local_checkpoint,
)
from fusesurgery.io.hub_client import (
    TIMEOUT_ENV,
    describe,
    hub_endpoint,
    hub_offline,
    hub_session,
    hub_token,
    is_network_error,
    redact,
    timeout_seconds,
)
from fusesurgery.io.safetensors_header import (
    HEADER_LENGTH_BYTES,
    SafetensorsHeader,
    check_header_length,
    parse_safetensors_header,
)
from fusesurgery.io.shard_index import INDEX_SUFFIX, read_shard_index

if TYPE_CHECKING:
    from fusesurgery.io.tensor_info import FileRegion

HF_PREFIX = "hf://"
MODELS_PREFIX = "models/"
# What the Hub accepts as a namespace or repo name (ASCII letters, digits, '-', '_', '.'; no
# leading or trailing '-'/'.', no '--' or '..'; at most 96 characters). huggingface_hub's own
# check (validate_repo_id) has the last word: see _hub_accepts.
_NAME = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
REPO_ID_PATTERN = re.compile(rf"({_NAME})/({_NAME})", re.ASCII)
# A name ending like a checkpoint file is a local path that is missing, not a repo.
FILE_LIKE_SUFFIXES = (SAFETENSORS_SUFFIX, INDEX_SUFFIX, ".json", *TORCH_SUFFIXES)

# Files beside the weights that a checkpoint's readers and writers use.
SIDE_FILES: tuple[str, ...] = (
    HF_CONFIG_FILE, "generation_config.json", "params.json", "fusion_config.json",
    *TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "video_preprocessor_config.json",
    # a transformers export's code files (never run here: their presence is checked, as
    # transformers' trust_remote_code needs them)
    "configuration_fusesurgery_fused.py", "modeling_fusesurgery_fused.py",
    "processing_fusesurgery_fused.py",
)
# fusesurgery's own outputs keep each input's config and tokenizer under source/<part>/.
FUSED_SOURCE_DIR = "source"
HEADER_FETCH_THREADS = 8


@dataclass(frozen=True)
class HubReference:
    """A model repo on the Hub, as the user named it.

    Attributes:
        repo_id: ``namespace/name``.
        revision: a branch, tag, commit or ``refs/pr/N``; None for the default branch.
        given: the text as given (``hf://org/name@v1``).
    """

    repo_id: str
    revision: str | None
    given: str

    @property
    def display(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class HubSnapshot:
    """Where a :class:`HubReference` led: the commit, and its directory in the local cache.

    Attributes:
        reference: what was asked for.
        commit: the 40-hex commit the revision resolved to.
        directory: the snapshot directory in huggingface_hub's cache.
        headers_only: the weights were not downloaded (read from remote headers); reading
            tensor data downloads them.
    """

    reference: HubReference
    commit: str
    directory: Path
    headers_only: bool = False

    def record(self) -> dict[str, Any]:
        """``{"repo_id", "revision", "commit"}``, as ``fusion_config.json`` records a source."""
        return {"repo_id": self.reference.repo_id,
                "revision": self.reference.revision or "main", "commit": self.commit}


@dataclass(frozen=True)
class FileSelection:
    """The files of a repo a checkpoint needs (:func:`select_checkpoint_files`).

    Attributes:
        weights: the weight files to fetch (for an index: the index; its shards are added
            once it is read).
        side_files: config, tokenizer, processor and ``source/`` files present.
        index: the shard index among ``weights``, None when not sharded.
        safetensors: the weights are safetensors.
    """

    weights: tuple[str, ...]
    side_files: tuple[str, ...]
    index: str | None
    safetensors: bool

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.side_files, *self.weights)


def parse_hub_reference(text: str) -> HubReference | None:
    """``text`` as a Hub model repo, or None when it does not name one.

    Forms: ``org/name``, ``org/name@revision``, ``hf://org/name[@revision]``,
    ``hf://models/org/name[@revision]``. A name ending like a checkpoint file
    (``org/model.safetensors``) is a path, not a repo.

    Raises:
        HubError: an ``hf://`` URI that is malformed, names a dataset, Space or bucket, or a
            path inside the repo.
    """
    body = text
    if text.startswith(HF_PREFIX):
        from huggingface_hub.errors import HfUriError  # noqa: PLC0415 - only for hf:// URIs
        from huggingface_hub.utils import parse_hf_uri  # noqa: PLC0415

        try:
            uri = parse_hf_uri(text)
        except HfUriError as error:
            raise HubError(f"{text}: not a Hub URI ({_first_line(error)})") from None
        if not _hub_accepts(uri.id):
            raise HubError(f"{text}: {uri.id!r} is not a repo id the Hub accepts (ASCII "
                           "letters, digits, '-', '_', '.'; namespace/name)")
        if uri.type != "model":
            raise HubError(f"{text}: a {uri.type} repo; fusesurgery reads model repos "
                           "(hf://org/name or hf://models/org/name)")
        if uri.path_in_repo:
            raise HubError(f"{text}: a path inside a repo; give the repo itself "
                           f"(hf://{uri.id}{'@' + uri.revision if uri.revision else ''})")
        return HubReference(uri.id, uri.revision or None, text)
    repo, _, revision = body.partition("@")
    if not REPO_ID_PATTERN.fullmatch(repo) or repo.lower().endswith(FILE_LIKE_SUFFIXES):
        return None
    if "@" in body and not revision:
        return None
    if not _hub_accepts(repo):  # then it is a missing local path, whatever it looks like
        return None
    return HubReference(repo, revision or None, text)


def _hub_accepts(repo_id: str) -> bool:
    """huggingface_hub's own verdict on ``repo_id`` (it refuses some names the pattern lets
    through, ``org/name.git`` for one); imported only for a path that is not local."""
    from huggingface_hub.errors import HFValidationError  # noqa: PLC0415 - only for Hub ids
    from huggingface_hub.utils import validate_repo_id  # noqa: PLC0415

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def hub_reference_for(path: str | os.PathLike[str]) -> HubReference | None:
    """The Hub repo ``path`` names, or None: for a path that exists locally (a local path
    always wins), or one that looks like no repo id.

    Raises:
        HubError: a malformed ``hf://`` URI (see :func:`parse_hub_reference`).
    """
    text = os.fspath(path)
    if not text.startswith(HF_PREFIX) and os.path.lexists(text):
        return None
    return parse_hub_reference(text)


def select_checkpoint_files(paths: Iterable[str]) -> FileSelection:
    """Which of a repo's files a checkpoint needs, by the rules local directories follow
    (:func:`fusesurgery.io.open_checkpoint`): the weights at the repo's root, safetensors
    before pickles; the side files; nothing else (no ONNX, GGUF, Flax, TF or sub-folder
    weights, no pickles when safetensors exist).

    Args:
        paths: every file in the repo, as paths relative to its root.

    Returns:
        The selection (for an index, its shards are not yet in it: they are named inside).

    Raises:
        HubError: the repo's root holds no checkpoint fusesurgery reads.
    """
    paths = list(paths)
    root = sorted(p for p in paths if "/" not in p)
    side = tuple(p for p in paths if p in SIDE_FILES or (
        p.startswith(f"{FUSED_SOURCE_DIR}/") and PurePosixPath(p).name in SIDE_FILES))
    candidates = [p for p in root if not NOT_WEIGHTS_PATTERN.fullmatch(p)]

    def chosen(weights: list[str], index: str | None, safetensors: bool) -> FileSelection:
        return FileSelection(tuple(weights), tuple(p for p in side if p not in weights),
                             index, safetensors)

    for name in ("model.safetensors", "model.safetensors.index.json"):
        if name in root:
            return chosen([name], name if name.endswith(INDEX_SUFFIX) else None, True)
    st_indexes = [p for p in candidates if p.endswith(SAFETENSORS_SUFFIX + INDEX_SUFFIX)]
    if len(st_indexes) == 1:
        return chosen(st_indexes, st_indexes[0], True)
    st_files = [p for p in candidates if p.endswith(SAFETENSORS_SUFFIX)]
    if st_files:
        return chosen(st_files, None, True)
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if name in root:
            return chosen([name], name if name.endswith(INDEX_SUFFIX) else None, False)
    meta = [p for p in root if META_SHARD_PATTERN.fullmatch(p)]
    if meta:
        return chosen(meta, None, False)
    torch_indexes = [p for p in candidates if p.endswith(INDEX_SUFFIX)]
    if len(torch_indexes) == 1:
        return chosen(torch_indexes, torch_indexes[0], False)
    torch_files = [p for p in candidates if p.endswith(TORCH_SUFFIXES)]
    if torch_files:
        return chosen(torch_files, None, False)
    raise HubError("holds no checkpoint fusesurgery reads at its root (model.safetensors, "
                   "an index, pytorch_model.bin, consolidated.00.pth, or *.safetensors / "
                   f"{' / '.join('*' + s for s in TORCH_SUFFIXES)})")


# --------------------------------------------------------------------------------------------
# Client plumbing: settings read now, errors translated once.


def hub_cache_dir() -> str:
    """huggingface_hub's cache directory as the environment says now (``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else the client's default)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants  # noqa: PLC0415 - only for Hub sources

    return constants.HF_HUB_CACHE


def _first_line(error: BaseException) -> str:
    text = redact(str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _hub_message(reference: HubReference, error: BaseException, token: str | None) -> str | None:
    """The one-line message for a client error while fetching ``reference``; None for errors
    that are not the Hub's (left to propagate)."""
    from huggingface_hub.errors import (  # noqa: PLC0415 - only for Hub sources
        CachedRepoTreeNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name, endpoint = reference.given, hub_endpoint()
    # A plain org/name may be a mistyped local path; an hf:// URI never is.
    missing = (f"{name}: " if name.startswith(HF_PREFIX) else
               f"{name}: no such local path, and ")
    offline = hub_offline()
    if offline and isinstance(error, (LocalEntryNotFoundError, CachedRepoTreeNotFoundError,
                                      OfflineModeIsEnabled)):
        return (f"{missing}no repo of that name in the local Hub "
                "cache while HF_HUB_OFFLINE is set; download it once with the network on (or "
                "unset HF_HUB_OFFLINE)")
    if isinstance(error, GatedRepoError):
        who = "your token has no access" if token else "no token was given"
        return (f"{name}: a gated repo and {who}; accept its conditions on "
                f"{endpoint}/{reference.repo_id}, then pass a token with access "
                "(HF_TOKEN or `hf auth login`)")
    if isinstance(error, RevisionNotFoundError):
        return (f"{name}: the repo {reference.repo_id} has no revision "
                f"{reference.revision!r} (a branch, tag, commit or refs/pr/N)")
    if isinstance(error, RepositoryNotFoundError):
        hint = ("your token cannot see it" if token else
                "if it is private or gated, pass a token (HF_TOKEN or `hf auth login`)")
        return f"{missing}no model repo {reference.repo_id} on {endpoint} ({hint})"
    if isinstance(error, RemoteEntryNotFoundError):
        return f"{name}: a file vanished from the repo while downloading ({_first_line(error)})"
    if isinstance(error, HfHubHTTPError) and not is_network_error(error):
        return f"{missing}the Hub at {endpoint} refused the request ({describe(error)})"
    if isinstance(error, HFValidationError):  # a name the pattern let through
        return (f"{missing}{reference.repo_id!r} is not a repo id the Hub accepts "
                f"({_first_line(error)})")
    if is_network_error(error) or isinstance(error, (LocalEntryNotFoundError,
                                                     OfflineModeIsEnabled)):
        cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and \
            error.__cause__ is not None else error
        seconds = timeout_seconds(cause)
        if seconds is not None:
            within = f" within {seconds:g} s" if math.isfinite(seconds) else " in time"
            return (f"{missing}the Hub at {endpoint} did not answer{within} (set "
                    f"{TIMEOUT_ENV}=SECONDS to wait longer; nothing of it is in the local "
                    "cache)")
        return (f"{missing}the Hub at {endpoint} cannot be reached to "
                f"fetch a repo of that name ({describe(cause)}; nothing of it is in the local "
                "cache)")
    return None


@contextmanager
def _translated(reference: HubReference, token: str | None) -> Iterator[None]:
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        message = _hub_message(reference, error, token)
        if message is None:
            raise
        raise HubError(message) from error


def _escape(names: Iterable[str]) -> list[str]:
    """Exact file names as ``allow_patterns`` (which are fnmatch patterns)."""
    return [glob.escape(name) for name in names]


# --------------------------------------------------------------------------------------------
# Downloading.


def download_checkpoint(reference: HubReference) -> HubSnapshot:
    """Fetch the files a checkpoint needs into huggingface_hub's cache (or, with
    ``HF_HUB_OFFLINE``, find them there).

    Args:
        reference: the repo and revision.

    Returns:
        The snapshot: its commit and cache directory.

    Raises:
        HubError: repo or revision missing, gated, offline and not cached, the network.
    """
    endpoint, token, offline = hub_endpoint(), hub_token(), hub_offline()
    hub_session()  # timeouts on; HF_ENDPOINT checked before huggingface_hub is imported
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415 - only for Hub
    from huggingface_hub._snapshot_download import get_cached_repo_tree  # noqa: PLC0415

    cache = hub_cache_dir()
    revision = reference.revision or "main"
    with _translated(reference, token):
        if offline:
            paths = [f.path for f in get_cached_repo_tree(reference.repo_id, revision=revision,
                                                          cache_dir=cache)]
        else:
            api = HfApi(endpoint=endpoint, token=token or False)
            info = api.model_info(reference.repo_id, revision=reference.revision)
            paths = [sibling.rfilename for sibling in info.siblings or ()]
        try:
            selection = select_checkpoint_files(paths)
        except HubError as error:
            raise HubError(f"{reference.given}: {error}") from None

        def fetch(names: Iterable[str]) -> Path:
            return Path(snapshot_download(
                reference.repo_id, revision=revision, allow_patterns=_escape(names),
                cache_dir=cache, endpoint=endpoint, token=token or False,
                local_files_only=offline))

        names = list(selection.files)
        if selection.index is not None:  # its shards are named inside it
            directory = fetch(names)
            index = read_shard_index(directory / selection.index)
            names += index.shard_names
        directory = fetch(names)
    return HubSnapshot(reference, directory.name, directory)


def fetch_hub_files(reference: HubReference, names: Iterable[str]) -> Path:
    """Fetch only ``names`` of a repo (those it has) into huggingface_hub's cache (or, with
    ``HF_HUB_OFFLINE``, find them there): what a reader looks at before choosing how to open
    the repo (its config.json).

    Returns:
        The snapshot directory (a name it lacks is simply not there).

    Raises:
        HubError: repo or revision missing, gated, offline and not cached, the network.
    """
    endpoint, token, offline = hub_endpoint(), hub_token(), hub_offline()
    hub_session()  # timeouts on; HF_ENDPOINT checked before huggingface_hub is imported
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for Hub

    with _translated(reference, token):
        return Path(snapshot_download(
            reference.repo_id, revision=reference.revision or "main",
            allow_patterns=_escape(names), cache_dir=hub_cache_dir(), endpoint=endpoint,
            token=token or False, local_files_only=offline))


# --------------------------------------------------------------------------------------------
# Remote headers.


# A tensor this small is read from a remote file by one range request instead of downloading
# the file (a fused repo's gates are scalars in the shard of new parameters: GBs on a real
# model, a few bytes each).
RANGE_READ_MAX_BYTES = 1 << 16


class _RemoteSafetensorsReader(_SafetensorsReader):
    """A safetensors file known by its header alone; the file is downloaded into the cache
    (at ``header.path``) the first time its bytes are needed, except for tensors of at most
    :data:`RANGE_READ_MAX_BYTES`, read by a range request while it is not local."""

    def __init__(self, header: SafetensorsHeader, download: Callable[[], None],
                 read_range: Callable[[int, int], bytes] | None = None) -> None:
        super().__init__(header)
        self._download = download
        self._read_range = read_range

    def tensor(self, name: str) -> Any:
        entry = self.header.entries[name]
        size = entry.end - entry.begin
        if self._read_range is None or self.header.path.exists() or size > RANGE_READ_MAX_BYTES:
            return super().tensor(name)
        import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

        if not size:
            return torch.empty(entry.info.shape, dtype=entry.info.dtype)
        data = bytearray(self._read_range(entry.begin, entry.end - 1))  # begin/end: absolute
        return torch.frombuffer(data, dtype=entry.info.dtype).view(entry.info.shape)

    def raw(self, name: str) -> bytes:
        entry = self.header.entries[name]
        size = entry.end - entry.begin
        if self._read_range is None or self.header.path.exists() or size > RANGE_READ_MAX_BYTES:
            return super().raw(name)
        return bytes(self._read_range(entry.begin, entry.end - 1)) if size else b""

    def _ensure_local(self) -> None:
        if not self.header.path.exists():
            self._download()

    def _mapped_storage(self) -> Any:
        self._ensure_local()
        return super()._mapped_storage()

    def region(self, name: str) -> FileRegion:
        self._ensure_local()
        return super().region(name)


def _get_range(session: Any, url: str, headers: dict[str, str], path: Path, first: int,
               last: int) -> bytes:
    """Bytes ``first..last`` (inclusive) of a remote file, by one range request.

    Raises:
        HubError: the server sent another number of bytes.
    """
    from huggingface_hub.utils import hf_raise_for_status  # noqa: PLC0415 - only for Hub

    response = session.get(url, headers={**headers, "Range": f"bytes={first}-{last}"})
    hf_raise_for_status(response)
    data = response.content
    if response.status_code == 200:  # a server that ignores ranges sent it all
        data = data[first:last + 1]
    if len(data) != last - first + 1:
        raise HubError(f"{path.name}: asked for bytes {first}-{last}, got {len(data)} "
                       "bytes; the file is truncated or the server is not a Hub")
    return data


def _read_remote_header(session: Any, url: str, headers: dict[str, str], path: Path,
                        file_size: int) -> SafetensorsHeader:
    """A remote safetensors header by two range requests: the 8-byte length, then exactly
    the header."""

    def get(first: int, last: int) -> bytes:
        return _get_range(session, url, headers, path, first, last)

    if file_size < HEADER_LENGTH_BYTES:
        raise HubError(f"{path.name}: {file_size}-byte file is too short to be safetensors")
    (length,) = struct.unpack("<Q", get(0, HEADER_LENGTH_BYTES - 1))
    check_header_length(path, length, file_size)
    return parse_safetensors_header(path, file_size,
                                    get(HEADER_LENGTH_BYTES, HEADER_LENGTH_BYTES + length - 1))


def open_remote_checkpoint(reference: HubReference) -> CheckpointSource | None:
    """Open a safetensors repo from its remote headers: names, shapes, dtypes and config
    without downloading weights (tensor data is downloaded per file when first read).

    Args:
        reference: the repo and revision.

    Returns:
        The source (``source.hub`` set), or None when remote headers do not apply (offline, or
        the weights are not safetensors): download instead.

    Raises:
        HubError: repo or revision missing, gated, the network; a malformed remote header.
        CheckpointError: an index that does not match its shards.
    """
    if hub_offline():
        return None
    endpoint, token = hub_endpoint(), hub_token()
    session = hub_session()  # timeouts on; HF_ENDPOINT checked before huggingface_hub's import
    from huggingface_hub import HfApi, hf_hub_download  # noqa: PLC0415 - only for Hub
    from huggingface_hub.file_download import hf_hub_url, repo_folder_name  # noqa: PLC0415
    from huggingface_hub.utils import build_hf_headers  # noqa: PLC0415

    cache = hub_cache_dir()
    with _translated(reference, token):
        api = HfApi(endpoint=endpoint, token=token or False)
        info = api.model_info(reference.repo_id, revision=reference.revision,
                              files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or ()}
        try:
            selection = select_checkpoint_files(sizes)
        except HubError as error:
            raise HubError(f"{reference.given}: {error}") from None
        if not selection.safetensors:
            return None
        commit = info.sha
        directory = Path(cache) / repo_folder_name(repo_id=reference.repo_id,
                                                   repo_type="model") / "snapshots" / commit

        def download(name: str) -> None:
            with _translated(reference, token):
                hf_hub_download(reference.repo_id, name, revision=commit, cache_dir=cache,
                                endpoint=endpoint, token=token or False)

        small = [n for n in (HF_CONFIG_FILE, "params.json", "fusion_config.json",
                             selection.index) if n is not None and n in sizes]
        for name in small:
            download(name)
        wanted = None
        if selection.index is not None:
            index = read_shard_index(directory / selection.index)
            shard_names = index.shard_names
            wanted = {key: directory / shard for key, shard in index.weight_map.items()}
            missing = [s for s in shard_names if s not in sizes]
            if missing:
                raise HubError(f"{reference.given}: its index names {missing[0]!r}, which the "
                               "repo does not hold")
        else:
            shard_names = list(selection.weights)
        headers = build_hf_headers(token=token or False)

        def header_of(name: str) -> SafetensorsHeader:
            url = hf_hub_url(reference.repo_id, name, revision=commit, endpoint=endpoint)
            return _read_remote_header(session, url, headers, directory / name, sizes[name])

        with ThreadPoolExecutor(min(HEADER_FETCH_THREADS, len(shard_names))) as pool:
            shard_headers = list(pool.map(header_of, shard_names))
    def read_range(name: str, first: int, last: int) -> bytes:
        url = hf_hub_url(reference.repo_id, name, revision=commit, endpoint=endpoint)
        with _translated(reference, token):
            return _get_range(session, url, headers, directory / name, first, last)

    readers = [(header.path, _RemoteSafetensorsReader(
        header, lambda name=name: download(name),
        lambda first, last, name=name: read_range(name, first, last)))
        for name, header in zip(shard_names, shard_headers, strict=True)]
    if wanted is not None:
        held = {path: set(reader.header.entries) for path, reader in readers}
        absent = [key for key, path in wanted.items() if key not in held[path]]
        if absent:
            raise HubError(f"{reference.given}: its index maps {absent[0]!r} to a shard that "
                           "does not hold it; the index does not match its shards")
    config, config_file = _read_config(directory, prefer_params=False)
    first = readers[0][1].header
    source = CheckpointSource(
        path=directory,
        format=FORMAT_SAFETENSORS_SHARDED if selection.index else FORMAT_SAFETENSORS,
        readers=readers, wanted=wanted, config=config, config_file=config_file,
        is_hf_dir=HF_CONFIG_FILE in sizes, metadata=first.metadata,
    )
    source.hub = HubSnapshot(reference, commit, directory, headers_only=True)
    return source


def open_hub_checkpoint(path: str | os.PathLike[str], *,
                        remote_headers: bool = False) -> CheckpointSource | None:
    """Open ``path`` as a Hub repo when it names one (and is no local path).

    Args:
        path: what the user gave.
        remote_headers: read a safetensors repo's headers remotely rather than downloading
            its weights (tensor data then comes per file on first use).

    Returns:
        The opened source with ``source.hub`` set, or None: ``path`` names no repo.

    Raises:
        HubError: see :func:`download_checkpoint`.
    """
    reference = hub_reference_for(path)
    if reference is None:
        return None
    if remote_headers:
        source = open_remote_checkpoint(reference)
        if source is not None:
            return source
    snapshot = download_checkpoint(reference)
    source = open_local_checkpoint(snapshot.directory)
    source.hub = snapshot
    return source


__all__ = [
    "FileSelection",
    "HubReference",
    "HubSnapshot",
    "download_checkpoint",
    "fetch_hub_files",
    "hub_cache_dir",
    "hub_reference_for",
    "open_hub_checkpoint",
    "open_remote_checkpoint",
    "parse_hub_reference",
    "select_checkpoint_files",
]
