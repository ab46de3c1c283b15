"""Bad Hub settings and stalled Hubs end in one clear line (exit 2), never a traceback, an
'internal error' (exit 3), a hang, or a token printed back: tokens with stray characters,
malformed ``HF_ENDPOINT``, a server that accepts connections and never answers, names
huggingface_hub refuses as repo ids, and mistyped local paths that look like repo ids."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusesurgery.errors import FuseSurgeryError, HubError
from fusesurgery.io import hub_client as _client
from fusesurgery.io import open_checkpoint
from fusesurgery.io.hub_client import (
    describe,
    hub_endpoint,
    hub_session,
    hub_timeouts,
    hub_token,
    server_message,
)
from fusesurgery.io.hub_sources import parse_hub_reference
from tests.hub.conftest import READ_TOKEN, WRITE_TOKEN
from tests.hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_SECRETsecret123"


def _run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusesurgery", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run failed as bad input: exit 2, one ``error:`` line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", _client.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login


# --------------------------------------------------------------------------------------------
# Tokens.


@pytest.mark.parametrize("raw", [f"{SECRET}\r", f"{SECRET}\n", f"  {SECRET}\r\n", f"\t{SECRET}"])
def test_token_surrounding_whitespace_is_dropped(clean_env, monkeypatch: pytest.MonkeyPatch,
                                                 raw: str):
    assert hub_token(raw) == SECRET
    monkeypatch.setenv("HF_TOKEN", raw)
    assert hub_token() == SECRET


@pytest.mark.parametrize(("raw", "what"), [
    ("tøken", "a non-ASCII character"),
    (f"{SECRET}\x1bx", "a control character"),
    (f"hf_{SECRET}\rx", "a control character"),
    (f"{SECRET} x", "a space"),
])
def test_token_with_an_impossible_character_is_refused_without_showing_it(
        clean_env, monkeypatch: pytest.MonkeyPatch, raw: str, what: str):
    with pytest.raises(HubError) as error:
        hub_token(raw)
    message = str(error.value)
    assert f"token from --token holds {what}" in message and "\n" not in message
    assert raw.strip() not in message and "SECRET" not in message and "tøken" not in message
    monkeypatch.setenv("HF_TOKEN", raw)
    with pytest.raises(HubError, match=f"token from HF_TOKEN holds {what}"):
        hub_token()


def test_blank_token_means_none(clean_env, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", " \r\n")
    assert hub_token(" ") is None


def test_client_error_messages_never_echo_a_token(clean_env):
    token = hub_token(f"{SECRET}\r")

    class Refused(Exception):
        server_message = f"token {token} is not allowed here\nsecond line"
        response = type("Response", (), {"status_code": 403})()

    network = ConnectionError(f"Illegal header value b'Bearer {token}'")
    for text in (describe(network), describe(Refused()), server_message(Refused())):
        assert token not in text and "<token>" in text, text


def test_stray_return_in_token_pushes_and_never_shows(hub: FakeHub, hub_env, fused_example: Path):
    pushed = _run(hub_env(token=f"{WRITE_TOKEN}\r"), "push", str(fused_example), "alice/tiny",
                  "--quick")
    assert pushed.returncode == 0, pushed.stderr
    assert hub.head("alice/tiny")  # it really committed, as alice
    refused = _run(hub_env(token=None), "push", str(fused_example), "alice/tiny", "--quick",
                   "--json", "--token", f"{SECRET}ø")
    line = _one_line_error(refused)
    assert "token from --token holds a non-ASCII character" in line
    assert json.loads(refused.stdout)["code"] == 2
    assert SECRET not in refused.stdout + refused.stderr


def test_token_with_control_character_from_env_never_shows(hub: FakeHub, hub_env):
    result = _run(hub_env(token=f"{SECRET}\x01z"), "inspect", "alice/anything", "--json")
    _one_line_error(result)
    assert SECRET not in result.stdout + result.stderr
    assert "token from HF_TOKEN holds a control character" in json.loads(result.stdout)["error"]


# --------------------------------------------------------------------------------------------
# HF_ENDPOINT.


@pytest.mark.parametrize("endpoint", [
    "http://[::1", "localhost:8080", "huggingface.co", "ftp://hub.example", "http://",
    "https://:443", "http://host:port", "http://ho st",
])
def test_malformed_endpoint_is_refused_naming_it(clean_env, monkeypatch: pytest.MonkeyPatch,
                                                 endpoint: str):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(HubError, match=r"^HF_ENDPOINT='.*' is not an http\(s\) URL with a host"):
        hub_endpoint()


@pytest.mark.parametrize(("endpoint", "expected"), [
    ("https://hub.example.com/", "https://hub.example.com"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://[::1]:8080/", "http://[::1]:8080"),
    ("", "https://huggingface.co"),
])
def test_wellformed_endpoints(clean_env, monkeypatch: pytest.MonkeyPatch, endpoint: str,
                              expected: str):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert hub_endpoint() == expected


def test_malformed_endpoint_from_the_command_line(tmp_path: Path, fused_example: Path,
                                                  hub_env):
    """huggingface_hub fails to import with this HF_ENDPOINT: it is checked before."""
    env = hub_env(HF_ENDPOINT="http://[::1")
    for args in (("inspect", "alice/model"), ("push", str(fused_example), "alice/m", "--quick")):
        line = _one_line_error(_run(env, *args))
        assert "HF_ENDPOINT='http://[::1' is not an http(s) URL" in line, args


# --------------------------------------------------------------------------------------------
# Timeouts.


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A server that accepts connections and never answers; its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    for connection in held:
        connection.close()


@pytest.mark.parametrize(("value", "expected"), [
    (None, (10.0, 60.0)), ("2.5", (2.5, 2.5)), ("300", (10.0, 300.0)), (" 30 ", (10.0, 30.0)),
])
def test_timeouts_from_the_environment(clean_env, monkeypatch: pytest.MonkeyPatch,
                                       value: str | None, expected: tuple[float, float]):
    if value is not None:
        monkeypatch.setenv(_client.TIMEOUT_ENV, value)
    assert hub_timeouts() == expected


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_bad_timeout_setting(clean_env, monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv(_client.TIMEOUT_ENV, value)
    with pytest.raises(HubError, match=f"^{_client.TIMEOUT_ENV}='{value}' is not a positive"):
        hub_timeouts()


def test_every_request_of_the_shared_client_gets_timeouts(clean_env,
                                                          monkeypatch: pytest.MonkeyPatch):
    import httpx2

    session = hub_session()
    assert _client._apply_timeouts in session.event_hooks["request"]
    hub_session()
    assert session.event_hooks["request"].count(_client._apply_timeouts) == 1
    unset = session.build_request("GET", "http://127.0.0.1/", timeout=None)
    _client._apply_timeouts(unset)
    assert {k: unset.extensions["timeout"][k] for k in ("connect", "read", "write")} == {
        "connect": 10.0, "read": 60.0, "write": 60.0}
    # the client's own limits (HF_HUB_DOWNLOAD_TIMEOUT) stand, unless the variable is set
    own = session.build_request("GET", "http://127.0.0.1/", timeout=httpx2.Timeout(7.0))
    _client._apply_timeouts(own)
    assert own.extensions["timeout"]["read"] == 7.0
    monkeypatch.setenv(_client.TIMEOUT_ENV, "3")
    hub_session()
    own = session.build_request("GET", "http://127.0.0.1/", timeout=httpx2.Timeout(7.0))
    _client._apply_timeouts(own)
    assert (own.extensions["timeout"]["read"], own.extensions["timeout"]["write"]) == (3.0, 3.0)


def test_a_silent_hub_ends_in_process(clean_env, monkeypatch: pytest.MonkeyPatch,
                                      silent_hub: str):
    monkeypatch.setenv("HF_ENDPOINT", silent_hub)
    monkeypatch.setenv(_client.TIMEOUT_ENV, "0.5")
    assert str(_raised_within(20, lambda: open_checkpoint("org/name"))) == (
        f"org/name: no such local path, and the Hub at {silent_hub} did not answer within "
        f"0.5 s (set {_client.TIMEOUT_ENV}=SECONDS to wait longer; nothing of it is in the "
        "local cache)")


def _raised_within(seconds: float, call) -> BaseException:
    """What ``call()`` raised, failing the test if it has not ended after ``seconds`` (it runs
    in a daemon thread, so a hang fails the test instead of stalling the run)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    assert isinstance(outcome[0], HubError), outcome[0]
    return outcome[0]


