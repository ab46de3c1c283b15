"""The lifecycle of a fused model: fuse -> load_fused -> train a few steps -> save_fused ->
validate (no longer an identity) -> unfuse (still the original decoder, bit for bit)."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

import fusesurgery
from fusesurgery.modules import get_fusion_params
from tests.fusion_inputs import save_decoder, save_encoder
from tests.hardening.conftest import snapshot


def _bits(tensor):
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def test_train_save_validate_unfuse(tmp_path):
    decoder, _ = save_decoder("llama", tmp_path)
    encoder = save_encoder("clip", tmp_path)
    fused = tmp_path / "fused"
    fusesurgery.fuse(encoder, decoder, fused, every=1)

    model = fusesurgery.load_fused(fused)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(get_fusion_params(model))  # the reference's default flags
    originals = {k: v.detach().clone() for k, v in model.state_dict().items()
                 if k.startswith("decoder.") and "fusion" not in k}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    config = model.fused_config
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, config.decoder.vocab_size, (2, 8), generator=generator)
        tokens[:, 2] = config.new_tokens[0].id
        images = torch.randn(2, 3, config.encoder.image_size, config.encoder.image_size,
                             generator=generator)
        mask = torch.zeros(2, 8, config.encoder.seq_len, dtype=torch.bool)
        mask[:, 2:] = True
        logits = model(tokens, encoder_input={"images": images}, encoder_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 tokens[:, 1:].flatten().clamp(
                                                     max=config.decoder.vocab_size - 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    state = model.state_dict()
    for key, tensor in originals.items():  # frozen: bitwise unchanged
        assert torch.equal(_bits(state[key]), _bits(tensor)), key
    from fusesurgery.write.save_fused import gate_values

    gates = gate_values(model)
    assert all(value != 0.0 for value in gates.values())

    trained = tmp_path / "trained"
    fusesurgery.save_fused(model, trained)
    saved = json.loads((trained / "fusion_config.json").read_text())
    assert saved["trained"] is True and "no longer" in saved["identity"]
    assert saved["gates"] == gates
    assert (trained / "source" / "decoder" / "config.json").read_bytes() == \
        (decoder / "config.json").read_bytes()

    report = fusesurgery.validate(trained, against=decoder)
    assert report.ok, report.summary()
    assert report.identity is False
    rows = {check.name: check for check in report.checks}
    assert rows["fusion is no longer an identity"].status == "info"
    assert rows["text before the image is untouched by the fusion"].status == "pass"

    again = fusesurgery.load_fused(trained)
    for key, tensor in again.state_dict().items():
        assert torch.equal(_bits(tensor), _bits(state[key])), key

    unfused = tmp_path / "unfused"
    fusesurgery.unfuse(trained, unfused)
    with safe_open(decoder / "model.safetensors", "pt") as a, \
            safe_open(unfused / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(_bits(a.get_tensor(key)), _bits(b.get_tensor(key))), key


def test_save_fused_refuses_to_write_over_its_own_source(tmp_path):
    decoder, _ = save_decoder("llama", tmp_path)
    encoder = save_encoder("clip", tmp_path)
    fused = tmp_path / "fused"
    fusesurgery.fuse(encoder, decoder, fused, every=2)
    model = fusesurgery.load_fused(fused)
    before = snapshot(fused)
    try:
        fusesurgery.save_fused(model, fused, overwrite=True)
    except fusesurgery.FuseSurgeryError as error:
        assert "input" in str(error)
    else:
        raise AssertionError("save_fused wrote over the checkpoint its model is mapped from")
    assert snapshot(fused) == before
