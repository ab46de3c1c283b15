"""``convert FUSED --to transformers`` of the families whose export needs more than a prefix:
Gemma 3 and Gemma 2 (fusion layers with ``(1 + w)`` RMSNorms, ``fusion_norm_unit_offset`` in
config.json; Gemma 3 with a window of 4 and a sequence longer than it) and a Phi-4-mini-like
Phi-3 (partial rotary 0.75, LongRoPE, tied; q/k/v and w1/w3 native tensors stacked back into
``qkv_proj`` / ``gate_up_proj``).

Sources are tiny transformers models (every norm weight drawn at random, where a norm of the
wrong kind shows), fused natively with a fusion layer at every decoder layer; the "trained"
copy has its gates open and its fusion norms' weights drawn at random too. The exports load
with ``AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)``.
"""

import json
from pathlib import Path

import pytest
import torch

import fusesurgery
from fusesurgery.io import FileRegion, open_checkpoint

transformers = pytest.importorskip("transformers")

WINDOW = 4
VOCAB = 64
IMAGE_ID = VOCAB  # <|image|>: the first id past the vocabulary
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
SOURCES = {
    # 3 layers, every 3rd global: layers 0 and 1 slide
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **SIZES, num_hidden_layers=3, head_dim=12, sliding_window=WINDOW,
        sliding_window_pattern=3, query_pre_attn_scalar=20, rope_local_base_freq=500.0)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **SIZES, num_hidden_layers=2, head_dim=12, sliding_window=WINDOW,
        query_pre_attn_scalar=12)),
    # a window on every layer, and LongRoPE past its 8 original positions (the inputs are 10
    # and 11 long): the long factors
    "phi4-mini": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **SIZES, num_hidden_layers=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        sliding_window=WINDOW,
        original_max_position_embeddings=8, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0],
            "long_factor": [2.0, 4.0, 8.0]},
        pad_token_id=None, bos_token_id=None, eos_token_id=None)),
}
# longer than the window: the sliding layers' masks matter
INPUTS = {
    "ids": torch.tensor([[1, 5, 9, IMAGE_ID, 7, 3, 11, 12, 13, 14, 15],
                         [2, 4, IMAGE_ID, 6, 8, 10, 12, 3, 5, 7, 9]]),
    "text": torch.tensor([[1, 5, 9, 7, 3, 11, 12, 13, 14, 15],
                          [2, 4, 6, 8, 10, 12, 3, 5, 7, 9]]),
    "pixels": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)),
}


def _random_norms(model: torch.nn.Module, only: str = "") -> torch.nn.Module:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and only in name:
                parameter.normal_(0.0, 0.5)
    return model


def _trained(fused: Path, out: Path) -> Path:
    """The fused checkpoint as after training: gates open, fusion norms away from zero."""
    model = fusesurgery.load_fused(fused)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ca_scale.scale", "mlp_scale.scale")) and "fusion_layer" in name:
                parameter.fill_(0.7)
    _random_norms(model, only="fusion_layer")
    fusesurgery.save_fused(model, out)
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(directory) as source:
        return {key: source.get_tensor(key).clone() for key in source.infos()}


def _assert_same_tensors(a: Path, b: Path) -> None:
    first, second = _tensors(a), _tensors(b)
    assert sorted(first) == sorted(second)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


def _load_export(directory: Path):
    return transformers.AutoModelForImageTextToText.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, Path]]:
    from fusesurgery.hf import export_transformers

    base = tmp_path_factory.mktemp("families")
    torch.manual_seed(1)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(base / "clip")
    out = {}
    for name, make in SOURCES.items():
        root = base / name
        torch.manual_seed(0)
        _random_norms(make()).save_pretrained(root / "decoder")
        fusesurgery.fuse(base / "clip", root / "decoder", root / "fused", every=1)
        _trained(root / "fused", root / "trained")
        for kind in ("fused", "trained"):
            export_transformers(root / kind, root / f"{kind}-hf")
        out[name] = {"root": root, "decoder": root / "decoder", "clip": base / "clip",
                     **{kind: root / kind for kind in ("fused", "trained", "fused-hf",
                                                       "trained-hf")}}
    return out


@pytest.fixture(params=sorted(SOURCES))
def family(request, built) -> dict[str, Path]:
    return {"name": request.param, **built[request.param]}


