import pytest
import torch
from torch import nn

from fusesurgery.modules import FusionLayer, build_decoder, build_fusion_layer, fuse_decoder


class Inner(nn.Module):
    """A layer whose own children are named like the wrapper's: the reference's
    str.replace("layer.", "") corrupts these keys."""

    def __init__(self) -> None:
        super().__init__()
        self.sublayer = nn.Linear(3, 3)
        self.block = nn.Module()
        self.block.fusion_layer = nn.Linear(3, 3)
        self.block.layer = nn.Linear(3, 3)

    def forward(self, x, **kwargs):
        return self.block.layer(self.block.fusion_layer(self.sublayer(x)))


class Identity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x, **kwargs):
        return x * self.gain


def test_only_the_leading_layer_segment_is_stripped():
    inner = Inner()
    before = inner.state_dict()
    wrapped = nn.Sequential(FusionLayer(inner, Identity()))
    keys = list(wrapped.state_dict())
    assert keys == [f"0.{k}" for k in before] + ["0.fusion_layer.gain"]
    assert "0.sublayer.weight" in keys and "0.block.fusion_layer.weight" in keys
    assert "0.block.layer.weight" in keys

    fresh = nn.Sequential(FusionLayer(Inner(), Identity()))
    result = fresh.load_state_dict(wrapped.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in wrapped.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_direct_member_named_fusion_layer_is_refused():
    inner = nn.Module()
    inner.fusion_layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="fusion_layer"):
        FusionLayer(inner, Identity())


def test_hooks_come_from_the_public_api():
    layer = FusionLayer(Identity(), Identity())
    assert layer._state_dict_hooks, "no state-dict hook registered"
    assert all(getattr(h, "_from_public_api", False) for h in layer._state_dict_hooks.values())
    assert layer._load_state_dict_post_hooks


def test_fusion_params_and_order(decoder_cfg, fusion_cfg):
    calls = []

    class Recorder(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x, **kwargs):
            calls.append((self.tag, sorted(kwargs)))
            return x

    for first, expected in ((True, ["fusion", "layer"]), (False, ["layer", "fusion"])):
        calls.clear()
        fused = FusionLayer(Recorder("layer"), Recorder("fusion"), fusion_first=first)
        fused(torch.zeros(1), mask=None, encoder_input=None)
        assert [tag for tag, _ in calls] == expected
        assert all(kw == ["encoder_input", "mask"] for _, kw in calls)
    layer = FusionLayer(nn.Linear(2, 2), build_fusion_layer(decoder_cfg, fusion_cfg))
    assert layer.fusion_params() == [
        f"fusion_layer.{n}" for n, _ in layer.fusion_layer.named_parameters()
    ]


def test_decoder_keys_after_fusion_are_original_plus_fusion_keys(decoder_cfg, fusion_cfg):
    decoder = build_decoder(decoder_cfg)
    original = {k: v.clone() for k, v in decoder.state_dict().items()}
    fuse_decoder(decoder, decoder_cfg, fusion_cfg)
    fused = decoder.state_dict()

    fusion_keys = {"tok_embeddings.fusion_embedding.weight"} | {
        f"layers.{i}.fusion_layer.{name}"
        for i in fusion_cfg.fusion_layers
        for name, _ in build_fusion_layer(decoder_cfg, fusion_cfg).named_parameters()
    }
    assert set(fused) == set(original) | fusion_keys
    assert not set(original) & fusion_keys
    for key, value in original.items():  # the wrapping reused the tensors untouched
        assert torch.equal(fused[key], value)
    # the wrapped layer's keys keep their position: original keys in original order
    assert [k for k in fused if k in original] == list(original)


def test_round_trip_and_partial_loads(decoder_cfg, fusion_cfg):
    source = fuse_decoder(build_decoder(decoder_cfg), decoder_cfg, fusion_cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    target = fuse_decoder(build_decoder(decoder_cfg), decoder_cfg, fusion_cfg)
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    # An unfused decoder checkpoint: exactly the fusion keys are missing, nothing unexpected.
    plain = build_decoder(decoder_cfg).state_dict()
    fused = fuse_decoder(build_decoder(decoder_cfg), decoder_cfg, fusion_cfg)
    result = fused.load_state_dict(plain, strict=False)
    assert set(result.missing_keys) == set(fused.state_dict()) - set(plain)
    assert result.unexpected_keys == []
    for key, value in plain.items():
        assert torch.equal(fused.state_dict()[key], value)

    # Strict errors name keys as they appear in the state dict, not wrapped parameter names.
    partial = dict(plain)
    del partial["layers.1.attn.q_proj.weight"]
    with pytest.raises(RuntimeError, match=r'"layers\.1\.attn\.q_proj\.weight"'):
        fused.load_state_dict(partial)
