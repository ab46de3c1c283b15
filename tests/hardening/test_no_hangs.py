"""Class 3: nothing blocks on a pipe or a device, nothing iterates a size a config invents."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest

from fusesurgery import detect_checkpoint
from fusesurgery.errors import CheckpointError, ConfigError, FuseSurgeryError
from fusesurgery.io import open_checkpoint
from tests.hardening.conftest import assert_one_line_error, cli, edit_config


@contextlib.contextmanager
def bounded(seconds: int = 30) -> Iterator[None]:
    """Fail, instead of hanging the suite, if the block does not finish in time."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["weights", "model.safetensors", "model.pt",
                                  "model.safetensors.index.json"])
def test_a_fifo_given_as_the_checkpoint_is_refused(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with bounded(), pytest.raises(CheckpointError, match="named pipe"):
        open_checkpoint(fifo)
    with bounded():
        assert_one_line_error(cli("inspect", fifo), "named pipe")


def test_a_character_device_is_refused(tmp_path):
    with bounded(), pytest.raises(CheckpointError, match="character device"):
        open_checkpoint("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "directory", "link to /dev/zero", "dangling link"])
def test_an_unreadable_config_file_is_named(llama, kind):
    config = llama / "config.json"
    config.unlink()
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "directory":
        config.mkdir()
    elif kind == "link to /dev/zero":
        config.symlink_to("/dev/zero")
    else:
        config.symlink_to(llama / "missing.json")
    with bounded(), pytest.raises(FuseSurgeryError) as error:
        detect_checkpoint(llama)
    assert "config.json" in str(error.value) and "num_heads" not in str(error.value)
    with bounded():
        assert_one_line_error(cli("inspect", llama), "config.json")


@pytest.mark.parametrize("layers", [10**9, 10**18, 5])
def test_a_config_layer_count_the_tensors_contradict_fails_at_once(llama, layers):
    edit_config(llama, num_hidden_layers=layers)
    with bounded(), pytest.raises(ConfigError, match=f"num_layers {layers}.*holds 4"):
        detect_checkpoint(llama)
    with bounded():
        assert_one_line_error(cli("convert", llama, "-o", llama.parent / "out"), "num_layers")


def test_a_given_layer_count_the_tensors_contradict_fails_at_once(llama):
    with bounded(), pytest.raises(ConfigError, match="--num-layers"):
        detect_checkpoint(llama, overrides={"num_layers": 10**9})
