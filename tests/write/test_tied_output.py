"""A tied decoder whose checkpoint also stores ``lm_head.weight`` (equal to the embedding, as
some exports write it): ``convert --to native`` and back ``--to hf``, and ``fuse`` ->
``unfuse``, give the input's keys back bitwise, for every decoder family with tied
embeddings. A stored head that differs from the table is not dropped: transformers 5.25 then
leaves the two untied and computes with both, and so does fusesurgery, with a note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusesurgery.write import convert_checkpoint
from fusesurgery.write.fuse_checkpoint import fuse
from fusesurgery.write.unfuse_checkpoint import unfuse_checkpoint
from tests.hardening.conftest import assert_one_line_error, cli

transformers = pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             tie_word_embeddings=True)
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "smollm3": "SmolLM3"}
SETTINGS = {"qwen3": dict(head_dim=8), "mistral": dict(sliding_window=None),
            "smollm3": dict(no_rope_layer_interval=2, pad_token_id=None, bos_token_id=None,
                            eos_token_id=None)}


def save_tied_with_head(family: str, directory: Path, *, differ: bool = False,
                        dtype: torch.dtype = torch.float32) -> Path:
    """transformers' tied *ForCausalLM, its file then given an lm_head.weight: the table's
    bytes (or, ``differ``, one value changed)."""
    name = FAMILIES[family]
    config = getattr(transformers, f"{name}Config")(**SIZES, **SETTINGS.get(family, {}))
    torch.manual_seed(0)
    getattr(transformers, f"{name}ForCausalLM")(config).to(dtype).save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in tensors  # transformers writes a tied head once
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    if differ:
        tensors["lm_head.weight"][3, 5] += 1
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_bitwise(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(
            ours[key].view(torch.uint8), tensor.view(torch.uint8)), key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_stored_tied_head_comes_back_through_native_and_fuse(tmp_path, family):
    dtype = torch.bfloat16 if family in ("qwen3", "llama") else torch.float32
    source = save_tied_with_head(family, tmp_path / "hf", dtype=dtype)
    original = tensors_of(source)

    native = tmp_path / "native"
    result = convert_checkpoint(source, native, to="native")
    assert "output.weight" not in tensors_of(native)  # a tied native model has no head
    assert dict(result.plan.dropped)["lm_head.weight"].endswith(
        "this stored copy equals it bit for bit and is written back as a copy of it in the hf "
        "layout")
    back = tmp_path / "back"
    convert_checkpoint(native, back, to="hf")
    assert_bitwise(tensors_of(back), original)
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text())
    hf_again = tmp_path / "hf-again"  # hf -> hf keeps it too
    convert_checkpoint(source, hf_again, to="hf")
    assert_bitwise(tensors_of(hf_again), original)

    for name, decoder in (("from-hf", source), ("from-native", native)):
        fused = tmp_path / f"fused-{name}"
        fuse(EXAMPLES / "tiny-clip-vision", decoder, fused, every=1)
        unfused = tmp_path / f"unfused-{name}"
        unfuse_checkpoint(fused, unfused, format="hf")
        assert_bitwise(tensors_of(unfused), original)
    # the merged table has the new rows: transformers ties the head to it
    merged = unfuse_checkpoint(tmp_path / "fused-from-hf", tmp_path / "merged", format="hf",
                               merge_embeddings=True)
    assert "lm_head.weight" not in tensors_of(tmp_path / "merged")
    assert any(note.startswith("lm_head.weight not written back: the merged table")
               for note in merged.notes), merged.notes


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_stored_tied_head_comes_back_through_unfuse_to_native(tmp_path, family):
    """fuse -> unfuse --format native carries the record into the native config.json, so
    convert --to hf of that native checkpoint gives the source's keys and bytes back."""
    source = save_tied_with_head(family, tmp_path / "hf")
    original = tensors_of(source)
    fused = tmp_path / "fused"
    fuse(EXAMPLES / "tiny-clip-vision", source, fused, every=1)
    native = tmp_path / "native"
    unfuse_checkpoint(fused, native, format="native")
    assert "output.weight" not in tensors_of(native)
    assert json.loads((native / "config.json").read_text())["tied_output_copy"] == (
        "lm_head.weight")
    back = tmp_path / "back"
    convert_checkpoint(native, back, to="hf")
    assert_bitwise(tensors_of(back), original)
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text())


def test_a_stored_head_that_differs_is_read_untied_as_transformers_does(tmp_path):
    from fusesurgery import load_decoder

    source = save_tied_with_head("qwen3", tmp_path / "hf", differ=True)
    original = tensors_of(source)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    assert theirs.lm_head.weight.data_ptr() != theirs.model.embed_tokens.weight.data_ptr()
    tokens = torch.arange(8)[None]
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert torch.equal(load_decoder(source)(tokens), expected)  # the stored head's logits
    note = ("lm_head.weight differs from model.embed_tokens.weight (1 of 2048 values; max "
            "|diff| 1) although the config says tie_word_embeddings: true: transformers then "
            "leaves them untied and computes with both, so this is read as the untied decoder")
    result = cli("convert", source, "-o", tmp_path / "native")
    assert result.exit_code == 0, result.output
    assert note in result.stderr and "dropped lm_head.weight" not in result.stderr
    assert torch.equal(tensors_of(tmp_path / "native")["output.weight"],
                       original["lm_head.weight"])
    convert_checkpoint(tmp_path / "native", tmp_path / "back", to="hf")
    assert_bitwise(tensors_of(tmp_path / "back"), original)
    # the config says what transformers built: the same model, untied
    assert json.loads((tmp_path / "back" / "config.json").read_text())[
        "tie_word_embeddings"] is False
    with torch.no_grad():
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "back")(tokens).logits, expected)

    fused = tmp_path / "fused"
    result = fuse(EXAMPLES / "tiny-clip-vision", source, fused, every=1)
    assert result.config.decoder.tie_word_embeddings is False
    assert "lm_head.weight" not in result.config.sources["decoder"]["dropped"]
    unfuse_checkpoint(fused, tmp_path / "unfused", format="hf")
    assert_bitwise(tensors_of(tmp_path / "unfused"), original)
    assert (tmp_path / "unfused" / "config.json").read_bytes() == (
        source / "config.json").read_bytes()
    assert cli("validate", fused, "--against", source).exit_code == 0


def test_a_record_that_does_not_fit_is_refused_in_one_line(tmp_path):
    source = save_tied_with_head("qwen2", tmp_path / "hf")
    convert_checkpoint(source, tmp_path / "native", to="native")
    path = tmp_path / "native" / "config.json"
    document = json.loads(path.read_text())
    document["tied_output_copy"] = "model.embed_tokens.weight"
    path.write_text(json.dumps(document))
    assert_one_line_error(cli("convert", tmp_path / "native", "-o", tmp_path / "back", "--to",
                              "hf"), "tied_output_copy 'model.embed_tokens.weight' does not "
                          "fit the decoder")
    assert not (tmp_path / "back").exists()
