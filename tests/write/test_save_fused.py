"""``save_fused``: whatever the model went through (a float32 cast for training, trained
originals, the fused decoder alone), the directory it writes passes ``fusesurgery validate``
and says honestly what it holds; what it cannot write honestly it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fusesurgery
from fusesurgery.errors import ConfigError, ValidationError, WriteError
from fusesurgery.hub.card import fusion_rows
from fusesurgery.surgery.fuse_plan import native_key_of
from fusesurgery.surgery.fused import build_fused_model
from fusesurgery.validate.checks import validate_layout
from tests.hardening.conftest import cli, snapshot
from tests.mllama_models import save_mllama_causal
from tests.reports.diff_checkpoints import HF_DECODER, HF_VISION

GATE = "decoder.layers.0.fusion_layer.ca_scale.scale"
NORM = "decoder.norm.scale"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and CLIP stored in bfloat16, as most released checkpoints are, and their
    fusion. Shared: tests write elsewhere."""
    import transformers

    root = tmp_path_factory.mktemp("save_fused")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_DECODER)).to(
        torch.bfloat16).save_pretrained(root / "llama")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_VISION)).to(
        torch.bfloat16).save_pretrained(root / "clip")
    fusesurgery.fuse(root / "clip", root / "llama", root / "fused", every=1)
    return {"decoder": root / "llama", "encoder": root / "clip", "fused": root / "fused"}


def _train(model, steps: int = 2) -> None:
    """A few AdamW steps on random tokens and images: moves every trainable parameter."""
    config = model.fused_config
    generator = torch.Generator().manual_seed(0)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for _ in range(steps):
        tokens = torch.randint(0, config.decoder.vocab_size, (1, 6), generator=generator)
        tokens[:, 2] = config.new_tokens[0].id
        images = torch.randn(1, 3, config.encoder.image_size, config.encoder.image_size,
                             generator=generator)
        mask = torch.zeros(1, 6, config.encoder.seq_len, dtype=torch.bool)
        mask[:, 2:] = True
        logits = model(tokens, encoder_input={"images": images}, encoder_mask=mask)
        optimizer.zero_grad()
        logits.float().square().mean().backward()
        optimizer.step()


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def _config(directory: Path) -> dict:
    return json.loads((directory / "fusion_config.json").read_text())


def _assert_validates(directory: Path, against: Path | None = None):
    report = fusesurgery.validate(directory, against=against)
    assert report.ok, report.summary()
    return report


def test_a_model_cast_to_float32_for_training_is_saved_in_the_stored_dtypes(sources, tmp_path):
    model = fusesurgery.load_fused(sources["fused"], dtype=torch.float32)
    _train(model)
    out = tmp_path / "trained"
    fusesurgery.save_fused(model, out)

    stored, saved = _tensors(sources["fused"]), _tensors(out)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    state = model.state_dict()
    for key, tensor in saved.items():
        if "fusion" in key or key.startswith("encoder.projection."):  # trained, cast back
            assert torch.equal(_bits(tensor), _bits(state[key].to(torch.bfloat16))), key
        else:  # frozen originals: the source's own bytes
            assert torch.equal(_bits(tensor), _bits(stored[key])), key
    config = _config(out)
    assert config["dtypes"] == _config(sources["fused"])["dtypes"]
    assert config["trained"] is True and config["trained_originals"] == []
    assert config["gates"][GATE] == float(state[GATE].to(torch.bfloat16))

    report = _assert_validates(out)
    assert report.identity is False
    fusesurgery.unfuse(out, tmp_path / "unfused")  # the decoder as fused: bfloat16
    unfused = _tensors(tmp_path / "unfused")
    assert {t.dtype for t in unfused.values()} == {torch.bfloat16}


def test_dtype_records_the_new_dtype_so_every_command_accepts_it(sources, tmp_path):
    model = fusesurgery.load_fused(sources["fused"], dtype=torch.float32)
    _train(model)
    out = tmp_path / "float32"
    fusesurgery.save_fused(model, out, dtype=torch.float32)

    saved, state = _tensors(out), model.state_dict()
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for key, tensor in saved.items():
        assert torch.equal(_bits(tensor), _bits(state[key])), key
    config = _config(out)
    assert config["dtypes"] == {"decoder": "float32", "encoder": "float32", "fusion": "float32"}
    assert config["sources"]["decoder"]["tensor_dtypes"] == ["float32"]
    assert config["trained_originals"] == []  # exact upcasts of the bfloat16 originals
    _assert_validates(out, against=sources["decoder"])
    result = cli("validate", out)  # the command agrees
    assert result.exit_code == 0, result.output
    fusesurgery.unfuse(out, tmp_path / "unfused")
    assert {t.dtype for t in _tensors(tmp_path / "unfused").values()} == {torch.float32}


def test_trained_originals_are_recorded_and_validate_stops_claiming_identity(sources,
                                                                             tmp_path):
    model = fusesurgery.load_fused(sources["fused"], dtype=torch.float32)
    with torch.no_grad():
        model.decoder.norm.scale.add_(0.25)  # what decoder_trainable training does
    out = tmp_path / "decoder-trained"
    fusesurgery.save_fused(model, out)

    assert torch.equal(_tensors(out)[NORM], model.decoder.norm.scale.to(torch.bfloat16))
    config = _config(out)
    assert config["trained_originals"] == [NORM]
    assert config["trained"] is True and "1 original tensors differ" in config["identity"]
    assert all(value == 0.0 for value in config["gates"].values())
    report = _assert_validates(out)
    assert report.identity is False
    rows = {check.name: check for check in report.checks}
    assert rows["original tensors are the sources'"].figure == "1 changed by training"
    card = dict(fusion_rows(fusesurgery.read_fused_config(out)))  # push's model card
    assert card["gates"].startswith("trained: 1 original tensors differ")
    assert "computes exactly" not in (out / "README.md").read_text()


