"""The Hub client settings, read at call time, and the one translation of client errors.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, when it is imported; a
long-lived process (a notebook, a test run) that changes them later would still talk to the
old endpoint. fusesurgery reads them from the environment on every call and passes the
endpoint and token to the client explicitly.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now (default ``https://huggingface.co``), without a trailing
    slash."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) as it is now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def hub_token(explicit: str | None = None) -> str | None:
    """The token to use: ``explicit`` (``--token``), else ``HF_TOKEN`` as it is now, else the
    saved login (``hf auth login``); None when there is none."""
    if explicit:
        return explicit
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def hub_api(token: str | None) -> Any:
    """An ``HfApi`` for the endpoint and token as they are now."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token if token else False)


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a client error, None for errors without a response."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def server_message(error: BaseException) -> str:
    """The server's own one-line reason, if the client kept one."""
    message = getattr(error, "server_message", None) or ""
    return message.strip().splitlines()[0] if message.strip() else ""


def is_network_error(error: BaseException) -> bool:
    """A failure to reach the Hub or a Hub that failed (5xx), as opposed to a refusal."""
    status = http_status(error)
    if status is not None:
        return status >= 500 or status in (408, 429)
    module = type(error).__module__ or ""
    return (module.startswith(("httpx", "httpcore", "h11", "ssl", "socket"))
            or isinstance(error, (ConnectionError, TimeoutError)))


def describe(error: BaseException) -> str:
    """A short description of a client error: the status and the server's reason, or the
    network failure's own first line."""
    status = http_status(error)
    reason = server_message(error)
    if status is not None:
        return f"HTTP {status}" + (f": {reason}" if reason else "")
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}" + (f": {text}" if text else "")
