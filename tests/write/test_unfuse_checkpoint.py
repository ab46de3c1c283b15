"""unfuse and convert of fused checkpoints: what each output says about itself (configs that
transformers' own classes load, token ids, dtype) and the inputs refused in one line."""

from __future__ import annotations

import pytest

from tests.hardening.conftest import assert_one_line_error, cli
from tests.mllama_models import save_mllama_causal, save_mllama_conditional


@pytest.mark.parametrize("kind", ["causal", "conditional"])
def test_encoder_of_an_mllama_checkpoint_is_refused_in_one_line(tmp_path, kind):
    save = save_mllama_causal if kind == "causal" else save_mllama_conditional
    path = save(tmp_path / kind)
    fragment = "holds no vision encoder" if kind == "causal" else "tiled vision model"
    assert_one_line_error(cli("unfuse", path, "-o", tmp_path / "out", "--part", "encoder"),
                          fragment)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.fusion_inputs import save_decoder

    return save_decoder("llama", tmp_path_factory.mktemp("llama"))[0]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_encoder_of_a_whole_clip_or_siglip_model_loads_as_the_vision_model(
        tmp_path, llama, family):
    """The vision half of a CLIPModel / SiglipModel comes back with its own config: AutoModel
    builds CLIPVisionModel / SiglipVisionModel with every weight from the file (a whole-model
    config made it build a random text tower)."""
    import torch
    import transformers as t
    from safetensors.torch import load_file

    import fusesurgery
    from tests.reports.diff_checkpoints import HF_VISION
    from tests.tiny_models import TINY_TEXT

    torch.manual_seed(0)
    if family == "clip":
        source = t.CLIPModel(t.CLIPConfig(vision_config=HF_VISION, text_config=TINY_TEXT,
                                          projection_dim=24))
    else:
        source = t.SiglipModel(t.SiglipConfig(vision_config=HF_VISION, text_config=TINY_TEXT))
    source.save_pretrained(tmp_path / family)
    fusesurgery.fuse(tmp_path / family, llama, tmp_path / "fused", every=2)
    result = cli("unfuse", tmp_path / "fused", "-o", tmp_path / "back", "--part", "encoder")
    assert result.exit_code == 0, result.output
    assert "vision half" in result.stderr

    model, info = t.AutoModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    expected = {"clip": t.CLIPVisionModel, "siglip": t.SiglipVisionModel}[family]
    assert type(model) is expected
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = load_file(tmp_path / family / "model.safetensors")
    state = model.state_dict()  # transformers 5 names the tower's modules without vision_model.
    assert len(state) == len(set(load_file(tmp_path / "back" / "model.safetensors")))
    for key, tensor in state.items():
        assert torch.equal(tensor, original.get(key, original.get(f"vision_model.{key}"))), key
    images = torch.randn(1, 3, HF_VISION["image_size"], HF_VISION["image_size"])
    vision = source.vision_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values=images).last_hidden_state,
                                   vision(pixel_values=images).last_hidden_state,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("pad", [3, None], ids=["pad-3", "no-pad"])
def test_to_mllama_carries_the_token_ids_and_names_its_class(tmp_path, pad):
    """convert --to mllama of a fused Llama: the source's bos/eos/pad ids (not Llama 3's
    defaults, no padding row among the fusion rows), the tensors' dtype, and the class that
    loads it, which AutoModelForCausalLM is not."""
    import json

    import transformers as t

    import fusesurgery
    from tests.fusion_inputs import save_encoder
    from tests.tiny_models import TINY_DECODER, save_tiny_hf_decoder

    decoder = save_tiny_hf_decoder("llama", tmp_path / "llama", bos_token_id=5,
                                   eos_token_id=[6, 7], pad_token_id=pad, rms_norm_eps=1e-5)
    fusesurgery.fuse(save_encoder("clip", tmp_path), decoder, tmp_path / "fused", every=2)
    result = cli("convert", tmp_path / "fused", "-o", tmp_path / "mllama", "--to", "mllama",
                 "--json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["notes"]
    assert any("load it with transformers' MllamaForCausalLM" in note for note in notes), notes

    config = json.loads((tmp_path / "mllama" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (5, [6, 7])
    assert config["pad_token_id"] == pad  # a new token's row is never padding
    assert config["torch_dtype"] == "float32"
    model, info = t.MllamaForCausalLM.from_pretrained(tmp_path / "mllama",
                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (model.config.bos_token_id, model.config.eos_token_id) == (5, [6, 7])
    assert model.config.pad_token_id == pad
    assert model.model.embed_tokens.num_embeddings == TINY_DECODER["vocab_size"] + 8
