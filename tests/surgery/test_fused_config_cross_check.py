"""Every entry that reads a fused directory cross-checks ``fusion_config.json`` against the
weights and the tokenizer first: a stated size the weights contradict is refused before
anything of that size is built, a swapped ``source_keys`` pair is refused instead of renaming
one tensor as another, gate scalars must be what the config records, and each new token must
be an added token at its recorded id."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fusesurgery import load_fused, read_fused_config, unfuse, validate
from fusesurgery.convert.tokenizer import check_new_tokens_present
from fusesurgery.errors import ConfigError, ShapeError
from tests.hardening.conftest import assert_one_line_error, cli
from tests.hardening.test_no_hangs import bounded

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GATE = "decoder.layers.1.fusion_layer.ca_scale.scale"


@pytest.fixture
def fused(fused_example: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fused_example, tmp_path / "fused"))


def edit(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "fusion_config.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def set_tensor(directory: Path, key: str, value: float) -> None:
    """Rewrite the shard holding ``key`` with that tensor set to ``value`` (same dtype)."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][key]
    with safe_open(shard, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, shard, metadata=metadata)


def refused_everywhere(directory: Path, *fragments: str, inspect: bool = True) -> None:
    """The API and every command that reads a fused directory refuse it in one line, at
    once (bounded: a config that invents a size must not be iterated); ``inspect`` too,
    except for the tokenizer, which it does not read."""
    with bounded(60):
        if inspect:
            assert_one_line_error(cli("inspect", directory), *fragments)
        for call in (read_fused_config, load_fused, validate):
            with pytest.raises(ConfigError) as error:
                call(directory)
            for fragment in fragments:
                assert fragment in str(error.value), str(error.value)
        out = directory.parent / "out"
        for args in (("validate", directory), ("validate", directory, "--against",
                                               EXAMPLES / "tiny-llama"),
                     ("unfuse", directory, "-o", out), ("convert", directory, "-o", out),
                     ("push", directory, "alice/m", "--dry-run", "--quick")):
            assert_one_line_error(cli(*args), *fragments)
        assert not out.exists()


def _layers(count: int) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["decoder"].update(num_layers=count)


@pytest.mark.parametrize(("change", "fragments"), [
    (_layers(10**9), ("gives num_layers 1000000000, but the checkpoint holds 4;",)),
    (_layers(3), ("gives num_layers 3, but the checkpoint holds 4;",)),
    (lambda doc: doc["encoder"].update(num_layers=10**12),
     ("gives encoder num_layers 1000000000000, but the checkpoint holds 2;",)),
    (lambda doc: doc["fusion"].update(fusion_layers=[1]),
     ("gives fusion layers [1], but the checkpoint holds fusion layers [1, 3]",)),
], ids=["decoder-1e9", "decoder-fewer", "encoder-1e12", "fusion-layers"])
def test_a_stated_size_the_weights_contradict_is_refused_first(fused, change, fragments):
    edit(fused, change)
    refused_everywhere(fused, "fusion_config.json", *fragments)


def _swap(doc: dict[str, Any]) -> None:
    names = doc["sources"]["decoder"]["source_keys"]
    a, b = "layers.0.attn.q_proj.weight", "layers.1.attn.q_proj.weight"
    names[a], names[b] = names[b], names[a]


def test_swapped_source_keys_are_refused_not_renamed(fused):
    edit(fused, _swap)
    refused_everywhere(
        fused, "source_keys: 'model.layers.1.self_attn.q_proj.weight' is recorded as the "
        "source of 'layers.0.attn.q_proj.weight', but the hf key map gives "
        "'layers.1.attn.q_proj.weight'")


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda names: names.pop("norm.scale"), "names 38 tensors, the weights hold 39 decoder"),
    (lambda names: names.update({"norm.scale": "model.nope.weight"}),
     "'model.nope.weight' is recorded as the source of 'norm.scale', but the hf key map "
     "gives None"),
    (lambda names: names.update({"norm.scale": 7}), "must map native keys to source keys"),
])
def test_a_damaged_source_key_record_is_refused(fused, change, fragment):
    edit(fused, lambda doc: change(doc["sources"]["decoder"]["source_keys"]))
    with pytest.raises(ConfigError, match="source_keys") as error:
        unfuse(fused, fused.parent / "out")
    assert fragment in str(error.value)


def test_a_source_record_with_an_unknown_layout_is_refused(fused):
    edit(fused, lambda doc: doc["sources"]["decoder"].update(layout="gguf"))
    with pytest.raises(ConfigError, match=r"sources\['decoder'\].layout is 'gguf', not a "
                                          r"decoder layout \(hf, meta, native\)"):
        read_fused_config(fused)


def test_the_intact_record_still_unfuses_bit_for_bit(fused, tmp_path):
    unfuse(fused, tmp_path / "llama")
    assert (tmp_path / "llama" / "model.safetensors").read_bytes() == (
        EXAMPLES / "tiny-llama" / "model.safetensors").read_bytes()


