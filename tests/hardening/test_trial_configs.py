"""A new user's config.json mistakes on what landed with issue 18 (full Gemma 3 checkpoints,
families without a window rule): each is one line, exit 2, nothing written. Sources are
written by transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hardening.conftest import cli, edit_config
from tests.tiny_models import save_tiny_hf_decoder

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64, sliding_window=4, query_pre_attn_scalar=16)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=8)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tied Gemma3ForConditionalGeneration as transformers saves it."""
    directory = tmp_path_factory.mktemp("gemma3") / "gemma3"
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4)).save_pretrained(directory)
    return directory


def _copy(source: Path, directory: Path) -> Path:
    directory.mkdir()
    for path in source.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


def _refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "Traceback" not in result.output and "\n" not in line, result.output
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("family", ["qwen3", "llama", "phi3"])
def test_layer_types_not_one_per_layer_is_refused_without_a_window(tmp_path, family):
    # transformers' config classes refuse it (its layer_types validation), so the checkpoint
    # does not load there; these families apply no window, and the list went unread
    source = save_tiny_hf_decoder(family, tmp_path / family, pad_token_id=0)
    edit_config(source, layer_types=["full_attention"] * 5)
    with pytest.raises(Exception, match="num_hidden_layers"):  # a validation error
        transformers.AutoConfig.from_pretrained(source)
    _refused(cli("inspect", source), "config.json: layer_types has 5 entries for 2 layers")
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(clip)
    _refused(cli("fuse", clip, source, "-o", tmp_path / "out"), "layer_types has 5 entries")
    assert not (tmp_path / "out").exists()
    edit_config(source, layer_types="full_attention")
    _refused(cli("convert", source, "-o", tmp_path / "native"), "layer_types must list")
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize(("section", "value", "stated"), [
    ("text_config", ..., "text_config, which is missing"),
    ("text_config", "oops", "text_config, which is str 'oops', not an object"),
    ("vision_config", ..., "vision_config, which is missing"),
])
def test_gemma3_config_without_its_part_section_names_it(tmp_path, gemma3, section, value,
                                                        stated):
    # (was: "states neither layer_types nor num_hidden_layers" for the text half, "model_type
    # 'gemma3' is not a supported vision encoder" for the tower)
    source = _copy(gemma3, tmp_path / "gemma3")
    edit_config(source, **{section: value})
    decoder = source if section == "text_config" else save_tiny_hf_decoder("qwen3",
                                                                             tmp_path / "q")
    encoder = source if section == "vision_config" else gemma3
    _refused(cli("fuse", encoder, decoder, "-o", tmp_path / "out", "--every", "1"),
             f"config.json: gemma3 holds its {'decoder' if section == 'text_config' else 'vision'}"
             f" part's config in {stated}")
    assert not (tmp_path / "out").exists()


def test_gemma3_untied_by_the_whole_without_lm_head_is_refused(tmp_path, gemma3):
    # transformers 5.25 ties a Gemma3ForConditionalGeneration's head by the whole config's
    # flag: false there, it builds a head the checkpoint does not hold (drawn at random),
    # whatever text_config says; it was read as tied, silently
    source = _copy(gemma3, tmp_path / "gemma3")
    edit_config(source, tie_word_embeddings=False)
    assert json.loads((source / "config.json").read_text())["text_config"].get(
        "tie_word_embeddings", True) is True
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(source)
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    _refused(cli("inspect", source), "there is no lm_head.weight and the embeddings are not "
                                     "tied")
    _refused(cli("convert", source, "-o", tmp_path / "native"), "no lm_head.weight")
    assert not (tmp_path / "native").exists()


def test_gemma3_without_its_text_half_names_what_is_missing(tmp_path, gemma3):
    # (was: "keys match no known decoder, vision encoder or fused layout: ...")
    source = _copy(gemma3, tmp_path / "gemma3")
    tensors = load_file(source / "model.safetensors")
    save_file({key: value for key, value in tensors.items()
               if not key.startswith("language_model.")}, source / "model.safetensors",
              metadata={"format": "pt"})
    decoder = save_tiny_hf_decoder("qwen3", tmp_path / "qwen3")
    for result in (cli("inspect", source),
                   cli("fuse", source, decoder, "-o", tmp_path / "out", "--every", "1")):
        _refused(result, "vision tower (vision_tower.* keys) without the text model")
    assert not (tmp_path / "out").exists()


