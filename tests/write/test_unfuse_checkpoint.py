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


EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples"


def _json(path):
    import json

    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def fused_llama(tmp_path_factory, llama):
    """A tiny HF Llama (no RoPE scaling, so Meta's params.json can say it) fused with CLIP."""
    import fusesurgery
    from tests.fusion_inputs import save_encoder

    root = tmp_path_factory.mktemp("fused_llama")
    fusesurgery.fuse(save_encoder("clip", root), llama, root / "fused", every=2)
    return root / "fused"


@pytest.mark.parametrize("fmt", ["meta", "native"])
def test_unfuse_to_meta_or_native_keeps_the_transformers_config(tmp_path, llama, fused_llama,
                                                                 fmt):
    """As convert --to meta/native does, the decoder's own config.json travels as
    hf_config.json, so a later convert --to hf gives back its token ids, dtype and all."""
    from fusesurgery.write import convert_checkpoint

    result = cli("unfuse", fused_llama, "-o", tmp_path / fmt, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert (tmp_path / fmt / "hf_config.json").read_bytes() == (
        llama / "config.json").read_bytes()
    convert_checkpoint(tmp_path / fmt, tmp_path / "hf", to="hf")
    assert _json(tmp_path / "hf" / "config.json") == _json(llama / "config.json")


def test_unfuse_of_a_decoder_fused_from_native_starts_hf_from_its_hf_config(tmp_path, llama):
    """A native decoder with its hf_config.json beside it (convert --to native's output):
    fuse keeps the file, unfuse gives it back, and --format hf starts from it."""
    import fusesurgery
    from fusesurgery.write import convert_checkpoint
    from tests.fusion_inputs import save_encoder

    convert_checkpoint(llama, tmp_path / "native", to="native")
    fusesurgery.fuse(save_encoder("clip", tmp_path), tmp_path / "native", tmp_path / "fused",
                     every=2)
    fusesurgery.unfuse(tmp_path / "fused", tmp_path / "back")
    for name in ("config.json", "hf_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (
            tmp_path / "native" / name).read_bytes()
    fusesurgery.unfuse(tmp_path / "fused", tmp_path / "hf", format="hf")
    assert _json(tmp_path / "hf" / "config.json") == _json(llama / "config.json")
    assert not (tmp_path / "hf" / "hf_config.json").exists()


@pytest.fixture(scope="module")
def fused_f32(tmp_path_factory):
    """The bundled bf16 Llama fused with --dtype f32."""
    import torch

    import fusesurgery

    out = tmp_path_factory.mktemp("fused_f32") / "fused"
    fusesurgery.fuse(EXAMPLES / "tiny-clip-vision", EXAMPLES / "tiny-llama", out, every=2,
                     dtype=torch.float32)
    return out


def test_unfuse_dtype_gives_the_source_dtype_back(tmp_path, fused_f32):
    import json

    result = cli("unfuse", fused_f32, "-o", tmp_path / "back", "--dtype", "bf16", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dtype"] == "bfloat16"
    assert "cast to bfloat16: 39 tensors from float32" in summary["notes"]
    # bf16 -> f32 -> bf16 is exact: the source's bytes and config, dtype included
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (
        EXAMPLES / "tiny-llama" / "model.safetensors").read_bytes()
    assert _json(tmp_path / "back" / "config.json") == _json(
        EXAMPLES / "tiny-llama" / "config.json")

    result = cli("unfuse", fused_f32, "-o", tmp_path / "same", "--dtype", "f32")
    assert result.exit_code == 0, result.output
    assert "nothing to cast: every floating-point tensor is float32 already" in result.stderr
    assert _json(tmp_path / "same" / "config.json")["dtype"] == "float32"


def test_unfuse_dtype_with_merged_embeddings_and_meta(tmp_path, fused_f32):
    import torch
    from safetensors import safe_open

    from fusesurgery.io import open_checkpoint

    result = cli("unfuse", fused_f32, "-o", tmp_path / "merged", "--format", "hf",
                 "--merge-embeddings", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == 512 + 1
    assert _json(tmp_path / "merged" / "config.json")["dtype"] == "bfloat16"

    result = cli("unfuse", fused_f32, "-o", tmp_path / "native", "--format", "native",
                 "--dtype", "f16")
    assert result.exit_code == 0, result.output
    assert _json(tmp_path / "native" / "hf_config.json")["dtype"] == "float16"
    with open_checkpoint(tmp_path / "native") as source:
        assert {source.infos()[k].dtype for k in source.keys()} == {torch.float16}


def test_unfuse_dtype_refuses_what_is_no_cast_target(tmp_path, fused_f32):
    import torch

    import fusesurgery
    from fusesurgery.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot cast weights to"):
        fusesurgery.unfuse(fused_f32, tmp_path / "out", dtype=torch.int8)
    assert not (tmp_path / "out").exists()


def _copy(fused, tmp_path):
    import shutil

    return shutil.copytree(fused, tmp_path / "fused")


def test_unfuse_derives_a_missing_config_from_fusion_config(tmp_path, fused_example):
    """source/decoder/config.json gone: config.json is written from fusion_config.json's
    decoder config (ids from the generation config, dtype from the tensors), and transformers
    loads a model that computes the source's logits (the output had no config.json before)."""
    import torch
    import transformers as t

    fused = _copy(fused_example, tmp_path)
    (fused / "source" / "decoder" / "config.json").unlink()
    result = cli("unfuse", fused, "-o", tmp_path / "back")
    assert result.exit_code == 0, result.output
    assert "source/decoder/config.json is missing: config.json written from " \
           "fusion_config.json's decoder config" in result.stderr
    config = _json(tmp_path / "back" / "config.json")
    original = _json(EXAMPLES / "tiny-llama" / "config.json")
    for key in ("bos_token_id", "eos_token_id", "vocab_size", "num_key_value_heads"):
        assert config[key] == original[key], key
    assert config["torch_dtype"] == "bfloat16"
    back = t.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    source = t.LlamaForCausalLM.from_pretrained(EXAMPLES / "tiny-llama").eval()
    tokens = torch.tensor([[1, 17, 42, 7]])
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, source(tokens).logits)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (
            EXAMPLES / "tiny-llama" / name).read_bytes()


def test_unfuse_refuses_a_missing_tokenizer_unless_allowed(tmp_path, fused_example):
    fused = _copy(fused_example, tmp_path)
    (fused / "source" / "decoder" / "tokenizer.json").unlink()
    assert_one_line_error(cli("unfuse", fused, "-o", tmp_path / "back"),
                          "source/decoder/ lacks tokenizer.json", "--allow-missing")
    assert not (tmp_path / "back").exists()

    result = cli("unfuse", fused, "-o", tmp_path / "back", "--allow-missing")
    assert result.exit_code == 0, result.output
    assert "written without tokenizer.json: missing from source/decoder/" in result.stderr
    assert not (tmp_path / "back" / "tokenizer.json").exists()
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    # merged, the output takes the fused tokenizer: the source's is not needed
    result = cli("unfuse", fused, "-o", tmp_path / "merged", "--merge-embeddings")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (
        fused / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_unfuse_without_source_directory(tmp_path, fused_example, part):
    """source/ gone altogether: the config derived, the generation / processor config from
    the fused directory's unchanged copy; the decoder's tokenizer cannot be derived."""
    import shutil

    fused = _copy(fused_example, tmp_path)
    shutil.rmtree(fused / "source")
    out = tmp_path / "back"
    if part == "decoder":
        assert_one_line_error(cli("unfuse", fused, "-o", out),
                              "lacks tokenizer.json, tokenizer_config.json")
        result = cli("unfuse", fused, "-o", out, "--allow-missing")
    else:
        result = cli("unfuse", fused, "-o", out, "--part", "encoder")
    assert result.exit_code == 0, result.output
    copied = "generation_config.json" if part == "decoder" else "preprocessor_config.json"
    assert f"source/{part}/{copied} is missing: {copied} is the fused directory's copy" \
        in result.stderr
    source = EXAMPLES / ("tiny-llama" if part == "decoder" else "tiny-clip-vision")
    assert (out / copied).read_bytes() == (source / copied).read_bytes()
    config, original = _json(out / "config.json"), _json(source / "config.json")
    assert config["architectures"] == original["architectures"]
    assert config["hidden_size"] == original["hidden_size"]


def test_unfuse_of_mllama_carries_its_token_ids(tmp_path):
    """An Mllama checkpoint keeps no source/ files: the Llama config derived for its text
    model takes the Mllama config's token ids, and its generation config comes along."""
    path = save_mllama_causal(tmp_path / "mllama")
    result = cli("unfuse", path, "-o", tmp_path / "llama")
    assert result.exit_code == 0, result.output
    config, original = _json(tmp_path / "llama" / "config.json"), _json(path / "config.json")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == original[key], key
    assert (tmp_path / "llama" / "generation_config.json").read_bytes() == (
        path / "generation_config.json").read_bytes()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_convert_of_a_whole_clip_or_siglip_model_writes_the_vision_config(tmp_path, family):
    """convert --to hf of a CLIPModel / SiglipModel (its vision half) writes the vision
    model's own config, not the whole model's with vision fields over it."""
    import torch
    import transformers as t

    from fusesurgery.write import convert_checkpoint
    from tests.reports.diff_checkpoints import HF_VISION
    from tests.tiny_models import TINY_TEXT

    torch.manual_seed(0)
    if family == "clip":
        source = t.CLIPModel(t.CLIPConfig(vision_config=HF_VISION, text_config=TINY_TEXT,
                                          projection_dim=24))
    else:
        source = t.SiglipModel(t.SiglipConfig(vision_config=HF_VISION, text_config=TINY_TEXT))
    source.save_pretrained(tmp_path / family)
    convert_checkpoint(tmp_path / family, tmp_path / "hf", to="hf")
    config = _json(tmp_path / "hf" / "config.json")
    assert "text_config" not in config and "vision_config" not in config, sorted(config)
    model, info = t.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model) is {"clip": t.CLIPVisionModel, "siglip": t.SiglipVisionModel}[family]
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_unfuse_with_a_kept_config_that_is_not_json(tmp_path, fused_example, part):
    fused = _copy(fused_example, tmp_path)
    (fused / "source" / part / "config.json").write_text("{not json")
    assert_one_line_error(cli("unfuse", fused, "-o", tmp_path / "back", "--part", part),
                          f"source/{part}/config.json: not valid JSON")
    assert not (tmp_path / "back").exists()
