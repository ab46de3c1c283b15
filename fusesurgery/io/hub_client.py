"""The Hub client settings, read at call time, and the one translation of client errors.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, when it is imported; a
long-lived process (a notebook, a test run) that changes them later would still talk to the
old endpoint. fusesurgery reads them from the environment on every call and passes the
endpoint and token to the client explicitly. ``HF_ENDPOINT`` is checked before
huggingface_hub is imported (its import fails on a malformed one), and a token before it is
sent (a stray ``\r`` would otherwise come back in the client's error, the token with it).

huggingface_hub's HTTP client waits forever by default; :func:`hub_session` gives every
request it sends a connect and a read timeout (:func:`hub_timeouts`), per network operation,
so a large upload is never cut off while bytes keep moving.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any
from urllib.parse import urlsplit

from fusesurgery.errors import HubError

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}
TIMEOUT_ENV = "FUSESURGERY_HUB_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
REDACTED = "<token>"

# Every token handed out by hub_token, so that no message can echo one (see redact()).
_SECRETS: set[str] = set()
_SESSION_LOCK = threading.Lock()
# (connect, read, from the environment): what _apply_timeouts gives each request.
_timeouts: tuple[float, float, bool] = (DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S,
                                        False)


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now (default ``https://huggingface.co``), without a trailing
    slash.

    Raises:
        HubError: ``HF_ENDPOINT`` is not an ``http(s)://host[:port]`` URL.
    """
    raw = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    endpoint = raw.rstrip("/")
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or any(c.isspace() or not c.isprintable() for c in endpoint)):
        raise HubError(f"HF_ENDPOINT={raw!r} is not an http(s) URL with a host (for example "
                       f"{DEFAULT_ENDPOINT}); fix or unset it")
    return endpoint


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) as it is now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _checked_token(token: str, origin: str) -> str | None:
    """``token`` without surrounding whitespace (as the ``hf`` CLI reads it); None if blank.

    Raises:
        HubError: a character no token holds; the message names where the token came from
            and the position, never the token.
    """
    token = token.strip()
    for position, char in enumerate(token, 1):
        if not ("!" <= char <= "~"):  # printable ASCII, no space
            what = ("a non-ASCII character" if ord(char) > 127 else
                    "a space" if char == " " else "a control character")
            raise HubError(f"the Hub token from {origin} holds {what} (character {position} "
                           f"of {len(token)}); a token is printable ASCII (hf_...): check "
                           "for a stray character or a pasting mistake")
    if token:
        _SECRETS.add(token)
    return token or None


def hub_token(explicit: str | None = None) -> str | None:
    """The token to use: ``explicit`` (``--token``), else ``HF_TOKEN`` as it is now, else the
    saved login (``hf auth login``); None when there is none. Surrounding whitespace (a
    stray ``\r`` or newline) is dropped.

    Raises:
        HubError: the token holds a character no token holds (the message never shows it),
            or ``HF_ENDPOINT`` is malformed (see :func:`hub_endpoint`).
    """
    if explicit and explicit.strip():
        return _checked_token(explicit, "--token")
    if os.environ.get("HF_TOKEN", "").strip():
        return _checked_token(os.environ["HF_TOKEN"], "HF_TOKEN")
    hub_endpoint()  # importing huggingface_hub fails on a malformed HF_ENDPOINT
    from huggingface_hub import get_token

    saved = get_token()
    return _checked_token(saved, "the saved login (`hf auth login`)") if saved else None


def redact(text: str) -> str:
    """``text`` with every token :func:`hub_token` has handed out replaced by ``<token>``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        for form in {secret, repr(secret)[1:-1]}:
            text = text.replace(form, REDACTED)
    return text


def hub_timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds: ``FUSESURGERY_HUB_TIMEOUT`` sets the read (and
    write) timeout, default 60 s; connecting waits 10 s, or less when the read timeout is less.

    Raises:
        HubError: ``FUSESURGERY_HUB_TIMEOUT`` is not a positive number of seconds.
    """
    connect, read, _ = _timeouts_from_env()
    return connect, read