def test_configless_phi3_is_told_by_its_stacked_keys(tmp_path):
    # A Phi3ForCausalLM's model.safetensors alone: inspect shows what a metadata viewer shows
    # and asks for the head count (was: exit 2, "its rows do not stack ... as the config gives
    # them ()", the head-less q share guessed as a third); with --num-heads it is Phi-3 (was:
    # taken as Llama, then "needs its q/k rows reordered as well as cut out")
    from fusesurgery import load_decoder

    source = save_tiny_hf_decoder("phi3", tmp_path / "phi3", pad_token_id=0)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    result = cli("inspect", bare, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["family"] == "phi3"
    assert report["missing"]["num_heads"] == "--num-heads"
    result = cli("convert", bare, "-o", tmp_path / "native", "--num-heads", "4")
    assert result.exit_code == 0, result.output
    # diff takes the stacked rows from the side whose config gives them (was: the bare
    # file's qkv_proj / gate_up_proj 'unknown to the key maps', the same bytes 'different')
    for pair in ((bare, source), (source, bare)):
        result = cli("diff", "--values", *pair)
        assert result.exit_code == 0 and "identical" in result.stdout, result.output
    # a --family whose layout stacks nothing is refused as other wrong families are (was:
    # 'needs its q/k rows reordered as well as cut out, which no family does yet')
    for command in ("inspect", "convert"):
        _refused(cli(command, bare, *(["-o", tmp_path / "x"] if command == "convert" else []),
                     "--family", "llama", "--num-heads", "4"),
                 "--family llama: these weights are no Llama decoder: they hold model.layers.0.")
    assert not (tmp_path / "x").exists()
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    reference = transformers.Phi3ForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        expected = reference(tokens).logits
        for path, overrides in ((bare, {"num_heads": 4}), (tmp_path / "native", None)):
            logits = load_decoder(path, overrides=overrides).eval()(tokens)
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("edit", "fragment"), [
    ({"num_key_value_heads": 4}, "k_norm.weight is [16], its config.json needs [32]"),
    ({"intermediate_size": 80}, "down_proj.weight is [32, 64], its config.json needs [32, 80]"),
    ({"num_hidden_layers": 1}, "unexpected ['model.layers.1."),
])
def test_unknown_decoder_whose_config_the_weights_contradict_is_refused(tmp_path, edit,
                                                                        fragment):
    # an OLMo 2 goes through the transformers layout; its config.json was checked only for
    # the embedding table and the tie flag, so the export was written, and then its own
    # validate refused it ('its config.json needs ...')
    source = tmp_path / "olmo2"
    torch.manual_seed(0)
    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)).save_pretrained(source)
    edit_config(source, **edit)
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(clip)
    _refused(cli("fuse", clip, source, "-o", tmp_path / "out", "--every", "1"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("role", ["decoder", "tower"])
def test_full_gemma3_in_the_transformers_layout_is_named(tmp_path, gemma3, role):
    # (was: 'no hidden size (hidden_size) in its config' as the decoder, 'its vision_model.*
    # tensors are not the siglip_vision_model vision model's' as the tower; beside a decoder
    # without a native module (OLMo 2), fuse took the full Gemma 3 for a swapped decoder and
    # gave OLMo 2's 'needs a native decoder family' line)
    olmo2 = tmp_path / "olmo2"
    transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)).save_pretrained(olmo2)
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(clip)
    commands = ([("fuse", clip, gemma3, "--format", "transformers")] if role == "decoder" else
                [("fuse", gemma3, olmo2), ("fuse", gemma3, olmo2, "--format", "transformers")])
    for command in commands:
        _refused(cli(*command, "-o", tmp_path / "out", "--every", "1"),
                 f"a gemma3 checkpoint is not a {role} saved alone")
        assert not (tmp_path / "out").exists()


def test_native_gemma2_with_the_old_final_norm_name_fuses_validates_and_unfuses(tmp_path):
    # norm.scale (what fusesurgery wrote before torchtune's norm.rms_norm.scale) is still
    # read; fuse recorded it as the source of norm.rms_norm.scale, which validate and unfuse
    # then refused as 'the record is damaged'
    source = tmp_path / "gemma2"
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, sliding_window=4, pad_token_id=0,
        eos_token_id=1, bos_token_id=2)).save_pretrained(source)
    native = tmp_path / "native"
    assert cli("convert", source, "-o", native, "--to", "native").exit_code == 0
    [weights] = native.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["norm.scale"] = tensors.pop("norm.rms_norm.scale")
    save_file(tensors, weights, metadata={"format": "pt"})
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(clip)
    fused = tmp_path / "fused"
    result = cli("fuse", clip, native, "-o", fused, "--every", "1")
    assert result.exit_code == 0, result.output
    for against in (native, source):
        result = cli("validate", fused, "--against", against)
        assert result.exit_code == 0, result.output
    back = tmp_path / "back"
    result = cli("unfuse", fused, "-o", back)
    assert result.exit_code == 0, result.output
    unfused = load_file(next(back.glob("*.safetensors")))
    assert unfused.keys() == tensors.keys()  # the source's own names, norm.scale included
    assert all(torch.equal(unfused[key], tensors[key]) for key in tensors)
