"""Mllama checkpoints read as fused models; transformers' Mllama as a second reference for
the fusion math."""

from __future__ import annotations

import pytest
import torch

import fusesurgery
from fusesurgery.convert.mllama import hf_cross_layers, hf_self_layer, native_index
from fusesurgery.io import open_checkpoint
from tests.mllama_models import VOCAB, save_mllama_causal, save_mllama_conditional


def test_layer_numbering_is_llama_3_2_visions():
    cross = [3, 8, 13, 18, 23, 28, 33, 38]  # 11B: 40 HF layers, 32 self-attention layers
    assert [native_index(c, cross) for c in cross] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert hf_cross_layers([3, 7, 11, 15, 19, 23, 27, 31]) == tuple(cross)
    selfs = [layer for layer in range(40) if layer not in cross]
    assert [hf_self_layer(i, [3, 7, 11, 15, 19, 23, 27, 31]) for i in range(32)] == selfs
    assert [native_index(layer, cross) for layer in selfs] == list(range(32))


@pytest.fixture(params=["causal", "conditional"])
def mllama(request, tmp_path):
    save = save_mllama_causal if request.param == "causal" else save_mllama_conditional
    return request.param, save(tmp_path / request.param)


def _transformers_text(path, kind):
    """transformers' model with eager attention: its SDPA path (5.24) turns Mllama's
    cross-attention causal when no cross_attention_mask is given (``is_causal`` defaults to
    True for a module without the attribute), which no reference implementation does."""
    import transformers as t

    cls = t.MllamaForCausalLM if kind == "causal" else t.MllamaForConditionalGeneration
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def test_fused_decoder_equals_transformers_mllama(mllama):
    kind, path = mllama
    decoder = fusesurgery.load_fused(path, part="decoder").eval()
    config = decoder.fused_config
    assert config.fusion.fusion_layers == (1, 2) and config.fusion.fusion_vocab_size == 8
    assert config.decoder.num_layers == 3 and config.decoder.vocab_size == VOCAB
    reference = _transformers_text(path, kind)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB + 8, (2, 11), generator=generator)
    states = torch.randn(2, 6, 32, generator=generator)  # cross_attention_states [b, s_e, d]
    with torch.no_grad():
        ours = decoder(tokens, encoder_input=states)
        ours_text = decoder(tokens)
        if kind == "causal":
            theirs = reference(tokens, cross_attention_states=states).logits
            theirs_text = reference(tokens).logits
        else:
            lm = reference.model.language_model
            head = reference.lm_head
            theirs = head(lm(tokens, cross_attention_states=states).last_hidden_state)
            theirs_text = head(lm(tokens).last_hidden_state)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_text, theirs_text, rtol=0, atol=1e-5)

    # KV-cache decoding: prefill with the encoder states, then token by token without them
    decoder.setup_caches(2, torch.float32, encoder_max_seq_len=6, decoder_max_seq_len=11)
    with torch.no_grad():
        steps = [decoder(tokens[:, :4], encoder_input=states,
                         input_pos=torch.arange(4).expand(2, 4))]
        for pos in range(4, 11):
            steps.append(decoder(tokens[:, pos:pos + 1], input_pos=torch.full((2, 1), pos)))
    torch.testing.assert_close(torch.cat(steps, dim=1), theirs, rtol=0, atol=1e-5)


def test_rows_that_see_no_image_differ_from_transformers_by_design(tmp_path):
    """fusesurgery keeps torchtune's and Meta's semantics for text before the image: attention
    and MLP outputs of rows that attend to no image token are zeroed. transformers' Mllama
    zeroes only the MLP output; such rows attend uniformly to every image token (its issue
    39379), so the two differ on those rows and agree on every other."""
    path = save_mllama_causal(tmp_path / "m")
    decoder = fusesurgery.load_fused(path, part="decoder").eval()
    reference = _transformers_text(path, "causal")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=generator)
    states = torch.randn(1, 6, 32, generator=generator)
    sees = torch.zeros(1, 8, 6, dtype=torch.bool)
    sees[:, 3:] = True  # text before position 3 precedes the image
    additive = torch.zeros(1, 1, 8, 6).masked_fill(~sees[:, None], torch.finfo(torch.float32).min)
    row_mask = sees.any(-1)[:, None, :, None].float()  # [b, 1, s, 1]
    with torch.no_grad():
        ours = decoder(tokens, encoder_input=states, encoder_mask=sees)
        theirs = reference(tokens, cross_attention_states=states,
                           cross_attention_mask=additive,
                           full_text_row_masked_out_mask=row_mask).logits
        plain = decoder(tokens)  # no image: what the masked rows must equal (reference semantics)
    # reference semantics: text before the image is exactly what the decoder alone computes
    torch.testing.assert_close(ours[:, :3], plain[:, :3], rtol=0, atol=0)
    # transformers: those rows took an image attention output (the MLP's alone is zeroed),
    # and every later row sees them through self-attention
    assert (theirs[:, :3] - plain[:, :3]).abs().max() > 1e-3
    assert (theirs[:, 3:] - ours[:, 3:]).abs().max() > 1e-3


def test_inspect_and_unfuse_an_mllama_checkpoint(mllama, tmp_path):
    import transformers as t

    kind, path = mllama
    from fusesurgery.reports import inspect_checkpoint

    report = inspect_checkpoint(path)
    assert report.model.kind == "fused" and report.model.layout == "mllama"
    assert report.model.config.num_layers == 3
    assert report.fusion is not None

    out = tmp_path / "llama"
    fusesurgery.unfuse(path, out)
    llama = t.LlamaForCausalLM.from_pretrained(out).eval()
    decoder = fusesurgery.load_fused(path, part="decoder").eval()
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(llama(tokens).logits, decoder(tokens), rtol=0, atol=1e-5)
    with open_checkpoint(out) as source:
        assert not any("cross_attn" in key for key in source.keys())


