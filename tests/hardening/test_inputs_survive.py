"""Class 1 of the hardening rules: no output path, whatever the flags, changes an input."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusesurgery.errors import WriteError
from fusesurgery.write import convert_checkpoint
from fusesurgery.write.output_guard import MARKER_FILE
from tests.hardening.conftest import EXAMPLES, assert_one_line_error, cli, snapshot


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "output",
    ["SRC", "PARENT", "SRC/sub", "SRC/.", "PARENT/x/../llama", "LINK", "LINK/deeper"],
)
def test_cli_refuses_an_output_overlapping_the_input(llama, output, overwrite):
    parent = llama.parent
    (parent / "link").symlink_to(llama, target_is_directory=True)
    path = (output.replace("SRC", str(llama)).replace("PARENT", str(parent))
            .replace("LINK", str(parent / "link")))
    before = snapshot(parent)
    result = cli("convert", llama, "-o", path, *(["--overwrite"] if overwrite else []))
    assert_one_line_error(result, "input")
    assert snapshot(parent) == before


def test_cli_refuses_the_empty_output_path(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_one_line_error(cli("convert", llama, "-o", "", "--overwrite"), "output path is empty")
    assert snapshot(tmp_path) == before


def test_output_inside_the_current_directory_tree_is_refused(llama, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "deep").mkdir(parents=True)
    monkeypatch.chdir(work / "deep")
    assert_one_line_error(cli("convert", llama, "-o", work), "current directory")


def test_overwrite_never_replaces_a_directory_fusesurgery_did_not_write(llama, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    before = snapshot(other)
    result = cli("convert", llama, "-o", other, "--overwrite")
    assert_one_line_error(result, "was not written by fusesurgery")
    assert snapshot(other) == before


def test_overwrite_replaces_an_earlier_output_and_keeps_the_inputs(llama, tmp_path):
    out = tmp_path / "out"
    before = snapshot(llama)
    assert cli("convert", llama, "-o", out).exit_code == 0
    assert (out / MARKER_FILE).is_file()
    assert_one_line_error(cli("convert", llama, "-o", out), "--overwrite")
    assert cli("convert", llama, "-o", out, "--to", "hf", "--overwrite").exit_code == 0
    assert snapshot(llama) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_files_link_target_is_protected_too(tmp_path):
    """Hugging Face cache snapshots link each file to a blob elsewhere: the blobs are inputs."""
    blobs = tmp_path / "blobs"
    snapshot_dir = tmp_path / "snap" / "main"
    shutil.copytree(EXAMPLES / "tiny-llama", blobs)
    snapshot_dir.mkdir(parents=True)
    for name in os.listdir(blobs):
        (snapshot_dir / name).symlink_to(blobs / name)
    with pytest.raises(WriteError, match="contains the input"):
        convert_checkpoint(snapshot_dir, blobs.parent, overwrite=True)
    with pytest.raises(WriteError, match="is the input|contains the input"):
        convert_checkpoint(snapshot_dir, blobs, overwrite=True)


RELATIONS = ["same", "parent", "grandparent", "child", "grandchild", "sibling",
             "link-to-input", "link-to-parent", "link-to-sibling", "dotted-same", "file"]


def _output_for(relation: str, source: Path, root: Path) -> tuple[Path, bool]:
    """An output path in ``relation`` to ``source``, and whether it overlaps the input."""
    sibling = root / "a" / "sibling"
    links = root / "links"
    links.mkdir(exist_ok=True)
    table = {
        "same": (source, True),
        "parent": (source.parent, True),
        "grandparent": (source.parent.parent, True),
        "child": (source / "out", True),
        "grandchild": (source / "x" / "out", True),
        "sibling": (sibling, False),
        "dotted-same": (source.parent / "." / source.name / ".." / source.name, True),
        "file": (source / "model.safetensors", True),
    }
    if relation in table:
        return table[relation]
    target = {"link-to-input": source, "link-to-parent": source.parent,
              "link-to-sibling": sibling}[relation]
    link = links / relation
    link.symlink_to(target, target_is_directory=True)
    return link, relation != "link-to-sibling"


@settings(max_examples=40)
@given(
    relation=st.sampled_from(RELATIONS),
    overwrite=st.booleans(),
    planted_marker=st.booleans(),
    to=st.sampled_from(["native", "hf"]),
)
def test_no_output_path_changes_an_input_byte(relation, overwrite, planted_marker, to):
    """Whatever the relation of output to input, with or without --overwrite, even with a
    fusesurgery marker planted in the would-be output: no input byte changes, and overlapping
    outputs are refused."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = Path(shutil.copytree(EXAMPLES / "tiny-llama", root / "a" / "b" / "llama"))
        out, overlaps = _output_for(relation, source, root)
        if planted_marker and out.resolve().is_dir():
            (out.resolve() / MARKER_FILE).write_text("{}")
        inputs = snapshot(source)  # a marker planted in the input itself is part of it
        if overlaps:
            with pytest.raises(WriteError, match="input"):
                convert_checkpoint(source, out, to=to, overwrite=overwrite)
        else:
            result = convert_checkpoint(source, out, to=to, overwrite=overwrite)
            assert (result.written.out_dir / "model.safetensors").is_file()
        assert snapshot(source) == inputs
        leftovers = [name for dirpath, dirs, files in os.walk(root) for name in dirs + files
                     if ".partial-" in name or ".old-" in name]
        assert leftovers == []