def test_a_moved_gate_under_an_untrained_config_is_refused(fused):
    set_tensor(fused, GATE, 0.25)
    refused_everywhere(fused, "says the fusion is untrained", f"{GATE} is 0.25 in the weights")


def test_a_trained_flag_with_every_gate_zero_is_refused(fused):
    edit(fused, lambda doc: doc.update(trained=True))
    with pytest.raises(ConfigError, match="says the fusion is trained, but all 4 gates are "
                                          "exactly zero"):
        read_fused_config(fused)


def test_a_gate_record_that_differs_from_the_weights_is_refused(fused):
    set_tensor(fused, GATE, 0.25)
    edit(fused, lambda doc: doc.update(trained=True, gates={**doc["gates"], GATE: 0.5}))
    with pytest.raises(ConfigError, match=r"gates\['.*'\] is 0.5, but the weights hold 0.25"):
        load_fused(fused)
    edit(fused, lambda doc: doc.update(gates={**doc["gates"], GATE: 0.25}))
    model = load_fused(fused)  # the record agrees: a trained checkpoint loads
    assert model.decoder.layers[1].fusion_layer.ca_scale.scale.item() == 0.25


def _added(directory: Path, change: Callable[[list[dict[str, Any]]], None]) -> None:
    path = directory / "tokenizer.json"
    doc = json.loads(path.read_text())
    change(doc["added_tokens"])
    path.write_text(json.dumps(doc))


def _image_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return next(entry for entry in entries if entry["content"] == "<|image|>")


def test_an_image_token_at_an_existing_id_is_refused(fused):
    _added(fused, lambda entries: _image_entry(entries).update(id=5))
    refused_everywhere(fused, "tokenizer.json: '<|image|>' has id 5, which is",
                       "of the base vocabulary;", "fusion_config.json records id 512",
                       inspect=False)


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda entries: entries.remove(_image_entry(entries)),
     "the tokenizer has no added token '<|image|>'"),
    (lambda entries: _image_entry(entries).update(id=600),
     "tokenizer.json: '<|image|>' has id 600, but"),
    (lambda entries: _image_entry(entries).update(content="<|video|>"),
     "tokenizer.json: id 512 is '<|video|>', but"),
])
def test_a_tokenizer_that_disagrees_on_the_new_token_is_refused(fused, change, fragment):
    _added(fused, change)
    with pytest.raises(ConfigError) as error:
        read_fused_config(fused)
    assert fragment in str(error.value)


def _files(vocab: dict[str, int], added: list[tuple[str, int]]) -> dict[str, bytes]:
    doc = {"model": {"vocab": vocab},
           "added_tokens": [{"id": i, "content": token} for token, i in added]}
    return {"tokenizer.json": json.dumps(doc).encode()}


def test_new_tokens_against_a_tokenizer_unit():
    vocab = {"a": 0, "b": 1, "<|image|>": 2}
    check_new_tokens_present(_files({"a": 0, "b": 1}, [("<|image|>", 2)]), [("<|image|>", 2)],
                             "cfg")
    with pytest.raises(ConfigError, match="'<|image|>' is token 2 of the base vocabulary"):
        check_new_tokens_present(_files(vocab, []), [("<|image|>", 3)], "cfg")
    # no tokenizer, or no new tokens: nothing to check
    check_new_tokens_present({}, [("<|image|>", 2)], "cfg")
    check_new_tokens_present(_files(vocab, []), [], "cfg")


def test_rows_no_token_reaches_may_be_absent_but_not_taken():
    """Mllama's 8 fusion rows: its tokenizer holds <|image|> alone; the other rows' names
    may be missing, their ids not another token's."""
    files = _files({"a": 0, "b": 1}, [("<|image|>", 2)])
    tokens = [("<|image|>", 2), ("<|row_1|>", 3)]
    check_new_tokens_present(files, tokens, "cfg", optional=["<|row_1|>"])
    with pytest.raises(ConfigError, match="no added token '<|row_1|>'"):
        check_new_tokens_present(files, tokens, "cfg")
    taken = _files({"a": 0, "b": 1}, [("<|image|>", 2), ("<|other|>", 3)])
    with pytest.raises(ConfigError, match="id 3 is '<|other|>'"):
        check_new_tokens_present(taken, tokens, "cfg", optional=["<|row_1|>"])


def test_a_gate_that_is_not_one_element_is_a_shape_error(fused):
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    shard = fused / index["weight_map"][GATE]
    with safe_open(shard, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    tensors[GATE] = torch.zeros(3, dtype=tensors[GATE].dtype)
    save_file(tensors, shard, metadata=metadata)
    with pytest.raises(ShapeError, match=r"ca_scale.scale has shape \[3\], not the one element"):
        read_fused_config(fused)
    assert_one_line_error(cli("validate", fused), "not the one element of a tanh gate")
