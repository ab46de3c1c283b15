"""The transformers export of a fused SigLIP2 NaFlex tower: the exported model feeds its
``Siglip2VisionModel`` the patches, ``pixel_attention_mask`` and ``spatial_shapes``, and masks
the padding patches out of the cross-attention as the native model does, so with nonzero gates
and two images of different sizes padded in one batch its logits and greedy tokens are
``load_fused``'s; zero gates give the source decoder's logits; the processor is the tower's
own ``Siglip2ImageProcessor``; ``fuse --format transformers`` writes the same tensors; the
way back is bitwise; and it loads with transformers alone. Sources are written by
transformers' own classes (the tower by ``tests/surgery/test_siglip2_naflex.py``'s helper,
the decoder is the bundled tiny Llama)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app
from tests.hf.conftest import open_gates
from tests.surgery.test_siglip2_naflex import BUDGET, _images, save_naflex

transformers = pytest.importorskip("transformers")
runner = CliRunner()
HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"
DECODER = EXAMPLES / "tiny-llama"
IMAGE = "<|image|>"
IMAGE_ID = 512  # the tiny Llama has 512 rows; <|image|> is the first new token
# as many tokens each (bitwise: no padding mask in the self-attention) and left-padded
TEXTS = [f"word5 {IMAGE} word42 word7 word1", f"word9 word3 word8 {IMAGE} word11"]
PADDED_TEXTS = [f"word5 {IMAGE} word42 word7", f"word9 word3 word8 {IMAGE} word11"]


@pytest.fixture(scope="module")
def naflex(tmp_path_factory) -> dict[str, Path]:
    """The tower, its native fusion (zero and open gates) and both exported."""
    from fusesurgery.hf import export_transformers, register_transformers

    register_transformers()
    root = tmp_path_factory.mktemp("naflex-export")
    tower = save_naflex(root / "tower")
    fusesurgery.fuse(tower, DECODER, root / "fused", every=1)
    gated = open_gates(root / "fused", root / "gated")
    export_transformers(root / "fused", root / "zero-hf")
    export_transformers(gated, root / "hf")
    return dict(root=root, tower=tower, fused=root / "fused", gated=gated,
                zero_export=root / "zero-hf", export=root / "hf")


def _model(directory: Path):
    return transformers.AutoModelForImageTextToText.from_pretrained(
        directory, dtype=torch.float32).eval()


def _processor(directory: Path):
    return transformers.AutoProcessor.from_pretrained(directory)


def _batch(export: Path, texts: list[str] = TEXTS):
    """Two images of different sizes (a 30 x 50 and a 40 x 20 one), each sample's patches
    padded to the budget."""
    return _processor(export)(images=[[image] for image in _images()[:2]], text=texts)


def _native_inputs(fused: Path, batch, texts: list[str] = TEXTS):
    """fusesurgery's own processor on the same texts and images, with the exported
    processor's patches (the two image pipelines round differently: checked close)."""
    native = fusesurgery.load_processor(fused)(texts, [[image] for image in _images()[:2]],
                                               padding_side="left")
    real = batch["attention_mask"].bool()
    assert torch.equal(real, native.padding_mask)
    assert torch.equal(batch["input_ids"][real], native.tokens[native.padding_mask])
    for key in ("pixel_attention_mask", "spatial_shapes"):
        assert torch.equal(batch[key].long(), native.encoder_input[key].long()), key
    torch.testing.assert_close(batch["pixel_values"], native.encoder_input["pixel_values"],
                               rtol=0, atol=1e-6)
    patches = {key: batch[key] for key in ("pixel_values", "pixel_attention_mask",
                                           "spatial_shapes")}
    return dataclasses.replace(native, encoder_input=patches)


def test_config_records_the_naflex_tower(naflex):
    document = json.loads((naflex["export"] / "config.json").read_text())
    assert document["vision_naflex"] is True
    assert document["vision_config"]["model_type"] == "siglip2_vision_model"
    model = _model(naflex["export"])
    assert type(model.vision_tower).__name__ == "Siglip2VisionModel"
    assert type(_processor(naflex["export"]).image_processor).__name__.startswith(
        "Siglip2ImageProcessor")


