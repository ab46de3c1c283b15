"""Half a transformers export, or one whose config.json was edited, is refused by every
command that reads exports: one ``error:`` line, exit 2, nothing written (and
``fusesurgery.load_fused`` raises FuseSurgeryError); ``inspect`` says what is wrong in a note.

An edited config.json matters because transformers builds the model from its ``text_config``,
``vision_config`` and fusion fields while fusesurgery reads the fusion config it carries: the
two must describe the same model. The export is the bundled examples fused (written by
transformers' own classes), exported in three shards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import fusesurgery
from tests.hardening.conftest import assert_one_line_error, cli

pytest.importorskip("transformers")
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_export(fused_example, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "hf"
    fusesurgery.export_transformers(fused_example, out, max_shard_size="300KB")
    assert (out / INDEX).is_file()
    return out


def _edit(directory: Path, change: Callable[[dict], None]) -> None:
    document = json.loads((directory / "config.json").read_text())
    change(document)
    (directory / "config.json").write_text(json.dumps(document))


def _drop_fusion_key(directory: Path) -> None:
    index = json.loads((directory / INDEX).read_text())
    key = next(k for k in index["weight_map"] if k.startswith("cross_attention_layers.")
               and k.endswith("ca_scale.scale"))
    shard = index["weight_map"].pop(key)
    tensors = load_file(directory / shard)
    del tensors[key]
    save_file(tensors, directory / shard, metadata={"format": "pt"})
    (directory / INDEX).write_text(json.dumps(index))


def _drop_last_shard(directory: Path) -> None:
    index = json.loads((directory / INDEX).read_text())
    (directory / sorted(set(index["weight_map"].values()))[-1]).unlink()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "modeling file missing": (
        lambda d: (d / "modeling_fusesurgery_fused.py").unlink(),
        "half a transformers export: modeling_fusesurgery_fused.py is missing"),
    "text_config edited": (
        lambda d: _edit(d, lambda c: c["text_config"].__setitem__("num_attention_heads", 2)),
        "its text_config gives num_heads 2, but its fusesurgery_fusion_config"),
    "vision_config edited": (
        lambda d: _edit(d, lambda c: c["vision_config"].__setitem__("layer_norm_eps", 1e-3)),
        "its vision_config gives norm_eps 0.001"),
    "fusion field edited": (
        lambda d: _edit(d, lambda c: c.__setitem__("fusion_layers", [0])),
        "fusion_layers is [0], but its fusesurgery_fusion_config"),
    "index names a missing shard": (
        _drop_last_shard, "which does not exist"),
    "a fusion key missing": (
        _drop_fusion_key, "missing ['cross_attention_layers.1.ca_scale.scale']"),
}
COMMANDS: dict[str, tuple[str, ...]] = {
    "validate": ("validate",),
    "unfuse": ("unfuse", "-o", "{out}"),
    "convert --to native": ("convert", "--to", "native", "-o", "{out}"),
    "generate": ("generate", "--prompt", "word3", "--max-new-tokens", "2"),
}


@pytest.fixture(params=list(DAMAGE))
def damaged(request, sharded_export, tmp_path) -> tuple[Path, str]:
    copy = Path(shutil.copytree(sharded_export, tmp_path / "damaged"))
    damage, fragment = DAMAGE[request.param]
    damage(copy)
    return copy, fragment


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_reader_refuses_it_in_one_line(damaged, command, tmp_path):
    directory, fragment = damaged
    out = tmp_path / "out"
    name, *rest = COMMANDS[command]
    argv = [name, directory, *(arg.format(out=out) for arg in rest)]
    assert_one_line_error(cli(*argv), fragment)
    assert not out.exists()


def test_load_fused_refuses_it(damaged):
    directory, fragment = damaged
    with pytest.raises(fusesurgery.FuseSurgeryError) as caught:
        fusesurgery.load_fused(directory)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("damage", ["fusion field edited", "vision_config edited"])
def test_inspect_notes_an_edit_the_shapes_do_not_show(sharded_export, tmp_path, damage):
    copy = Path(shutil.copytree(sharded_export, tmp_path / "edited"))
    DAMAGE[damage][0](copy)
    result = cli("inspect", copy)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and DAMAGE[damage][1] in notes[0], result.stdout
    assert "note:" not in cli("inspect", sharded_export).stdout
