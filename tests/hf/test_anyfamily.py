"""``fuse --format transformers``: decoders and towers fusesurgery has no native module for
(OLMo 2, Granite, GLM-4, Gemma 3 text; AIMv2, a SigLIP pair, CLIP), built with transformers'
own classes, fused into the transformers layout; then ``validate --against`` (bitwise through
transformers' classes), ``unfuse`` (bitwise, the source's own config.json), ``diff --values``
(identical); and the bad inputs around such a directory, one line each, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fusesurgery.cli.app import app

transformers = pytest.importorskip("transformers")
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=8)
# family -> (config class, model class, fields beyond SIZES)
DECODERS = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM",
              dict(vocab_size=512, pad_token_id=0, eos_token_id=2, bos_token_id=1)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                     attention_multiplier=0.0156)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM",
             dict(pad_token_id=0, eos_token_id=1, head_dim=16, partial_rotary_factor=0.5,
                  tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8)),
}
TOWERS = {
    "aimv2": ("Aimv2VisionConfig", "Aimv2VisionModel"),
    "siglip-pair": ("SiglipConfig", "SiglipModel"),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
}
# decoder, tower, extra fuse arguments
PAIRS = {
    "olmo2-aimv2": ("olmo2", "aimv2", ["--every", "2"]),
    "granite-siglip": ("granite", "siglip-pair", ["--layers", "1"]),
    "glm4-clip": ("glm4", "clip", ["--every", "1", "--fusion-after", "--projection", "linear"]),
    "gemma3-aimv2": ("gemma3", "aimv2", ["--every", "1"]),
}


def _save_decoder(family: str, directory: Path) -> Path:
    config_name, model_name, extra = DECODERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SIZES, **extra})
    getattr(transformers, model_name)(config).save_pretrained(directory)
    if family == "olmo2":  # a tokenizer of its vocabulary's size: the new token is added
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(EXAMPLES / "tiny-llama" / name, directory / name)
    return directory


def _save_tower(tower: str, directory: Path) -> Path:
    config_name, model_name = TOWERS[tower]
    torch.manual_seed(1)
    if tower == "siglip-pair":
        config = transformers.SiglipConfig(
            vision_config=VISION, text_config=dict(hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   vocab_size=40))
    else:
        config = getattr(transformers, config_name)(**VISION)
    getattr(transformers, model_name)(config).save_pretrained(directory)
    return directory


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def _one_line_exit_2(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("anyfamily")
    out = {}
    for name, (decoder, tower, args) in PAIRS.items():
        dec = _save_decoder(decoder, base / name / "decoder")
        enc = _save_tower(tower, base / name / "tower")
        target = base / name / "fused"
        result = runner.invoke(app, ["fuse", str(enc), str(dec), "-o", str(target),
                                     "--format", "transformers", *args])
        assert result.exit_code == 0, result.output
        out[name] = dict(decoder=dec, tower=enc, fused=target, stdout=result.stdout,
                         stderr=result.stderr)
    return out


@pytest.fixture(params=sorted(PAIRS))
def pair(request, fused) -> dict:
    return fused[request.param]


def test_validate_against_the_source_is_bit_for_bit(pair):
    result = runner.invoke(app, ["validate", str(pair["fused"]), "--against",
                                 str(pair["decoder"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bit_for_bit"] is True and report["identity"] is True
    names = [check["name"] for check in report["checks"]]
    assert any(name.startswith("logits with an image equal") for name in names)


def test_unfuse_is_a_prefix_strip_bitwise_with_the_sources_config(pair, tmp_path):
    for part, source in (("decoder", pair["decoder"]), ("encoder", pair["tower"])):
        out = tmp_path / part
        result = runner.invoke(app, ["unfuse", str(pair["fused"]), "-o", str(out),
                                     "--part", part])
        assert result.exit_code == 0, result.output
        original, back = _tensors(source), _tensors(out)
        if part == "encoder" and pair["tower"].parent.name == "granite-siglip":
            # the pair's vision half, under the names SiglipVisionModel gives it
            original = {k.removeprefix("vision_model."): v for k, v in original.items()
                        if k.startswith("vision_model.")}
        assert sorted(back) == sorted(original)
        assert all(torch.equal(original[k], back[k]) for k in original)
        if part == "decoder":
            assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
            diff = runner.invoke(app, ["diff", str(source), str(out), "--values"])
            assert diff.exit_code == 0 and "identical" in diff.stdout, diff.output
        else:  # the tower loads with its own class
            model = transformers.AutoModel.from_pretrained(out)
            assert model.config.hidden_size == VISION["hidden_size"]


def test_diff_of_an_export_and_its_decoder_aligns_the_decoder_under_its_part(fused):
    """`diff EXPORT DECODER`: the decoder's names are compared under `language_model.`, so
    every tensor is compared (it said "0 compared" and "different"); the fusion tensors are
    only in the export."""
    pair = fused["olmo2-aimv2"]
    result = runner.invoke(app, ["diff", str(pair["fused"]), str(pair["decoder"]), "--values"])
    assert result.exit_code == 1, result.output  # the export adds fusion tensors
    decoder = _tensors(pair["decoder"])
    assert f"{len(decoder)} equal, 0 different of {len(decoder)} compared" in result.stdout
    assert "B's under language_model." in result.stdout
    assert "only in B" not in result.stdout


def test_export_keys_are_the_sources_names_under_one_prefix(pair):
    exported = _tensors(pair["fused"])
    decoder = _tensors(pair["decoder"])
    for key, tensor in decoder.items():
        assert torch.equal(exported["language_model." + key], tensor)
    config = json.loads((pair["fused"] / "config.json").read_text())
    record = config["fusesurgery_fuse"]
    assert record["choices"]["fusion_num_heads"] == "the decoder's num_attention_heads"
    assert config["fusion_head_dim"] == (config["text_config"].get("head_dim") or 8)
    assert sum(k.endswith(".ca_scale.scale") for k in exported) == len(config["fusion_layers"])


def test_tied_and_untied_embeddings_are_what_the_sources_are(fused):
    for name, tied in (("glm4-clip", True), ("gemma3-aimv2", True), ("olmo2-aimv2", False)):
        config = json.loads((fused[name]["fused"] / "config.json").read_text())
        assert config["tie_word_embeddings"] is tied
        assert ("language_model.lm_head.weight" in _tensors(fused[name]["fused"])) is not tied


def test_the_new_token_is_added_to_the_tokenizer(fused):
    tokenizer = transformers.AutoTokenizer.from_pretrained(fused["olmo2-aimv2"]["fused"])
    assert tokenizer.convert_tokens_to_ids("<|image|>") == 512


def test_gemma_scales_the_new_rows_as_its_table(fused):
    from fusesurgery.hf import register_transformers

    register_transformers()
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        fused["gemma3-aimv2"]["fused"])
    scale = SIZES["hidden_size"] ** 0.5
    ids = torch.tensor([[3, 64]])
    with torch.no_grad():
        rows = model.embed_tokens(ids)
        table = model.get_input_embeddings()
    assert torch.equal(rows[0, 0], table.weight[3] * torch.tensor(scale))
    torch.testing.assert_close(rows[0, 1], model.fusion_embedding.weight[0] * scale)
    torch.testing.assert_close(rows[0, 1], table.weight.mean(0) * scale)  # the mean init


def test_a_family_with_no_native_module_is_fused_in_this_layout_with_a_note(fused, tmp_path):
    pair = fused["olmo2-aimv2"]
    out = tmp_path / "auto"
    result = runner.invoke(app, ["fuse", str(pair["tower"]), str(pair["decoder"]), "-o",
                                 str(out), "--every", "2"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "no native module" in line]
    assert notes == ["note: the decoder's family 'olmo2' has no native module: written in the "
                     "transformers layout (load it with AutoModelForImageTextToText)"]
    assert _tensors(out).keys() == _tensors(pair["fused"]).keys()


def test_a_native_family_gives_what_fuse_then_convert_gives(tmp_path):
    import fusesurgery
    from fusesurgery.hf import export_transformers

    tower, decoder = EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama"
    direct = fusesurgery.fuse(tower, decoder, tmp_path / "direct", format="transformers",
                              every=2, seed=3)
    assert direct.note is None
    fusesurgery.fuse(tower, decoder, tmp_path / "native", every=2, seed=3)
    export_transformers(tmp_path / "native", tmp_path / "converted")
    ours, theirs = _tensors(tmp_path / "direct"), _tensors(tmp_path / "converted")
    fusion = [k for k in theirs if not k.startswith(("language_model.", "vision_tower."))]
    assert fusion and sorted(k for k in ours if k in fusion) == sorted(fusion)
    assert all(torch.equal(ours[k], theirs[k]) for k in fusion)
    for key in ours:
        if key.startswith("language_model."):
            assert torch.equal(ours[key], theirs[key]), key
    for export in ("direct", "converted"):  # validate takes either, through transformers
        result = runner.invoke(app, ["validate", str(tmp_path / export), "--against",
                                     str(decoder), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["bit_for_bit"] is True
    result = runner.invoke(app, ["convert", str(tmp_path / "direct"), "-o", str(tmp_path / "x")])
    _one_line_exit_2(result, "fused straight into the transformers layout",
                     "fuse the sources without --format")


def test_convert_to_native_says_there_is_no_native_form(fused, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(fused["olmo2-aimv2"]["fused"]), "-o", str(out)])
    _one_line_exit_2(result, "family 'olmo2'", "no native module")
    assert not out.exists()


@pytest.mark.parametrize("to", ["meta", "hf", "mllama"])
def test_convert_to_another_format_says_there_is_no_native_form(fused, to, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(fused["olmo2-aimv2"]["fused"]), "--to", to,
                                 "-o", str(out)])
    _one_line_exit_2(result, "family 'olmo2'", "no native module", "no other format")
    assert "only --to native converts it" not in result.stderr
    assert not out.exists()


def test_generate_names_both_writers_of_the_layout(fused):
    result = runner.invoke(app, ["generate", str(fused["olmo2-aimv2"]["fused"]), "--prompt",
                                 "hi", "--max-new-tokens", "1"])
    _one_line_exit_2(result, "transformers layout", "fuse --format transformers",
                     "AutoModelForImageTextToText")


@pytest.fixture
def broken(fused, tmp_path) -> Path:
    """A copy of a fused directory to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(fused["glm4-clip"]["fused"], copy)
    return copy


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("command", ["validate", "unfuse"])
def test_a_family_this_transformers_lacks_names_it_and_the_version(broken, command, tmp_path):
    def edit(config):
        config["text_config"]["model_type"] = "glm99"
        config["text_config"]["transformers_version"] = "99.1.0"
    _edit_config(broken, edit)
    out = tmp_path / "out"
    args = [command, str(broken)] + (["-o", str(out)] if command == "unfuse" else [])
    result = runner.invoke(app, args)
    _one_line_exit_2(result, "'glm99'", f"unknown to transformers {transformers.__version__}",
                     "transformers >= 99.1.0")
    assert not out.exists()


