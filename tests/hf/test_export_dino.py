"""The transformers export of a fused DINOv2 (with registers) and DINOv3 tower: the exported
model's code feeds the fusion the tokens the native model feeds it (``encoder_tokens``: by
default the class token and the patches, the registers left out), so its logits with an image
and nonzero gates equal ``load_fused``'s. Sources are written by transformers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fusesurgery
from tests.hf.conftest import open_gates

transformers = pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
              image_size=28, patch_size=7, num_register_tokens=3)
DINOV3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, num_register_tokens=2)


def _save_tower(kind: str, directory: Path) -> Path:
    if kind == "dinov2":
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**DINOV2))
    else:
        model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**DINOV3))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter random, the registers included
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5
                            + (1.0 if parameter.dim() == 1 else 0.0))
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("kind", "tokens"), [("dinov2", "default"), ("dinov2", "patches"),
                                              ("dinov3", "default"), ("dinov3", "all")])
def test_logits_with_an_image_equal_load_fused(tmp_path, kind, tokens):
    from transformers import AutoModelForImageTextToText

    from fusesurgery.hf import export_transformers, register_transformers

    register_transformers()
    tower = _save_tower(kind, tmp_path / "tower")
    fusesurgery.fuse(tower, EXAMPLES / "tiny-llama", tmp_path / "fused", every=1,
                     encoder_tokens=tokens)
    gated = open_gates(tmp_path / "fused", tmp_path / "gated")
    export_transformers(gated, tmp_path / "hf")
    document = json.loads((tmp_path / "hf" / "config.json").read_text())
    expected_tokens = "cls_and_patches" if tokens == "default" else tokens
    assert document["encoder_tokens"] == expected_tokens
    assert document["vision_num_register_tokens"] == (DINOV2 if kind == "dinov2"
                                                      else DINOV3)["num_register_tokens"]

    native = fusesurgery.load_fused(gated, dtype=torch.float32).eval()
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf",
                                                           dtype=torch.float32).eval()
    size = (DINOV2 if kind == "dinov2" else DINOV3)["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    image_id = exported.config.image_token_id
    ids = torch.tensor([[1, 5, image_id, 7, 3, 11], [2, image_id, 6, 8, 10, 12]])
    s_e = native.fused_config.encoder.seq_len
    assert exported.get_image_features(pixels).shape[1] == s_e  # what native feeds the fusion
    seen = (ids == image_id).cumsum(dim=1) > 0
    with torch.no_grad():
        expected = native(ids, encoder_input={"images": pixels},
                          encoder_mask=seen[:, :, None].expand(-1, -1, s_e))
        logits = exported(input_ids=ids, pixel_values=pixels).logits
    zero = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        for layer in zero.cross_attention_layers.values():
            layer.ca_scale.scale.zero_()
            layer.mlp_scale.scale.zero_()
        assert not torch.equal(zero(input_ids=ids, pixel_values=pixels).logits, logits)
    assert torch.equal(logits, expected)
    # and load_fused of the export is the native model, in memory
    loaded = fusesurgery.load_fused(tmp_path / "hf", dtype=torch.float32)
    assert loaded.fused_config == native.fused_config
    with torch.no_grad():
        assert torch.equal(loaded(ids, encoder_input={"images": pixels},
                                  encoder_mask=seen[:, :, None].expand(-1, -1, s_e)), expected)


def test_back_to_native_is_bitwise(tmp_path):
    from fusesurgery.hf import export_transformers, import_transformers
    from fusesurgery.io import open_checkpoint

    tower = _save_tower("dinov2", tmp_path / "tower")
    fusesurgery.fuse(tower, EXAMPLES / "tiny-llama", tmp_path / "fused", every=2)
    export_transformers(tmp_path / "fused", tmp_path / "hf")
    import_transformers(tmp_path / "hf", tmp_path / "back")
    with open_checkpoint(tmp_path / "fused") as a, open_checkpoint(tmp_path / "back") as b:
        assert set(a.keys()) == set(b.keys())
        assert "encoder.vision.mask_token.weight" in a.keys()  # unused, carried all the same
        for key in a.keys():
            assert torch.equal(a.get_tensor(key).view(torch.uint8),
                               b.get_tensor(key).view(torch.uint8)), key


def _open_gates_in_memory(model: torch.nn.Module, value: float = 0.7) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
                param.fill_(value)


@pytest.mark.parametrize(("kind", "tokens"), [("dinov2", "default"), ("dinov3", "patches")])
def test_fuse_format_transformers_feeds_the_tokens_the_native_fuse_feeds(tmp_path, kind,
                                                                          tokens):
    # the same options straight into the transformers layout: the registers stay out by
    # default (and --encoder-tokens is honoured), so its logits are the native fuse's
    from transformers import AutoModelForImageTextToText

    tower = _save_tower(kind, tmp_path / "tower")
    options = dict(every=1, encoder_tokens=tokens)
    fusesurgery.fuse(tower, EXAMPLES / "tiny-llama", tmp_path / "fused", **options)
    fusesurgery.fuse(tower, EXAMPLES / "tiny-llama", tmp_path / "any", format="transformers",
                     **options)
    sizes = DINOV2 if kind == "dinov2" else DINOV3
    document = json.loads((tmp_path / "any" / "config.json").read_text())
    assert document["encoder_tokens"] == ("cls_and_patches" if tokens == "default" else tokens)
    assert (document["vision_num_cls_tokens"], document["vision_num_register_tokens"]) == (
        1, sizes["num_register_tokens"])

    native = fusesurgery.load_fused(tmp_path / "fused", dtype=torch.float32).eval()
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "any",
                                                           dtype=torch.float32).eval()
    _open_gates_in_memory(native)
    _open_gates_in_memory(exported)
    pixels = torch.randn(2, 3, sizes["image_size"], sizes["image_size"],
                         generator=torch.Generator().manual_seed(1))
    image_id = exported.config.image_token_id
    ids = torch.tensor([[1, 5, image_id, 7, 3, 11], [2, image_id, 6, 8, 10, 12]])
    s_e = native.fused_config.encoder.seq_len
    seen = (ids == image_id).cumsum(dim=1) > 0
    with torch.no_grad():
        expected = native(ids, encoder_input={"images": pixels},
                          encoder_mask=seen[:, :, None].expand(-1, -1, s_e))
        logits = exported(input_ids=ids, pixel_values=pixels).logits
    assert exported.get_image_features(pixels).shape[1] == s_e
    assert torch.equal(logits, expected)