def test_logits_with_an_image_equal_load_fused(family):
    native = fusesurgery.load_fused(family["trained"]).eval()
    exported = _load_export(family["trained-hf"])
    ids, pixels = INPUTS["ids"], INPUTS["pixels"]
    s_e = native.fused_config.encoder.seq_len
    seen = ((ids == IMAGE_ID).cumsum(dim=1) > 0)[:, :, None].expand(-1, -1, s_e)
    with torch.no_grad():
        theirs = native(ids, encoder_input={"images": pixels}, encoder_mask=seen)
        ours = exported(input_ids=ids, pixel_values=pixels).logits
        zero = _load_export(family["fused-hf"])(input_ids=ids, pixel_values=pixels).logits
    assert not torch.equal(ours, zero)  # the gates and the fusion norms act
    if family["name"] == "gemma2":  # transformers computes its capped scores in eager code
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    else:
        assert torch.equal(ours, theirs)


def test_zero_gates_give_the_source_decoder_and_its_greedy_tokens(family):
    source = transformers.AutoModelForCausalLM.from_pretrained(
        family["decoder"], dtype=torch.float32).eval()
    exported = _load_export(family["fused-hf"])
    text, pixels = INPUTS["text"], INPUTS["pixels"]
    ids = INPUTS["ids"]
    with torch.no_grad():
        assert torch.equal(exported(input_ids=text).logits, source(text).logits)
        theirs = source.generate(text, max_new_tokens=2 * WINDOW, do_sample=False)
        assert torch.equal(exported.generate(input_ids=text, max_new_tokens=2 * WINDOW,
                                             do_sample=False), theirs)
        # with an image and its token: the zero gates add nothing either
        with_image = exported.generate(input_ids=ids, pixel_values=pixels,
                                       max_new_tokens=WINDOW, do_sample=False)
        plain = exported.generate(input_ids=ids, max_new_tokens=WINDOW, do_sample=False)
    assert torch.equal(with_image, plain)


def test_config_records_the_norm_kind(family):
    document = json.loads((family["fused-hf"] / "config.json").read_text())
    assert document["fusion_norm_unit_offset"] is family["name"].startswith("gemma")
    from fusesurgery.hf.inspect_export import inspect_export

    report = inspect_export(family["fused-hf"])  # inspect shows it
    assert report.fusion["fusion_norm_unit_offset"] is family["name"].startswith("gemma")
    assert "fusion_norm_unit_offset" in report.summary()
    layer = _load_export(family["fused-hf"]).cross_attention_layers["0"]
    assert {norm.unit_offset for norm in (layer.ca_norm, layer.mlp_norm, layer.attn.q_norm,
                                          layer.attn.k_norm)} == {
        family["name"].startswith("gemma")}


def test_back_to_native_and_unfuse_are_bitwise(family, tmp_path):
    from fusesurgery.hf import import_transformers, unfuse_export

    import_transformers(family["trained-hf"], tmp_path / "native")
    _assert_same_tensors(tmp_path / "native", family["trained"])
    config = json.loads((tmp_path / "native" / "fusion_config.json").read_text())
    trained = json.loads((family["trained"] / "fusion_config.json").read_text())
    # the fusion layers' gates alone (a Gemma decoder's post-norms are native mlp_scales too)
    assert config["trained"] is True and config["gates"] == trained["gates"]
    assert len(config["gates"]) == 2 * len(config["fusion"]["fusion_layers"])
    unfuse_export(family["trained-hf"], tmp_path / "decoder")
    _assert_same_tensors(tmp_path / "decoder", family["decoder"])
    unfused = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "decoder",
                                                                dtype=torch.float32)
    assert type(unfused).__name__ == type(transformers.AutoModelForCausalLM.from_pretrained(
        family["decoder"])).__name__


def test_phi3_stacked_tensors_are_one_byte_range_each_way(built):
    """The export writes ``qkv_proj`` from the native q, k and v as the one byte range they
    make up in the fused file, and the way back takes each part as a byte range of it."""
    from fusesurgery.hf.export import export_entries
    from fusesurgery.surgery.exported import checked_export
    from fusesurgery.surgery.fused import open_fused
    from fusesurgery.write.convert_checkpoint import plan_entry_source

    qkv = "language_model.model.layers.0.self_attn.qkv_proj.weight"
    with open_fused(built["phi4-mini"]["trained"]) as (view, config):
        entries = {e.target_key: e for e in export_entries(view.infos(), config, "fused")}
        stacked = entries[qkv]
        assert [part.source_key for part in stacked.parts] == [
            f"decoder.layers.0.attn.{p}_proj.weight" for p in "qkv"]
        assert isinstance(plan_entry_source(stacked, view), FileRegion)
        gate_up = entries["language_model.model.layers.1.mlp.gate_up_proj.weight"]
        assert [part.source_key for part in gate_up.parts] == [
            "decoder.layers.1.mlp.w1.weight", "decoder.layers.1.mlp.w3.weight"]
    with open_checkpoint(built["phi4-mini"]["trained-hf"]) as source:
        _, native_of = checked_export(source, "export")
        parts = native_of[qkv].parts
        assert [(key.rsplit(".", 2)[-2], start, stop) for key, start, stop, _ in parts] == [
            ("q_proj", 0, 32), ("k_proj", 32, 48), ("v_proj", 48, 64)]
        assert tuple(source.infos()[qkv].shape) == native_of[qkv].shape == (64, 32)


