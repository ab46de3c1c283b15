"""Whole-file copies started before the rest of a write is even planned.

``fuse`` spends seconds before its first byte could be written: torch's import alone takes
about two, then the plans. A source file that will become an output shard under new names
(see ``write_safetensors``: its bytes stay, only its header and any permuted rows change)
needs none of that to be copied, and kernel copies release the GIL: :class:`CopyAhead`
copies such files on a thread from the moment the inputs are known, and the writer takes
each finished copy instead of copying the file again. A copy that turns out unneeded (the
plan decided otherwise) is removed; what the output holds never depends on the copy-ahead.

Nothing here imports torch.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from fusesurgery.io.tensor_info import FileRegion
from fusesurgery.write.output_guard import make_temp_dir
from fusesurgery.write.safetensors_writer import copy_region


class _Stopped(Exception):
    """Raised inside the copy thread to stop it between two kernel calls."""


class CopyAhead:
    """Copies ``files``, one after the other, on a background thread into a temporary
    directory beside ``out_dir`` (named as the writers name theirs, so a killed run's copies
    are removed by the next run), until closed.

    A context manager: leaving it stops the thread (after its current kernel call, at most
    2 GiB) and removes every copy not taken.

    Args:
        out_dir: the resolved output directory (its parent holds the copies).
        files: the source files to copy, in the order the writer will want them.
    """

    def __init__(self, out_dir: Path, files: Sequence[Path]) -> None:
        self._files = [Path(os.path.realpath(file)) for file in files]
        self._done = {file: threading.Event() for file in self._files}
        self._copies: dict[Path, Path | None] = {}
        self._stop = threading.Event()
        self._dir: Path | None = None
        self._thread: threading.Thread | None = None
        if self._files:
            self._dir = make_temp_dir(out_dir)
            self._thread = threading.Thread(target=self._run, name="fusesurgery-copy-ahead",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._dir is not None
        for number, source in enumerate(self._files):
            copy: Path | None = self._dir / f"{number}.copy"
            try:
                if self._stop.is_set():
                    raise _Stopped
                size = os.stat(source).st_size
                fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    copy_region(fd, FileRegion(source, 0, size), self._check_stop)
                finally:
                    os.close(fd)
            except (OSError, _Stopped):
                # the writer copies the file itself, and reports any error as its own
                copy = None
            self._copies[source] = copy
            self._done[source].set()

    def _check_stop(self, copied: int) -> None:
        if self._stop.is_set():
            raise _Stopped

    @property
    def files(self) -> tuple[Path, ...]:
        """The files being copied (resolved)."""
        return tuple(self._files)

    def take(self, source: Path) -> Path | None:
        """A complete copy of ``source``, once finished (waits for it); the caller renames it
        away. None when ``source`` is not copied here, its copy failed, the file's size
        changed since (the writer then copies it itself), or copying was stopped.
        """
        resolved = Path(os.path.realpath(source))
        if resolved not in self._done:
            return None
        while not self._done[resolved].wait(0.05):
            if self._stop.is_set():
                return None
        copy = self._copies.pop(resolved, None)
        if self._stop.is_set():
            return None
        try:
            if copy is not None and os.stat(copy).st_size == os.stat(resolved).st_size:
                return copy
        except OSError:
            pass
        return None

    def stop(self) -> None:
        """Stop copying, after the current kernel call: ``take`` returns None from now on."""
        self._stop.set()

    def close(self) -> None:
        """Stop copying and remove every copy not taken."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> CopyAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CopyAhead"]
