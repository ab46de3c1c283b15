"""Sliding windows of the families whose transformers config states one by rule (Mistral,
Phi-3: every layer; Ministral: the layers layer_types names; Qwen2, Qwen3: from
max_window_layers on; SmolLM3: the layers without RoPE), modelled natively: load_decoder
equals transformers past the window, in one forward and in cached decoding, and the layers
are the ones transformers slides."""

from __future__ import annotations

import pytest
import torch

from fusesurgery import load_decoder
from tests.tiny_models import save_tiny_hf_decoder

transformers = pytest.importorskip("transformers")

WINDOW = 4
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
# family -> (settings, the layers transformers slides)
CASES = {
    "mistral": (dict(sliding_window=WINDOW), (0, 1, 2, 3)),
    # Ministral: the layers layer_types names (head_dim 12, not 32 / 4)
    "ministral": (dict(sliding_window=WINDOW, head_dim=12,
                       layer_types=["sliding_attention", "full_attention",
                                    "sliding_attention", "sliding_attention"]), (0, 2, 3)),
    # Phi-3: every layer where config.json states a window (Phi-3 mini's 2047), none otherwise
    "phi3": (dict(sliding_window=WINDOW, pad_token_id=0), (0, 1, 2, 3)),
    "qwen2": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
              (1, 2, 3)),
    "qwen3": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
              (2, 3)),
    # SmolLM3 slides the layers without RoPE (every 2nd here)
    "smollm3": (dict(use_sliding_window=True, sliding_window=WINDOW,
                     no_rope_layer_interval=2), (1, 3)),
}


def _save(family: str, directory):
    if family != "smollm3":
        return save_tiny_hf_decoder(family, directory, SIZES, **CASES[family][0])
    torch.manual_seed(0)
    model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
        **SIZES, **CASES[family][0], pad_token_id=0))
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", sorted(CASES))
def test_windowed_layers_equal_transformers_past_the_window(tmp_path, family):
    source = _save(family, tmp_path / family)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32).eval()
    decoder = load_decoder(source, dtype=torch.float32).eval()
    sliding = tuple(i for i, layer in enumerate(decoder.layers)
                    if layer.attn.sliding_window == WINDOW)
    assert sliding == CASES[family][1]
    tokens = torch.randint(0, 64, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(tokens).logits
        torch.testing.assert_close(decoder(tokens), theirs, rtol=0, atol=1e-5)
        decoder.setup_caches(2, torch.float32, decoder_max_seq_len=32)
        steps = [decoder(tokens[:, :3])]
        steps += [decoder(tokens[:, p:p + 1]) for p in range(3, tokens.size(1))]
        torch.testing.assert_close(torch.cat(steps, dim=1), theirs, rtol=0, atol=1e-5)


def test_the_mllama_export_refuses_a_window_it_would_drop(tmp_path):
    """Mllama's text layers attend to every earlier token: a fused windowed Mistral would
    compute something else there, so the export says why in one line and writes nothing; a
    window no shorter than the positions changes nothing and exports."""
    import fusesurgery  # noqa: PLC0415
    from fusesurgery.errors import ConfigError  # noqa: PLC0415
    from fusesurgery.write import convert_checkpoint  # noqa: PLC0415
    from tests.fusion_inputs import save_encoder  # noqa: PLC0415

    encoder = save_encoder("clip", tmp_path)
    for window, refused in ((WINDOW, True), (64, False)):
        decoder = save_tiny_hf_decoder("mistral", tmp_path / f"mistral{window}", SIZES,
                                       sliding_window=window)
        fused, out = tmp_path / f"fused{window}", tmp_path / f"mllama{window}"
        fusesurgery.fuse(encoder, decoder, fused, every=2)
        if refused:
            with pytest.raises(ConfigError, match="sliding window of 4 tokens"):
                convert_checkpoint(fused, out, to="mllama")
            assert not out.exists()
        else:
            convert_checkpoint(fused, out, to="mllama")
            assert (out / "config.json").exists()


@pytest.mark.parametrize(("config", "layout"), [
    # no layer_types: every layer slides when a window is stated, 4096 when the file is silent
    (dict(sliding_window=WINDOW), (WINDOW, (0, 1, 2, 3))),
    (dict(), (4096, (0, 1, 2, 3))),
    (dict(sliding_window=None), (None, ())),
    # layer_types names the layers; a null window slides none of them
    (dict(sliding_window=WINDOW, layer_types=["full_attention", "sliding_attention"] * 2),
     (WINDOW, (1, 3))),
    (dict(sliding_window=None, layer_types=["sliding_attention"] * 4), (None, ())),
])
def test_ministral_window_layout_is_what_its_config_class_builds(config, layout):
    """As MinistralConfig fills layer_types in when config.json leaves it out, and as its
    attention applies the window only to the sliding layers."""
    from fusesurgery.convert.configs import hf_window_layout  # noqa: PLC0415

    assert hf_window_layout({"num_hidden_layers": 4, **config}, "ministral") == layout
    reference = transformers.MinistralConfig(**SIZES, head_dim=8, **config)
    model = transformers.MinistralForCausalLM(reference)
    sliding = tuple(i for i, layer in enumerate(model.model.layers)
                    if layer.self_attn.sliding_window is not None)
    assert sliding == layout[1]


def test_a_layer_types_list_of_another_length_is_refused():
    from fusesurgery.convert.configs import hf_window_layout  # noqa: PLC0415
    from fusesurgery.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="layer_types has 2 entries for 4 layers"):
        hf_window_layout({"num_hidden_layers": 4, "sliding_window": WINDOW,
                          "layer_types": ["sliding_attention"] * 2}, "ministral")