@pytest.mark.parametrize(("damage", "fragments"), [
    ("modeling file", ("modeling_fusesurgery_fused.py is missing",)),
    ("sizes", ("its config.json needs",)),
    ("fusion sizes", ("its config.json needs",)),
    ("shard", ("model-00001-of-00003.safetensors",)),
])
@pytest.mark.parametrize("command", ["validate", "unfuse"])
def test_half_an_export_is_one_line_and_nothing_written(broken, damage, fragments, command,
                                                        tmp_path):
    if damage == "modeling file":
        (broken / "modeling_fusesurgery_fused.py").unlink()
    elif damage == "sizes":
        _edit_config(broken, lambda c: c["text_config"].update(intermediate_size=40))
    elif damage == "fusion sizes":
        _edit_config(broken, lambda c: c.update(fusion_intermediate_size=40))
    else:
        (broken / "model-00001-of-00003.safetensors").unlink()
    out = tmp_path / "out"
    args = [command, str(broken)] + (["-o", str(out)] if command == "unfuse" else [])
    result = runner.invoke(app, args)
    _one_line_exit_2(result, *fragments)
    assert not out.exists()


def test_output_path_rules_are_every_writers(fused, tmp_path):
    pair = fused["olmo2-aimv2"]
    inside = pair["decoder"] / "fused"
    result = runner.invoke(app, ["fuse", str(pair["tower"]), str(pair["decoder"]), "-o",
                                 str(inside), "--format", "transformers"])
    _one_line_exit_2(result, "lies inside the input")
    assert not inside.exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["fuse", str(pair["tower"]), str(pair["decoder"]), "-o",
                                 str(theirs), "--format", "transformers", "--overwrite"])
    assert result.exit_code == 2
    assert (theirs / "notes.txt").read_text() == "mine"
    again = runner.invoke(app, ["fuse", str(pair["tower"]), str(pair["decoder"]), "-o",
                                str(pair["fused"]), "--format", "transformers", "--overwrite",
                                "--every", "2"])
    assert again.exit_code == 0, again.output  # our own output is replaced


