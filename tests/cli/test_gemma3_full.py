"""The text half of a full Gemma 3 checkpoint (``Gemma3ForConditionalGeneration``, model_type
``gemma3``): read as the ``gemma3_text`` decoder, its SigLIP tower and projector dropped and
listed, in transformers 4's names (``language_model.model.*``, which transformers 5's
``save_pretrained`` writes too) and 5's module names (``model.language_model.*``,
``lm_head.weight``). Sources are written by transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusesurgery import load_decoder, load_encoder
from fusesurgery.errors import UnrecognizedFormatError
from fusesurgery.io import open_checkpoint
from tests.hardening.conftest import cli

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            max_position_embeddings=64, sliding_window=4, sliding_window_pattern=3,
            query_pre_attn_scalar=16)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=4)
DROPPED = ("SigLIP vision tower of a Gemma3ForConditionalGeneration",
           "image projector of a Gemma3ForConditionalGeneration")


def save_gemma3(directory: Path, *, tied: bool, module_names: bool):
    """A tiny Gemma3ForConditionalGeneration saved by transformers (every norm drawn at
    random), with ``module_names`` re-saved under transformers 5's module names."""
    torch.manual_seed(0)
    whole = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config={**TEXT, "tie_word_embeddings": tied}, vision_config=VISION,
        mm_tokens_per_image=4, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for name, parameter in whole.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.5)
    whole.save_pretrained(directory)
    if module_names:
        state = {key: value.detach().clone().contiguous()
                 for key, value in whole.state_dict().items()}
        assert "model.language_model.embed_tokens.weight" in state and "lm_head.weight" in state
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return whole


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


def _clip(directory: Path) -> Path:
    torch.manual_seed(1)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("tied", "module_names"), [(True, False), (False, True)],
                         ids=["tied-transformers4-names", "untied-transformers5-names"])
