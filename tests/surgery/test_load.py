"""Loaded modules against transformers, the independent reference implementation."""

import json

import pytest
import torch
import transformers as tf

from fusesurgery import load_decoder, load_encoder
from fusesurgery.convert import plan_conversion
from fusesurgery.errors import ConfigError, FuseSurgeryError
from fusesurgery.io import open_checkpoint
from fusesurgery.surgery import detect_checkpoint
from tests.tiny_models import torchtune_state_dict

SMALL = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

DECODERS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, rms_norm_eps=1e-5)),
    "llama3.1": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **SMALL, rope_theta=500_000.0, rope_scaling=LLAMA31_ROPE)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**SMALL, sliding_window=None)),
    "qwen2-tied": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen2-untied": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        **SMALL, tie_word_embeddings=False, rope_theta=1_000_000.0)),
}



def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_decoder_logits_match_transformers(tmp_path, name, safe):
    reference = DECODERS[name]().eval()
    reference.save_pretrained(tmp_path, safe_serialization=safe)
    decoder = load_decoder(tmp_path).eval()
    # longer than original_max_position_embeddings so the Llama 3.1 scaling matters
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 40))
    with torch.no_grad():
        ours = decoder(tokens)
    torch.testing.assert_close(ours, hf_logits(reference, tokens), rtol=0, atol=1e-5)
    detected = detect_checkpoint(tmp_path)
    assert detected.provenance["num_heads"] == "read"
    if name.startswith("qwen2"):
        assert (decoder.output is None) == (name == "qwen2-tied")
        assert decoder.layers[0].attn.q_proj.bias is not None
        assert decoder.layers[0].attn.pos_embeddings.style == "half"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_torchtune_style_native_qwen2_matches_transformers(tmp_path, tied):
    """A native Qwen2 checkpoint as torchtune writes it (renamed, not permuted) gives
    transformers' logits, in one pass and decoding token by token with the KV cache."""
    from safetensors.torch import save_file

    name = "qwen2-tied" if tied else "qwen2-untied"
    reference = DECODERS[name]().eval()
    reference.save_pretrained(tmp_path / "hf")
    native = tmp_path / "native"
    native.mkdir()
    save_file(torchtune_state_dict(reference.state_dict(), "qwen2", reference.config),
              native / "model.safetensors")
    (native / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    detected = detect_checkpoint(native)
    assert (detected.layout, detected.family) == ("native", "qwen2")

    decoder = load_decoder(native).eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 40))
    expected = hf_logits(reference, tokens)
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), expected, rtol=0, atol=1e-5)
        decoder.setup_caches(2, torch.float32, decoder_max_seq_len=64)
        prompt = 7
        steps = [decoder(tokens[:, :prompt], input_pos=torch.arange(prompt).expand(2, prompt))]
        steps += [decoder(tokens[:, p:p + 1], input_pos=torch.full((2, 1), p))
                  for p in range(prompt, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=0, atol=1e-5)


def test_loaded_parameters_share_the_file_pages(tmp_path):
    """A native-layout checkpoint loads without copying: parameters are views of the mmap."""
    reference = DECODERS["llama"]().eval()
    reference.save_pretrained(tmp_path / "hf")
    from fusesurgery.write import write_safetensors

    with open_checkpoint(tmp_path / "hf") as source:
        detected = detect_checkpoint(tmp_path / "hf")
        plan = plan_conversion(source.infos(), "hf", detected.config)
        write_safetensors(tmp_path / "native", list(plan.target_infos().values()),
                          lambda k: _convert(plan, source, k),
                          extra_files={"config.json": json.dumps(source.config)})
    decoder = load_decoder(tmp_path / "native")
    maps = open("/proc/self/maps").read().splitlines()
    mapped = [line for line in maps if "native" in line and "model.safetensors" in line]
    assert mapped, "checkpoint file is not mapped"
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
    weight = decoder.layers[0].mlp.w1.weight
    assert any(lo <= weight.data_ptr() < hi for lo, hi in ranges)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), hf_logits(reference, tokens),
                                   rtol=0, atol=1e-5)


def _convert(plan, source, key):
    from fusesurgery.convert import apply_plan_entry

    entry = plan.entry(key)
    return apply_plan_entry(entry, source.get_tensor(entry.source_key))


def test_meta_checkpoint_matches_its_hf_twin(tmp_path):
    reference = DECODERS["llama"]().eval()
    reference.save_pretrained(tmp_path / "hf")
    meta = tmp_path / "meta"
    meta.mkdir()
    with open_checkpoint(tmp_path / "hf") as source:
        detected = detect_checkpoint(tmp_path / "hf")
        plan = plan_conversion(source.infos(), "hf", detected.config, target_layout="meta")
        state = {key: _convert(plan, source, key).clone() for key in plan.target_keys}
    torch.save(state, meta / "consolidated.00.pth")
    cfg = detected.config
    (meta / "params.json").write_text(json.dumps({
        "dim": cfg.embed_dim, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads,
        "n_kv_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base, "use_scaled_rope": False,
        "multiple_of": 32, "ffn_dim_multiplier": None,
    }))
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12))
    decoder = load_decoder(meta, overrides={"intermediate_dim": 96})
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), hf_logits(reference, tokens),
                                   rtol=0, atol=1e-5)


def test_dtype_cast_and_wrong_kind(tmp_path):
    DECODERS["llama"]().save_pretrained(tmp_path)
    decoder = load_decoder(tmp_path, dtype=torch.bfloat16)
    assert decoder.tok_embeddings.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="not a vision"):
        load_encoder(tmp_path)


def test_missing_head_count_names_the_flag(tmp_path):
    model = DECODERS["llama"]()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "model.safetensors")
    with pytest.raises(FuseSurgeryError, match="--num-heads"):
        load_decoder(tmp_path / "model.safetensors")
    decoder = load_decoder(tmp_path / "model.safetensors",
                           overrides={"num_heads": 4})
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), hf_logits(model.eval(), tokens),
                                   rtol=0, atol=1e-5)


VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=99, max_position_embeddings=16)

ENCODERS = {
    "clip-vision": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)),
    "siglip-vision": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)),
    "clip-full": lambda: tf.CLIPModel(tf.CLIPConfig(
        vision_config=VISION, text_config=TEXT, projection_dim=16)),
    "siglip-full": lambda: tf.SiglipModel(tf.SiglipConfig(
        vision_config=VISION, text_config=TEXT)),
}


def vision_outputs(model, images):
    tower = model.vision_model if hasattr(model, "text_model") else model
    with torch.no_grad():
        return tower(pixel_values=images, output_hidden_states=True)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_hidden_states_match_transformers(tmp_path, name):
    reference = ENCODERS[name]().eval()
    reference.save_pretrained(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    expected = vision_outputs(reference, images)
    encoder = load_encoder(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), expected.last_hidden_state,
                                   rtol=0, atol=1e-5)
    penultimate = load_encoder(tmp_path, output_layer=-2).eval()
    with torch.no_grad():
        out = penultimate(images)
    torch.testing.assert_close(out, expected.hidden_states[-2], rtol=0, atol=1e-5)
    assert out.shape == (2, 16 + name.startswith("clip"), 48)