def test_the_processor_returns_the_patches_their_mask_and_shapes(naflex):
    batch = _batch(naflex["export"])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask",
                          "spatial_shapes", "cross_attention_mask"}
    assert batch["pixel_values"].shape == (2, BUDGET, 3 * 4 * 4)
    real = batch["pixel_attention_mask"].bool()
    assert real.sum(dim=1).tolist() == batch["spatial_shapes"].prod(dim=1).tolist()
    assert len(set(batch["spatial_shapes"].tolist()[0])) == 2 and not bool(real.all())
    tokens = batch["input_ids"]
    assert torch.equal(batch["cross_attention_mask"][..., 0],
                       (tokens == IMAGE_ID).cumsum(dim=1) > 0)
    native = _native_inputs(naflex["fused"], batch)
    # the model's mask is fusesurgery's encoder mask: the image token on, padding patches off
    s_e = batch["pixel_values"].shape[1]
    per_patch = batch["cross_attention_mask"].repeat_interleave(s_e, dim=-1) & real[:, None]
    assert torch.equal(per_patch[batch["attention_mask"].bool()],
                       native.encoder_mask[native.padding_mask])
    # a sample without an image: one masked dummy patch of a 1 x 1 grid, as fusesurgery's
    mixed = _processor(naflex["export"])(images=[[_images()[0]], []],
                                         text=[f"word5 {IMAGE} word42", "word7 word8"])
    assert mixed["spatial_shapes"][1].tolist() == [1, 1]
    assert mixed["pixel_attention_mask"][1].tolist() == [1] + [0] * (BUDGET - 1)
    assert not bool(mixed["cross_attention_mask"][1].any())


@pytest.mark.parametrize("texts", [TEXTS, PADDED_TEXTS], ids=["same-length", "left-padded"])
def test_logits_of_two_padded_images_equal_load_fused(naflex, texts):
    batch = _batch(naflex["export"], texts)
    inputs = _native_inputs(naflex["gated"], batch, texts)
    model = _model(naflex["export"])
    native = fusesurgery.load_fused(naflex["gated"], dtype=torch.float32).eval()
    real = batch["pixel_attention_mask"].bool()
    assert not bool(real.all())  # the smaller image's patches are padded
    noisy = dict(batch)  # padding patches of random values: masked out, nothing changes
    noisy["pixel_values"] = batch["pixel_values"].clone()
    noisy["pixel_values"][~real] = torch.randn(int((~real).sum()), batch["pixel_values"].shape[-1],
                                               generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = native(inputs.tokens, mask=inputs.mask, input_pos=inputs.input_pos,
                          encoder_input=inputs.encoder_input, encoder_mask=inputs.encoder_mask)
        given = model(**batch).logits
        derived = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"],
                        pixel_attention_mask=batch["pixel_attention_mask"],
                        spatial_shapes=batch["spatial_shapes"]).logits
        padded_noise = model(**noisy).logits
        text_only = model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits
    attended = batch["attention_mask"].bool()
    if texts is TEXTS:
        assert torch.equal(given, expected)
    else:  # left padding: the decoder's masked self-attention is transformers' own kernel,
        # not fusesurgery's (text-only logits differ by as much)
        torch.testing.assert_close(given[attended], expected[attended], rtol=0, atol=1e-5)
    assert torch.equal(derived, given)  # no mask given: the processor's, derived
    assert torch.equal(padded_noise, given)
    assert not torch.allclose(given[attended], text_only[attended], atol=1e-3)  # the image acts


def test_zero_gates_give_the_source_decoders_logits(naflex):
    model = _model(naflex["zero_export"])
    source = transformers.AutoModelForCausalLM.from_pretrained(
        DECODER, dtype=torch.float32).eval()
    batch = _batch(naflex["zero_export"])
    ids, attention = batch["input_ids"], batch["attention_mask"]
    text = ids.masked_fill(ids == IMAGE_ID, 7)
    with torch.no_grad():
        assert torch.equal(model(input_ids=text, attention_mask=attention).logits,
                           source(input_ids=text, attention_mask=attention).logits)
        # with the image: the source is given the image token's fused row as an embedding
        embeds = source.get_input_embeddings()(ids.clamp(max=IMAGE_ID - 1))
        embeds[ids == IMAGE_ID] = model.fusion_embedding.weight[0]
        assert torch.equal(model(**batch).logits,
                           source(inputs_embeds=embeds, attention_mask=attention).logits)