def test_text_half_fuses_validates_and_unfuses_to_gemma3_text(tmp_path, tied, module_names):
    source = tmp_path / "gemma3"
    whole = save_gemma3(source, tied=tied, module_names=module_names)
    tokens = torch.randint(0, TEXT["vocab_size"], (2, 12),
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = whole(input_ids=tokens).logits
        ours = load_decoder(source).eval()(tokens)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    result = cli("inspect", source, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["architecture"]["kind"], report["config"]["family"]) == ("decoder", "gemma3")
    assert {f"not converted ({why})" for why in DROPPED} <= {c["name"]
                                                           for c in report["components"]}

    fused = tmp_path / "fused"
    result = cli("fuse", _clip(tmp_path / "clip"), source, "-o", fused, "--every", "1")
    assert result.exit_code == 0, result.output
    for why in DROPPED:  # listed, as a CLIPModel's text tower is
        assert why in result.stderr
    result = cli("validate", fused, "--against", source, "--json")
    assert result.exit_code == 0, result.output
    validated = json.loads(result.stdout)
    assert validated["ok"] and validated["identity"]
    assert {check["status"] for check in validated["checks"]} == {"pass"}

    # unfuse gives the text decoder (Gemma3ForCausalLM's names and config), not the whole
    unfused = tmp_path / "unfused"
    result = cli("unfuse", fused, "-o", unfused)
    assert result.exit_code == 0, result.output
    text_model = transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**TEXT, tie_word_embeddings=tied))
    expected_keys = set(text_model.state_dict()) - ({"lm_head.weight"} if tied else set())
    written = _tensors(unfused)
    assert set(written) == expected_keys
    stored = _tensors(source)
    for key, tensor in written.items():
        name = key if key == "lm_head.weight" and module_names else key.replace(
            "model.", "model.language_model." if module_names else "language_model.model.", 1)
        if key == "lm_head.weight" and not module_names:
            name = "language_model.lm_head.weight"
        assert torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), key
    config = json.loads((unfused / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("gemma3_text",
                                                             ["Gemma3ForCausalLM"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(unfused).eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, theirs)
    result = cli("diff", "--values", source, unfused)
    assert result.exit_code == 0, result.output
    assert all(f"dropped on purpose ({why})" in result.stdout for why in DROPPED)

    # convert: the text half to native and back, the text model's config.json
    native, back = tmp_path / "native", tmp_path / "back"
    assert cli("convert", source, "-o", native).exit_code == 0
    result = cli("convert", native, "-o", back, "--to", "hf")
    assert result.exit_code == 0, result.output
    assert set(_tensors(back)) == expected_keys
    assert json.loads((back / "config.json").read_text())["model_type"] == "gemma3_text"


@pytest.mark.parametrize("module_names", [False, True],
                         ids=["transformers4-names", "transformers5-names"])
def test_its_siglip_tower_is_the_encoder_where_one_is_asked_for(tmp_path, module_names):
    source = tmp_path / "gemma3"
    whole = save_gemma3(source, tied=True, module_names=module_names)
    images = torch.randn(2, 3, VISION["image_size"], VISION["image_size"],
                         generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the tower's final hidden states, as Gemma 3's projector takes them
        theirs = whole.model.vision_tower(pixel_values=images).last_hidden_state
        ours = load_encoder(source).eval()(images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    fused = tmp_path / "fused"  # fuse gemma3/ gemma3/: its own tower with its own text half
    result = cli("fuse", source, source, "-o", fused, "--every", "2")
    assert result.exit_code == 0, result.output
    assert "fused siglip -> gemma3" in result.stdout
    assert "text model of a Gemma3ForConditionalGeneration" in result.stderr  # listed
    result = cli("validate", fused, "--against", source, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identity"]

    tower = tmp_path / "tower"
    result = cli("unfuse", fused, "-o", tower, "--part", "encoder")
    assert result.exit_code == 0, result.output
    reloaded = transformers.AutoModel.from_pretrained(tower).eval()
    assert type(reloaded).__name__ == "SiglipVisionModel"
    stored = _tensors(source)
    for key, tensor in _tensors(tower).items():
        name = key.replace("vision_model.", "model.vision_tower." if module_names
                           else "vision_tower.", 1)
        assert torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), key
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=images).last_hidden_state, theirs)


def test_a_llava_style_checkpoint_as_a_tower_keeps_its_multimodal_error(tmp_path):
    """Only a text half a family reads (Gemma 3's) makes the vision_tower.* beside it a
    tower: a LLaVA-style checkpoint keeps its one-line multimodal error."""
    llava = tmp_path / "llava"
    llava.mkdir()
    save_file({"language_model.model.embed_tokens.weight": torch.zeros(4, 2),
               "vision_tower.vision_model.embeddings.patch_embedding.weight":
                   torch.zeros(2, 3, 4, 4)}, llava / "model.safetensors")
    (llava / "config.json").write_text(json.dumps(
        {"model_type": "llava", "text_config": {}, "vision_config": {}}))
    with pytest.raises(UnrecognizedFormatError, match="multimodal model"):
        load_encoder(llava)


def test_another_parts_keys_beside_a_plain_checkpoint_stay_unknown():
    """Gemma 3's tower and projector are dropped from a Gemma 3 checkpoint only: beside a
    plain decoder or tower they are unknown keys, as before."""
    from fusesurgery.convert.keymaps import keys_to_native
    from fusesurgery.errors import KeyMapError

    llama = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    with pytest.raises(KeyMapError, match="multi_modal_projector.mm_soft_emb_norm.weight"):
        keys_to_native([*llama, "multi_modal_projector.mm_soft_emb_norm.weight"], "hf")
    tower = ["vision_model.embeddings.patch_embedding.weight"]
    with pytest.raises(KeyMapError, match="lm_head.weight"):
        keys_to_native([*tower, "lm_head.weight"], "hf", "vision")
    wrapped = keys_to_native(["language_model.model.norm.weight",
                              "multi_modal_projector.mm_soft_emb_norm.weight"], "hf")
    assert wrapped.mapping == {"language_model.model.norm.weight": "norm.scale"}