def test_fuse_format_transformers_of_gemma3_equals_native_fuse_then_export(built, tmp_path):
    from fusesurgery.hf.anyfamily import fuse_transformers

    gemma = built["gemma3"]
    fuse_transformers(gemma["clip"], gemma["decoder"], tmp_path / "direct",
                      options=fusesurgery.FuseOptions(every=1))
    _assert_same_tensors(tmp_path / "direct", gemma["fused-hf"])
    document = json.loads((tmp_path / "direct" / "config.json").read_text())
    assert document["fusion_norm_unit_offset"] is True
    assert "(1 + w)" in document["fusesurgery_fuse"]["choices"]["fusion_norm_unit_offset"]
    # and it computes what the converted export computes
    ids, pixels = INPUTS["ids"], INPUTS["pixels"]
    with torch.no_grad():
        assert torch.equal(_load_export(tmp_path / "direct")(input_ids=ids,
                                                             pixel_values=pixels).logits,
                           _load_export(gemma["fused-hf"])(input_ids=ids,
                                                           pixel_values=pixels).logits)


def test_validate_of_the_export_passes_its_transformers_row(family):
    report = fusesurgery.validate(family["trained-hf"], against=family["decoder"])
    rows = {check.name: check for check in report.checks}
    assert report.ok, report.summary() if hasattr(report, "summary") else report
    assert rows["transformers export's logits with an image equal load_fused's"].status == "pass"


@pytest.mark.parametrize("value", [False, None])
def test_an_edited_norm_kind_is_refused_with_nothing_written(built, tmp_path, value):
    """transformers builds the fusion norms from config.json's ``fusion_norm_unit_offset``,
    the way back from the fusion config it carries: a config.json where they disagree is one
    line (exit 2), nothing written."""
    import shutil

    from typer.testing import CliRunner

    from fusesurgery.cli.app import app

    edited = tmp_path / "edited"
    shutil.copytree(built["gemma3"]["trained-hf"], edited)
    document = json.loads((edited / "config.json").read_text())
    document["fusion_norm_unit_offset"] = value
    (edited / "config.json").write_text(json.dumps(document))
    result = CliRunner().invoke(app, ["convert", str(edited), "--to", "native", "-o",
                                      str(tmp_path / "native")])
    assert result.exit_code == 2, result.output
    assert "fusion_norm_unit_offset" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "native").exists()


def test_load_fused_of_the_export_is_the_native_model_bitwise(family):
    """``load_fused(EXPORT)`` in memory: the native model of the fused checkpoint, bitwise;
    Phi-3's stacked ``qkv_proj`` / ``gate_up_proj`` parts load as row views of the file."""
    from tests.hf.conftest import mapped_keys

    native = fusesurgery.load_fused(family["trained"])
    exported = fusesurgery.load_fused(family["trained-hf"])
    assert exported.fused_config == native.fused_config
    ids, pixels = INPUTS["ids"], INPUTS["pixels"]
    s_e = native.fused_config.encoder.seq_len
    seen = ((ids == IMAGE_ID).cumsum(dim=1) > 0)[:, :, None].expand(-1, -1, s_e)
    with torch.no_grad():
        logits = [model(ids, encoder_input={"images": pixels}, encoder_mask=seen)
                  for model in (native, exported)]
    assert torch.equal(*logits)
    keys = set(native.state_dict())
    assert mapped_keys(native, family["trained"]) == keys
    copied = keys - mapped_keys(exported, family["trained-hf"])
    # Gemma 2's q/k rows are stored in transformers' rotary order, its native one interleaves
    # them: those alone are rewritten; Gemma 3's and Phi-3's native order is transformers' own
    assert copied == ({key for key in keys if key.startswith("decoder.layers.")
                       and ".fusion_layer." not in key
                       and key.endswith(("attn.q_proj.weight", "attn.k_proj.weight"))}
                      if family["name"] == "gemma2" else set())