@pytest.mark.parametrize(("args", "fragment"), [
    (["--dtype", "bf16"], "--dtype is not supported with --format transformers"),
    (["--num-heads", "4"], "config overrides are not supported"),
    (["--encoder-tokens", "cls_and_patches", "--every", "1"],
     "(aimv2_vision_model) has no class token"),
])
def test_options_the_layout_cannot_honour_are_refused(fused, args, fragment, tmp_path):
    pair = fused["olmo2-aimv2"]
    out = tmp_path / "out"
    result = runner.invoke(app, ["fuse", str(pair["tower"]), str(pair["decoder"]), "-o",
                                 str(out), "--format", "transformers", *args])
    _one_line_exit_2(result, fragment)
    assert not out.exists()


@pytest.mark.parametrize(("part", "field", "fragment"), [
    ("vision_config", "num_hidden_layers", "num_hidden_layers 3, the weights hold 2 layers"),
    ("text_config", "hidden_size", "hidden_size 64, the weights' width is 32"),
])
def test_inspect_says_when_a_family_without_a_reader_has_an_edited_config(
        fused, tmp_path, part, field, fragment):
    # OLMo 2 and AIMv2 have no native reader: their layer count and width are checked
    broken = tmp_path / "copy"
    shutil.copytree(fused["olmo2-aimv2"]["fused"], broken)
    document = json.loads((broken / "config.json").read_text())
    document[part][field] = {"num_hidden_layers": 3, "hidden_size": 64}[field]
    (broken / "config.json").write_text(json.dumps(document))
    result = runner.invoke(app, ["inspect", str(broken), "--json"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert len(notes) == 1 and fragment in notes[0] and part in notes[0]


def test_inspect_reads_it_without_torch(fused, tmp_path):
    from tests.cli.test_startup import run_probed

    target = fused["granite-siglip"]["fused"]
    done, torch_imported = run_probed(tmp_path, "inspect", str(target))
    assert done.returncode == 0, done.stderr
    assert not torch_imported
    assert ("a transformers export (fuse --format transformers): siglip_vision_model tower -> "
            "granite text model") in done.stdout
    assert "identity: all gates 0 (2 gates)" in done.stdout
    assert "chose fusion_num_kv_heads: the decoder's num_key_value_heads" in done.stdout
    result = runner.invoke(app, ["inspect", str(target), "--json", "--keys"])
    report = json.loads(result.stdout)
    assert report["fusion"]["fusion_layers"] == [1] and report["notes"] == []
    assert {k["name"] for k in report["keys"]} == set(_tensors(target))


def test_saved_after_training_it_is_still_a_whole_export(fused, tmp_path):
    from fusesurgery.hf import register_transformers

    register_transformers()
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        fused["olmo2-aimv2"]["fused"])
    with torch.no_grad():
        model.cross_attention_layers["1"].ca_scale.scale.fill_(0.5)
    model.save_pretrained(tmp_path / "trained")
    for name in ("configuration_fusesurgery_fused.py", "modeling_fusesurgery_fused.py"):
        assert (tmp_path / "trained" / name).is_file(), name
    result = runner.invoke(app, ["validate", str(tmp_path / "trained"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identity"] is False and "the fusion is trained" in report["verdict"]
    out = tmp_path / "decoder"
    # save_pretrained carries no source/: the decoder's own tokenizer is gone, as for unfuse
    # of a native checkpoint without it, the part is written only when that is asked for
    result = runner.invoke(app, ["unfuse", str(tmp_path / "trained"), "-o", str(out)])
    _one_line_exit_2(result, "source/decoder/ lacks", "--allow-missing")
    result = runner.invoke(app, ["unfuse", str(tmp_path / "trained"), "-o", str(out),
                                 "--allow-missing"])
    assert result.exit_code == 0, result.output
    assert "written without" in result.stderr
    original = _tensors(fused["olmo2-aimv2"]["decoder"])
    assert all(torch.equal(v, _tensors(out)[k]) for k, v in original.items())


@pytest.mark.parametrize(("inputs", "fragment"), [
    (("decoder", "tower"), "swapped"),
    (("tower", "fused"), "DECODER is already a fused model (a transformers export)"),
])
def test_swapped_or_fused_inputs_are_named(fused, inputs, fragment, tmp_path):
    pair = fused["olmo2-aimv2"]
    out = tmp_path / "out"
    result = runner.invoke(app, ["fuse", *(str(pair[name]) for name in inputs), "-o",
                                 str(out), "--format", "transformers"])
    _one_line_exit_2(result, fragment)
    assert not out.exists()


def test_fuse_json_says_the_layout_and_every_choice(fused, tmp_path):
    pair = fused["granite-siglip"]
    result = runner.invoke(app, ["fuse", str(pair["tower"]), str(pair["decoder"]), "-o",
                                 str(tmp_path / "out"), "--layers", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "transformers"
    assert summary["decoder"]["family"] == "granite"
    assert summary["encoder"]["family"] == "siglip_vision_model"
    assert summary["choices"]["fusion_head_dim"] == (
        "the decoder's hidden_size // num_attention_heads")
    assert summary["notes"] == ["the decoder's family 'granite' has no native module: written "
                                "in the transformers layout (load it with "
                                "AutoModelForImageTextToText)"]


def test_fusing_a_family_this_transformers_lacks_names_it(fused, tmp_path):
    pair = fused["olmo2-aimv2"]
    decoder = tmp_path / "decoder"
    shutil.copytree(pair["decoder"], decoder)
    _edit_config(decoder, lambda c: c.update(model_type="olmo9", transformers_version="9.0.0"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["fuse", str(pair["tower"]), str(decoder), "-o", str(out)])
    _one_line_exit_2(result, "the decoder's family 'olmo9' is unknown to transformers",
                     "transformers >= 9.0.0")
    assert not out.exists()


def test_a_tower_whose_checkpoint_names_are_not_its_module_names(tmp_path):
    """DINOv2 saves ``attention.attention.key`` where transformers 5's module is
    ``attention.k_proj``: the export keeps the saved names, and every reader of it (unfuse,
    validate) expects the saved names, and transformers loads the tower's own weights."""
    import fusesurgery

    decoder = _save_decoder("olmo2", tmp_path / "decoder")
    torch.manual_seed(1)
    tower_model = transformers.Dinov2Model(transformers.Dinov2Config(**VISION))
    tower_model.save_pretrained(tmp_path / "tower")
    target = tmp_path / "fused"
    result = runner.invoke(app, ["fuse", str(tmp_path / "tower"), str(decoder), "-o",
                                 str(target), "--every", "1"])
    assert result.exit_code == 0, result.output
    assert "vision_tower.encoder.layer.0.attention.attention.key.weight" in _tensors(target)
    result = runner.invoke(app, ["unfuse", str(target), "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    again, source = _tensors(tmp_path / "again"), _tensors(decoder)
    assert again.keys() == source.keys()
    assert all(torch.equal(again[k], v) for k, v in source.items())
    result = runner.invoke(app, ["validate", str(target), "--against", str(decoder)])
    assert result.exit_code == 0, result.output
    fusesurgery.register_transformers()
    model = transformers.AutoModelForImageTextToText.from_pretrained(target,
                                                                     dtype=torch.float32)
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = tower_model(pixel_values=pixels).last_hidden_state
        got = model.vision_tower(pixel_values=pixels).last_hidden_state
    assert torch.equal(got, expected)


def test_nan_logits_are_no_bitwise_agreement(fused, tmp_path):
    """A text_config whose RoPE gives NaN logits (a NaN YaRN factor) computes the same NaN
    bits in the fused model and its own text model: that is a failure, not a pass."""
    copy = tmp_path / "copy"
    shutil.copytree(fused["olmo2-aimv2"]["fused"], copy)
    _edit_config(copy, lambda config: config["text_config"].update(rope_parameters={
        "rope_type": "yarn", "factor": float("nan"), "rope_theta": 10000.0}))
    result = runner.invoke(app, ["validate", str(copy)])
    assert result.exit_code != 0, result.output
    assert "non-finite logits" in result.output
    assert "all checks passed" not in result.output