def test_greedy_generate_equals_load_fused_generation(naflex):
    batch = _batch(naflex["export"], PADDED_TEXTS)
    inputs = _native_inputs(naflex["gated"], batch, PADDED_TEXTS)
    model = _model(naflex["export"])
    native = fusesurgery.load_fused(naflex["gated"], dtype=torch.float32).eval()
    expected = fusesurgery.generate(native, inputs, max_new_tokens=5).tokens
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated[:, batch["input_ids"].shape[1]:], expected)
    # no cached decoding step sees a padding patch: random ones change no step's logits
    real = batch["pixel_attention_mask"].bool()
    noisy = dict(batch)
    noisy["pixel_values"] = batch["pixel_values"].clone()
    noisy["pixel_values"][~real] = torch.randn(int((~real).sum()), batch["pixel_values"].shape[-1],
                                               generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        steps = [model.generate(**given, max_new_tokens=5, do_sample=False, output_logits=True,
                                return_dict_in_generate=True).logits
                 for given in (batch, noisy)]
    assert all(torch.equal(a, b) for a, b in zip(*steps, strict=True))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def _bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype and tensor.shape == theirs[key].shape, key
        assert torch.equal(tensor.view(torch.uint8), theirs[key].view(torch.uint8)), key


def test_fuse_format_transformers_gives_the_same_tensors(naflex, tmp_path):
    direct = tmp_path / "direct"
    result = runner.invoke(app, ["fuse", str(naflex["tower"]), str(DECODER), "-o", str(direct),
                                 "--format", "transformers", "--every", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((direct / "config.json").read_text())["vision_naflex"] is True
    ours, theirs = _tensors(direct), _tensors(naflex["zero_export"])
    # the direct fusion keeps the tower's pooling head, which the native fuse leaves out
    assert {k for k in ours if k not in theirs} == {k for k in ours
                                                    if k.startswith("vision_tower.head.")}
    _bitwise({k: v for k, v in ours.items() if k in theirs}, theirs)
    model, exported = _model(direct), _model(naflex["zero_export"])
    for loaded in (model, exported):
        with torch.no_grad():
            for name, param in loaded.named_parameters():
                if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
                    param.fill_(0.7)
    batch = _batch(direct)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, exported(**batch).logits)
    result = runner.invoke(app, ["validate", str(direct), "--against", str(DECODER), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bit_for_bit"] is True


def test_back_to_native_and_unfuse_are_bitwise(naflex, tmp_path):
    result = runner.invoke(app, ["convert", str(naflex["export"]), "--to", "native", "-o",
                                 str(tmp_path / "native")])
    assert result.exit_code == 0, result.output
    with fusesurgery.io.open_checkpoint(naflex["gated"]) as a, \
            fusesurgery.io.open_checkpoint(tmp_path / "native") as b:
        _bitwise({k: a.get_tensor(k) for k in a.keys()}, {k: b.get_tensor(k) for k in b.keys()})
    for part, source in (("decoder", DECODER), ("encoder", naflex["tower"])):
        out = tmp_path / part
        result = runner.invoke(app, ["unfuse", str(naflex["export"]), "--part", part, "-o",
                                     str(out)])
        assert result.exit_code == 0, result.output
        kept = {k: v for k, v in _tensors(source).items() if not k.startswith("head.")}
        _bitwise(_tensors(out), kept)  # SigLIP2's pooling head is not fused: left out
    result = runner.invoke(app, ["validate", str(naflex["export"]), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["checks"]}
    row = rows["transformers export's logits with an image equal load_fused's"]
    assert row["status"] == "pass" and row["figure"] == "bitwise equal", row


def test_loads_with_transformers_alone(naflex, tmp_path):
    script = HERE / "process_without_fusesurgery.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # this export's code, not a cached one
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # bitwise below: the same reductions
    run = subprocess.run([sys.executable, str(script), str(naflex["export"]),
                          str(tmp_path / "r.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    remote = torch.load(tmp_path / "r.pt", weights_only=True)
    assert remote["fusesurgery_imported"] is False
    image = torch.randint(0, 256, (3, 40, 48), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    local = _processor(naflex["export"])(images=[[image], []],
                                         text=[f"word5 {IMAGE} word42", "word7 word8"])
    assert set(remote["inputs"]) == set(local) and "spatial_shapes" in local
    assert all(torch.equal(remote["inputs"][k], local[k]) for k in local)
    model = _model(naflex["export"])
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(**local).logits)
        assert torch.equal(remote["generated"],
                           model.generate(**local, max_new_tokens=3, do_sample=False))


def test_inputs_of_the_wrong_kind_are_named(naflex, gated_export):
    model = _model(naflex["export"])
    batch = _batch(naflex["export"])
    with pytest.raises(ValueError, match="spatial_shapes"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"NaFlex tower takes pixel_values \[b, n_patches, 48\]"):
        model(input_ids=batch["input_ids"], pixel_values=torch.zeros(2, 3, 16, 16),
              spatial_shapes=batch["spatial_shapes"])
    with pytest.raises(ValueError, match="pixel_attention_mask must be"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
              spatial_shapes=batch["spatial_shapes"],
              pixel_attention_mask=batch["pixel_attention_mask"][:, :3])
    other = _model(gated_export)  # a CLIP tower takes images, not patches
    with pytest.raises(ValueError, match="NaFlex inputs"):
        other(input_ids=batch["input_ids"], pixel_values=torch.zeros(2, 3, 32, 32),
              spatial_shapes=batch["spatial_shapes"])


@pytest.mark.parametrize("value", [False, None, "left out"])
def test_an_edited_vision_naflex_is_refused_with_nothing_written(naflex, tmp_path, value):
    """The exported code feeds the tower by config.json's ``vision_naflex``, the way back
    reads the fusion config it carries: where they disagree, one line, exit 2."""
    edited = tmp_path / "edited"
    shutil.copytree(naflex["export"], edited)
    document = json.loads((edited / "config.json").read_text())
    if value == "left out":  # the exported classes then default it to false
        del document["vision_naflex"]
    else:
        document["vision_naflex"] = value
    (edited / "config.json").write_text(json.dumps(document))
    result = runner.invoke(app, ["convert", str(edited), "--to", "native", "-o",
                                 str(tmp_path / "native")])
    assert result.exit_code == 2, result.output
    assert "vision_naflex" in result.output and "edited" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "native").exists()


def test_several_images_per_sample(naflex):
    """``[b, n, P, c*p*p]`` patches (a sample with two images): the text between the first
    and the second image token sees the first image only, exactly as a sample that has the
    first image alone and ends there; after the second token it sees the second."""
    model = _model(naflex["export"])
    processor = _processor(naflex["export"])
    first, second = _images()[:2]
    both = processor(images=[[first, second]], text=[f"{IMAGE} word5 word6 {IMAGE} word7"])
    alone = processor(images=[[first]], text=[f"{IMAGE} word5 word6"])
    swapped = processor(images=[[first, first]], text=[f"{IMAGE} word5 word6 {IMAGE} word7"])
    assert both["pixel_values"].shape == (1, 2, BUDGET, 3 * 4 * 4)
    assert both["spatial_shapes"].shape == (1, 2, 2)
    with torch.no_grad():
        logits = model(**both).logits
        prefix = model(**alone).logits
        other = model(**swapped).logits
    s = alone["input_ids"].shape[1]
    assert torch.equal(both["input_ids"][:, :s], alone["input_ids"])
    torch.testing.assert_close(logits[:, :s], prefix, rtol=0, atol=1e-5)
    assert not torch.allclose(logits[:, s:], other[:, s:], atol=1e-3)


def test_a_hidden_layer_of_the_tower_feeds_the_same_features(naflex, tmp_path):
    """``encoder_layer=-2``: the exported model takes the tower's ``hidden_states[-2]``
    (before SigLIP2's post-layernorm), as the native model does."""
    from fusesurgery.hf import export_transformers

    fusesurgery.fuse(naflex["tower"], DECODER, tmp_path / "fused", every=2, encoder_layer=-2)
    gated = open_gates(tmp_path / "fused", tmp_path / "gated")
    export_transformers(gated, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())[
        "vision_feature_layer"] == -2
    batch = _batch(tmp_path / "hf")
    inputs = _native_inputs(gated, batch)
    native = fusesurgery.load_fused(gated, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = native(inputs.tokens, mask=inputs.mask, input_pos=inputs.input_pos,
                          encoder_input=inputs.encoder_input, encoder_mask=inputs.encoder_mask)
        assert torch.equal(_model(tmp_path / "hf")(**batch).logits, expected)