def _timeouts_from_env() -> tuple[float, float, bool]:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_READ_TIMEOUT_S, False
    try:
        read = float(raw)
    except ValueError:
        read = math.nan
    if not math.isfinite(read) or read <= 0:
        raise HubError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return min(DEFAULT_CONNECT_TIMEOUT_S, read), read, True


def _apply_timeouts(request: Any) -> None:
    """An httpx request hook: fill in the timeouts huggingface_hub left unset (it sends most
    API calls with none); ``FUSESURGERY_HUB_TIMEOUT``, when set, overrides its own read and
    write timeouts too."""
    connect, read, from_env = _timeouts
    timeout = dict(request.extensions.get("timeout") or {})
    if timeout.get("connect") is None:
        timeout["connect"] = connect
    for kind in ("read", "write"):
        if from_env or timeout.get(kind) is None:
            timeout[kind] = read
    request.extensions = {**request.extensions, "timeout": timeout}


def hub_session() -> Any:
    """huggingface_hub's shared HTTP client, set to time out as :func:`hub_timeouts` says now
    (every request the client sends, its own included, goes through it).

    Raises:
        HubError: a malformed ``HF_ENDPOINT`` or ``FUSESURGERY_HUB_TIMEOUT``.
    """
    global _timeouts
    hub_endpoint()  # before huggingface_hub is imported
    _timeouts = _timeouts_from_env()
    from huggingface_hub.utils import get_session

    session = get_session()  # recreated after a fork or set_client_factory: check each time
    with _SESSION_LOCK:
        hooks = session.event_hooks
        if _apply_timeouts not in hooks.get("request", []):
            session.event_hooks = {**hooks,
                                   "request": [*hooks.get("request", []), _apply_timeouts]}
    return session


def hub_api(token: str | None) -> Any:
    """An ``HfApi`` for the endpoint and token as they are now, its requests timing out as
    :func:`hub_timeouts` says.

    Raises:
        HubError: a malformed ``HF_ENDPOINT`` or ``FUSESURGERY_HUB_TIMEOUT``.
    """
    endpoint = hub_endpoint()
    hub_session()
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token if token else False)


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a client error, None for errors without a response."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def server_message(error: BaseException) -> str:
    """The server's own one-line reason, if the client kept one."""
    message = redact(getattr(error, "server_message", None) or "")
    return message.strip().splitlines()[0] if message.strip() else ""


def is_network_error(error: BaseException) -> bool:
    """A failure to reach the Hub or a Hub that failed (5xx), as opposed to a refusal."""
    status = http_status(error)
    if status is not None:
        return status >= 500 or status in (408, 429)
    module = type(error).__module__ or ""
    return (module.startswith(("httpx", "httpcore", "h11", "ssl", "socket"))
            or isinstance(error, (ConnectionError, TimeoutError)))


_TIMEOUT_KINDS = {"ConnectTimeout": "connect", "ReadTimeout": "read",
                  "WriteTimeout": "write", "PoolTimeout": "pool"}


def timeout_seconds(error: BaseException) -> float | None:
    """For a client timeout, the limit that ran out (seconds; nan when unknown); else None."""
    kind = _TIMEOUT_KINDS.get(type(error).__name__)
    if kind is None or not (type(error).__module__ or "").startswith(("httpx", "httpcore")):
        return None
    try:
        seconds = error.request.extensions["timeout"][kind]  # type: ignore[attr-defined]
    except (AttributeError, KeyError, RuntimeError, TypeError):  # no request attached
        return math.nan
    return float(seconds) if seconds is not None else math.nan


def describe(error: BaseException) -> str:
    """A short description of a client error: the status and the server's reason, a timeout
    and how to wait longer, or the network failure's own first line; never a token.
    """
    status = http_status(error)
    reason = server_message(error)
    if status is not None:
        return f"HTTP {status}" + (f": {reason}" if reason else "")
    seconds = timeout_seconds(error)
    if seconds is not None:
        within = f" within {seconds:g} s" if math.isfinite(seconds) else " in time"
        return f"no answer{within}; set {TIMEOUT_ENV}=SECONDS to wait longer"
    text = redact(str(error)).strip()
    text = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}" + (f": {text}" if text else "")