def test_trained_originals_naming_no_original_tensor_fail_validation(sources, tmp_path):
    out = tmp_path / "saved"
    fusesurgery.save_fused(fusesurgery.load_fused(sources["fused"]), out)
    config = _config(out)
    config["trained_originals"] = [GATE]  # a new tensor: nothing to be original about
    (out / "fusion_config.json").write_text(json.dumps(config))
    report = validate_layout(out)
    assert not report.ok and "trained_originals naming no original tensor" in report.summary()


def test_the_fused_decoder_alone_is_saved_with_its_sources_encoder_side(sources, tmp_path):
    decoder = fusesurgery.load_fused(sources["fused"], part="decoder", dtype=torch.float32)
    with torch.no_grad():
        decoder.get_parameter("layers.0.fusion_layer.ca_scale.scale").fill_(0.5)
    out = tmp_path / "decoder-only"
    fusesurgery.save_fused(decoder, out)

    stored, saved = _tensors(sources["fused"]), _tensors(out)
    assert saved.keys() == stored.keys()
    for key in (k for k in stored if k.startswith("encoder.")):  # copied as stored
        assert torch.equal(_bits(saved[key]), _bits(stored[key])), key
    assert _config(out)["gates"][GATE] == 0.5
    report = _assert_validates(out)
    assert report.identity is False


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_parameters_are_refused_by_name(sources, tmp_path, value):
    model = fusesurgery.load_fused(sources["fused"], dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter(GATE).fill_(value)
        model.decoder.norm.scale[0] = value
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"refusing to save 2 tensors holding NaN or inf "
                                              rf"\(({GATE}, {NORM}|{NORM}, {GATE})\)"):
        fusesurgery.save_fused(model, out)
    assert not out.exists()


def test_a_value_that_overflows_the_written_dtype_is_refused(sources, tmp_path):
    model = fusesurgery.load_fused(sources["fused"], dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter(GATE).fill_(1e6)  # finite in float32, inf in float16
    with pytest.raises(ValidationError, match=GATE):
        fusesurgery.save_fused(model, tmp_path / "out", dtype=torch.float16)


def test_the_directory_the_model_reads_is_refused_even_through_like(sources, tmp_path):
    other = tmp_path / "other"
    fusesurgery.save_fused(fusesurgery.load_fused(sources["fused"]), other)
    own = tmp_path / "own"
    fusesurgery.save_fused(fusesurgery.load_fused(other), own)
    model = fusesurgery.load_fused(own)  # mapped from own's files
    before = snapshot(own)
    for out in (own, own / "inside"):
        with pytest.raises(WriteError, match="never written to"):
            fusesurgery.save_fused(model, out, like=other, overwrite=True)
    with pytest.raises(WriteError, match="never written to"):  # like is read too
        fusesurgery.save_fused(model, other, like=other, overwrite=True)
    assert snapshot(own) == before


def test_python_callers_are_told_overwrite_true(sources, tmp_path):
    model = fusesurgery.load_fused(sources["fused"])
    fusesurgery.save_fused(model, tmp_path / "out")
    with pytest.raises(WriteError, match=r"\(pass overwrite=True\)$") as refused:
        fusesurgery.save_fused(model, tmp_path / "out")
    assert "--overwrite" not in str(refused.value)
    fusesurgery.save_fused(model, tmp_path / "out", overwrite=True)


def test_what_is_not_a_fused_model_is_refused(sources, tmp_path):
    with pytest.raises(ConfigError, match="not TransformerDecoder"):
        fusesurgery.save_fused(fusesurgery.load_decoder(sources["decoder"]), tmp_path / "out",
                               config=fusesurgery.read_fused_config(sources["fused"]))
    with pytest.raises(ConfigError, match="dtype must be one of"):
        fusesurgery.save_fused(fusesurgery.load_fused(sources["fused"]), tmp_path / "out",
                               dtype=torch.int8)
    assert not (tmp_path / "out").exists()


def test_a_decoder_from_an_mllama_checkpoint_is_refused(tmp_path):
    mllama = save_mllama_causal(tmp_path / "mllama")
    decoder = fusesurgery.load_fused(mllama, part="decoder")
    with pytest.raises(ConfigError, match="Mllama checkpoint"):
        fusesurgery.save_fused(decoder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_its_checkpoint_no_original_is_claimed_unchanged(sources, tmp_path):
    config = fusesurgery.read_fused_config(sources["fused"])
    model = build_fused_model(config)  # no checkpoint behind it: its originals are unknown
    model.load_state_dict(fusesurgery.load_fused(sources["fused"]).state_dict())
    out = tmp_path / "out"
    fusesurgery.save_fused(model, out, config=config)
    recorded = _config(out)["trained_originals"]
    assert recorded and all(native_key_of(key) is not None for key in recorded)
    assert len(recorded) == sum(native_key_of(key) is not None for key in model.state_dict())
    assert validate_layout(out).ok