def test_a_silent_hub_ends_inspect_and_push(silent_hub: str, fused_example: Path, tmp_path: Path,
                                            hub_env):
    env = hub_env(HF_ENDPOINT=silent_hub, **{_client.TIMEOUT_ENV: "1"})
    for args, expected in (
            (("inspect", "org/name"), f"the Hub at {silent_hub} did not answer within 1 s"),
            (("push", str(fused_example), "org/name", "--quick"),
             f"could not reach the Hub at {silent_hub} to check the token (no answer within "
             "1 s")):
        start = time.monotonic()
        result = _run(env, *args, timeout=60)
        elapsed = time.monotonic() - start
        assert expected in _one_line_error(result), args
        assert elapsed < 30, (args, elapsed)


# --------------------------------------------------------------------------------------------
# Names huggingface_hub refuses, and mistyped local paths.


@pytest.mark.parametrize("text", ["alice/añe", "ålice/model", "alice/名前", "alice/model.git",
                                  "alice/añe@main"])
def test_names_the_hub_refuses_are_not_repo_ids(text: str):
    assert parse_hub_reference(text) is None


def test_missing_non_ascii_path_is_not_found(clean_env, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FuseSurgeryError, match="no such file or directory"):
        open_checkpoint("alice/añe")
    with pytest.raises(HubError, match="hf://alice/añe: not a Hub URI"):
        open_checkpoint("hf://alice/añe")


def test_mistyped_local_path_says_so_first(hub: FakeHub, clean_env, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, silent_hub: str):
    """However the Hub lookup ends, a text that could be a local path is named as missing
    first; an hf:// URI, which cannot be, is not."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    prefix = "exmples/tiny-llama: no such local path, and "

    def message(text: str = "exmples/tiny-llama") -> str:
        with pytest.raises(HubError) as error:
            open_checkpoint(text)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert message().startswith(prefix + "no model repo exmples/tiny-llama on ")  # not found
    hub.fail("repo-info", status=403)
    assert message().startswith(prefix + f"the Hub at {hub.url} refused the request (HTTP 403")
    hub.fail("repo-info", status=None)
    assert message().startswith(prefix + f"the Hub at {hub.url} cannot be reached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert message().startswith(prefix + "no repo of that name in the local Hub cache")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", silent_hub)
    monkeypatch.setenv(_client.TIMEOUT_ENV, "0.3")
    stalled = str(_raised_within(20, lambda: open_checkpoint("exmples/tiny-llama")))
    assert stalled.startswith(prefix + f"the Hub at {silent_hub} did not answer within 0.3 s")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    uri = message("hf://exmples/tiny-llama")
    assert uri.startswith("hf://exmples/tiny-llama: no model repo") and "local path" not in uri


def test_timeout_seconds_of_other_errors():
    assert _client.timeout_seconds(ValueError("x")) is None
    import httpx2

    assert math.isnan(_client.timeout_seconds(httpx2.ReadTimeout("timed out")))
