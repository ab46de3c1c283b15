"""Class 2: SIGTERM is handled like Ctrl-C, and what a SIGKILLed run left is cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fusesurgery.write import convert_checkpoint
from fusesurgery.write import output_guard as guard

# Runs the real entry point in a child process, which sends itself SIGNAL while the first
# bytes of the output are being written.
CHILD = textwrap.dedent("""
    import os, signal, sys, threading
    from fusesurgery.write import safetensors_writer
    real, signum = safetensors_writer._write_all, getattr(signal, sys.argv[1])
    def write_then_die(*args, **kwargs):
        # to the main thread, as a terminal's Ctrl-C reaches it: a write may run on a
        # background thread, and a signal the kernel hands to that thread reaches Python's
        # handler only when the main thread next runs bytecode
        if signum == signal.SIGKILL:
            os.kill(os.getpid(), signum)
        else:
            signal.pthread_kill(threading.main_thread().ident, signum)
        return real(*args, **kwargs)
    safetensors_writer._write_all = write_then_die
    # Ctrl-C at a terminal: a child of a shell's background job (`cmd &`, nohup, some CI
    # runners) starts with SIGINT ignored, and Python then installs no handler for it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["fusesurgery", *sys.argv[2:]]
    from fusesurgery.cli import main
    main()
""")


def run_child(signal_name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, signal_name, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def partials(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if ".partial-" in name or ".old-" in name]


def test_sigterm_mid_convert_leaves_nothing_behind(llama, tmp_path):
    result = run_child("SIGTERM", "convert", llama, "-o", tmp_path / "out")
    assert result.returncode == 143, result.stderr
    assert "terminated" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []


def test_sigterm_during_overwrite_keeps_the_old_output(llama, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(llama, out)
    before = sorted(os.listdir(out))
    result = run_child("SIGTERM", "convert", llama, "-o", out, "--to", "hf", "--overwrite")
    assert result.returncode == 143, result.stderr
    assert sorted(os.listdir(out)) == before
    assert partials(tmp_path) == []


def test_a_sigkilled_runs_partial_output_is_removed_by_the_next_run(llama, tmp_path):
    out = tmp_path / "out"
    result = run_child("SIGKILL", "convert", llama, "-o", out)
    assert result.returncode == -9
    assert len(partials(tmp_path)) == 1  # what SIGKILL leaves: nothing can run on the way out
    convert_checkpoint(llama, out)
    assert partials(tmp_path) == []
    assert (out / "model.safetensors").is_file()


def test_only_partials_of_dead_processes_on_this_machine_are_removed(tmp_path):
    out = tmp_path / "out"
    tag = guard._host_tag()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    keep = [
        f".out.partial-{tag}-{os.getpid()}-00000001",  # a live process (this one)
        f".out.partial-{'0' * 8 if tag != '0' * 8 else '1' * 8}-{dead}-00000002",  # elsewhere
        f".out.partial-{tag}-{dead}",  # not our naming
        f".other.partial-{tag}-{dead}-00000003",  # another output's
    ]
    remove = [f".out.partial-{tag}-{dead}-00000004"]
    for name in keep + remove:
        (tmp_path / name).mkdir()
    guard.clean_stale_siblings(out)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_an_old_output_moved_aside_by_a_killed_replace_comes_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    old = tmp_path / f".out.old-{guard._host_tag()}-{dead}-0000abcd"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old")
    guard.clean_stale_siblings(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"old"
    assert partials(tmp_path) == []
