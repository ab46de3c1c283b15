"""Every size any command prints is in one convention: decimal SI units, three digits."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fusesurgery._sizes import format_bytes
from fusesurgery.cli import progress as progress_module
from fusesurgery.cli.app import app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

runner = CliRunner()

# A number followed by any byte unit, in any convention (binary, decimal, Python's "bytes");
# "405.85B parameters" is a count, not a size.
ANY_SIZE = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s?(B|bytes|[kKMGTP]i?B)\b(?! param)")
# The convention: 0-999 B, else 3 significant digits in kB, MB, GB, TB or PB.
CONVENTION = re.compile(r"\d{1,3} B|\d\.\d\d [kMGTP]B|\d\d\.\d [kMGTP]B|\d{3} [kMGTP]B")


def sizes_in(text: str) -> list[str]:
    return [match.group(0) for match in ANY_SIZE.finditer(text)]


def assert_convention(text: str, at_least: int) -> list[str]:
    sizes = sizes_in(text)
    assert len(sizes) >= at_least, f"expected {at_least}+ sizes in:\n{text}"
    for size in sizes:
        assert CONVENTION.fullmatch(size), f"{size!r} is not in the size convention:\n{text}"
    return sizes


def test_the_pattern_catches_other_conventions():
    # the test below is only as good as this: every unit seen before the fix is caught
    for text in ("1.6 GiB", "1594.1 MiB", "1.7 GB", "988.9/4,000.0 MB", "12 bytes", "3 KB",
                 "756.0 GiB", "1023 B"):
        found = sizes_in(f"wrote {text} in 3 files")
        assert found, text
        if text not in ("1.7 GB", "1023 B"):
            assert not all(CONVENTION.fullmatch(s) for s in found), text
    assert sizes_in("405.85B parameters, 247.36K parameters") == []
    assert not CONVENTION.fullmatch("1023 B") and CONVENTION.fullmatch("1.02 kB")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sizes")
    llama = shutil.copytree(EXAMPLES / "tiny-llama", root / "llama")
    clip = shutil.copytree(EXAMPLES / "tiny-clip-vision", root / "clip")
    return {"root": root, "llama": llama, "clip": clip}


def _run(*args: object):
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code in (0, 1), result.output
    return result


def test_every_command_prints_sizes_in_one_convention(outputs):
    root, llama, clip = outputs["root"], outputs["llama"], outputs["clip"]
    nbytes = (llama / "model.safetensors").stat().st_size
    printed = {}

    inspect = _run("inspect", llama)
    printed["inspect"] = assert_convention(inspect.stdout, 2)

    fuse = _run("fuse", clip, llama, "-o", root / "fused")
    printed["fuse"] = assert_convention(fuse.stdout + fuse.stderr, 1)
    printed["inspect fused"] = assert_convention(_run("inspect", root / "fused").stdout, 2)

    unfuse = _run("unfuse", root / "fused", "-o", root / "decoder")
    printed["unfuse"] = assert_convention(unfuse.stdout + unfuse.stderr, 1)

    convert = _run("convert", llama, "--to", "native", "-o", root / "native")
    printed["convert"] = assert_convention(convert.stdout + convert.stderr, 1)

    diff = _run("diff", llama, root / "native")
    printed["diff"] = assert_convention(diff.stdout, 2)
    diff_fused = _run("diff", root / "native", root / "fused", "--no-values")
    printed["diff fused"] = assert_convention(diff_fused.stdout, 2)

    validate = _run("validate", root / "fused")
    assert_convention(validate.stdout + validate.stderr, 0)

    # the figures are the formatter's, of the real byte counts: the tiny decoder is ~0.5 MB
    assert format_bytes(nbytes - 8 - _header_len(llama / "model.safetensors")) in (
        printed["inspect"])
    assert all(size.endswith(" kB") for size in printed["convert"] + printed["unfuse"])


def _header_len(path: Path) -> int:
    with path.open("rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def test_progress_bar_uses_the_same_convention(monkeypatch):
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    monkeypatch.setattr(progress_module, "stderr", console)
    with progress_module.byte_progress("writing") as update:
        update(1_234_567, 4_976_698_672)
        update(2_500_000_000, 4_976_698_672)
    text = screen.getvalue()
    assert "1.23 MB/4.98 GB" in text or "2.50 GB/4.98 GB" in text, text
    assert "%" in text  # the percentage column
    for size in sizes_in(text):
        assert CONVENTION.fullmatch(size), (size, text)


def test_progress_columns_render_with_the_formatter():
    from rich.progress import Progress

    columns = (progress_module.BytesColumn(), progress_module.RateColumn())
    bar = Progress(*columns, disable=True)
    task_id = bar.add_task("x", total=None)
    task = bar.tasks[0]
    assert columns[0].render(task).plain == "0 B/?"
    assert columns[1].render(task).plain == "?"
    bar.update(task_id, completed=999, total=1_000_000)
    assert columns[0].render(bar.tasks[0]).plain == "999 B/1.00 MB"
    bar.tasks[0].finished_speed = 412_345_678.0
    assert columns[1].render(bar.tasks[0]).plain == "412 MB/s"


def test_not_enough_space_speaks_the_convention(tmp_path):
    from fusesurgery.errors import WriteError
    from fusesurgery.write.safetensors_writer import _check_free_space

    free = shutil.disk_usage(tmp_path).free
    if free == 0:
        pytest.skip("this filesystem reports no free space")
    with pytest.raises(WriteError) as caught:
        _check_free_space(tmp_path, 10 * free)
    message = str(caught.value)
    assert f"needs {format_bytes(10 * free)}, {format_bytes(free)} are free" in message
    assert_convention(message, 2)


def test_oversized_json_speaks_the_convention(tmp_path):
    from fusesurgery.errors import CheckpointError
    from fusesurgery.io._files import MAX_JSON_FILE_BYTES, read_json_file

    big = tmp_path / "config.json"
    with big.open("wb") as handle:
        handle.truncate(MAX_JSON_FILE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(CheckpointError) as caught:
        read_json_file(big, "config file")
    assert f"{format_bytes(MAX_JSON_FILE_BYTES + 1)} is far too large" in str(caught.value)
    assert_convention(str(caught.value), 1)