def _bits(tensor):
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def _tensors(path):
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


def test_mllama_to_native_to_mllama_is_bitwise(mllama, tmp_path):
    from fusesurgery.write import convert_checkpoint

    kind, path = mllama
    native, back = tmp_path / "native", tmp_path / "back"
    convert_checkpoint(path, native, to="native")
    assert (native / "fusion_config.json").is_file()
    with open_checkpoint(native) as source:
        keys = set(source.keys())
    assert "decoder.tok_embeddings.fusion_embedding.weight" in keys
    assert any(k.startswith("decoder.layers.1.fusion_layer.") for k in keys)
    assert (kind == "conditional") == any(k.startswith("encoder.vision_model.") for k in keys)
    decoder = fusesurgery.load_fused(native, part="decoder")
    assert decoder.fused_config.fusion.fusion_layers == (1, 2)
    convert_checkpoint(native, back, to="mllama")
    original, again = _tensors(path), _tensors(back)
    assert set(original) == set(again)
    for key in original:
        assert torch.equal(_bits(original[key]), _bits(again[key])), key


def test_fuse_train_export_to_mllama(tmp_path):
    """fuse (tiny Llama + tiny CLIP) -> gates nonzero -> save_fused -> convert --to mllama:
    transformers loads it with no missing or unexpected keys and computes fusesurgery's logits
    when every row sees the image."""
    import transformers as t

    from fusesurgery.write import convert_checkpoint
    from tests.fusion_inputs import save_decoder, save_encoder

    decoder_path, _ = save_decoder("llama", tmp_path)
    encoder_path = save_encoder("clip", tmp_path)
    fusesurgery.fuse(encoder_path, decoder_path, tmp_path / "fused", every=2)
    model = fusesurgery.load_fused(tmp_path / "fused")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_scale.scale"):
                param.fill_(0.5)
    fusesurgery.save_fused(model, tmp_path / "trained")
    convert_checkpoint(tmp_path / "trained", tmp_path / "mllama", to="mllama")
    reference, info = t.MllamaForCausalLM.from_pretrained(
        tmp_path / "mllama", attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference.eval()
    decoder = fusesurgery.load_fused(tmp_path / "trained", part="decoder").eval()
    tokens = torch.randint(0, 64, (2, 9))
    tokens[:, 0] = 64  # <|image|> first: every row sees the image
    states = torch.randn(2, 5, 32)
    with torch.no_grad():
        ours = decoder(tokens, encoder_input=states)
        theirs = reference(tokens, cross_attention_states=states).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options, fragment", [
    (dict(fusion_after=True), "after their decoder layers"),
    (dict(new_tokens=[f"<t{i}>" for i in range(9)]), "9 new tokens"),
])
def test_what_mllama_cannot_express(tmp_path, options, fragment):
    from fusesurgery.errors import ConfigError
    from fusesurgery.write import convert_checkpoint
    from tests.fusion_inputs import save_decoder, save_encoder

    decoder_path, _ = save_decoder("llama", tmp_path)
    encoder_path = save_encoder("clip", tmp_path)
    fusesurgery.fuse(encoder_path, decoder_path, tmp_path / "fused", every=2, **options)
    with pytest.raises(ConfigError, match=fragment):
        convert_checkpoint(tmp_path / "fused", tmp_path / "mllama", to="mllama")
    assert not (tmp_path / "mllama").exists()


def test_diff_aligns_the_text_decoder_with_a_plain_llama(tmp_path):
    from fusesurgery.reports import inspect_checkpoint
    from fusesurgery.reports.diff import diff_checkpoints

    path = save_mllama_causal(tmp_path / "m")
    fusesurgery.unfuse(path, tmp_path / "llama")
    report = diff_checkpoints(tmp_path / "llama", path, values=True)
    summary = report.summary()
    # names as the Mllama file stores them: its cross-attention layers are model.layers.1, .3
    assert "only in B (26)" in summary and "model.layers.{1,3}.* (13 keys each)" in summary
    only_b = set(report.only_in_b)  # the normalised (native fused) names
    assert {k.split(".fusion_layer.")[0] for k in only_b} == {"decoder.layers.1",
                                                             "decoder.layers.2"}
    assert "values: 29 equal, 0 different of 29 compared" in summary  # q/k rows aligned
    gates = inspect_checkpoint(path).fusion.gates
    assert sorted(set(gates.values())) == pytest.approx([-0.4, 0.7])


def test_transformers_5_spelling_and_validate_refusal(tmp_path):
    """``model.language_model.*`` / ``model.vision_model.*`` (transformers 5's module names)
    read like transformers 4's; validate says why it cannot rebuild an Mllama model."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.hardening.conftest import assert_one_line_error, cli

    path = save_mllama_conditional(tmp_path / "v4")
    renamed = tmp_path / "v5"
    renamed.mkdir()
    shutil.copy(path / "config.json", renamed / "config.json")
    tensors = load_file(path / "model.safetensors")
    spelled = {}
    for key, tensor in tensors.items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key.removeprefix("language_model.model.")
        elif key == "language_model.lm_head.weight":
            key = "lm_head.weight"
        else:
            key = "model." + key
        spelled[key] = tensor
    save_file(spelled, renamed / "model.safetensors", metadata={"format": "pt"})
    a = fusesurgery.load_fused(path, part="decoder").state_dict()
    b = fusesurgery.load_fused(renamed, part="decoder").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((renamed / "config.json").read_text())["model_type"] == "mllama"
    assert_one_line_error(cli("validate", renamed), "no native module", "part='decoder'")
