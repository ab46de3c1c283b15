from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fusesurgery.convert import keymaps
from fusesurgery.convert.keymaps import (
    FROM_NATIVE,
    HF_DECODER_TO_NATIVE,
    NATIVE_DECODER_KEYS,
    NATIVE_VISION_KEYS,
    TO_NATIVE,
    from_native_key,
    invert_key_map,
    keys_from_native,
    keys_to_native,
    split_layer_index,
    to_native_key,
)
from fusesurgery.errors import KeyMapError


@pytest.mark.parametrize("kind_layout", sorted(TO_NATIVE))
def test_every_table_inverts_one_to_one(kind_layout):
    table = TO_NATIVE[kind_layout]
    inverse = FROM_NATIVE[kind_layout]
    assert len(inverse) == len(table)
    assert invert_key_map(inverse) == table


def test_a_non_injective_table_is_refused():
    broken = dict(HF_DECODER_TO_NATIVE)
    broken["model.layers.{i}.mlp.gate_proj2.weight"] = "layers.{i}.mlp.w1.weight"
    with pytest.raises(KeyMapError, match="not one-to-one.*gate_proj.*gate_proj2"):
        invert_key_map(broken)


def test_a_table_entry_losing_its_layer_placeholder_is_refused():
    with pytest.raises(KeyMapError, match="must carry one"):
        invert_key_map({"model.layers.{i}.x.weight": "layers.0.x.weight"})


@pytest.mark.parametrize(
    ("hf", "meta", "native"),
    [
        ("model.embed_tokens.weight", "tok_embeddings.weight", "tok_embeddings.weight"),
        ("model.layers.7.input_layernorm.weight", "layers.7.attention_norm.weight",
         "layers.7.sa_norm.scale"),
        ("model.layers.7.self_attn.q_proj.weight", "layers.7.attention.wq.weight",
         "layers.7.attn.q_proj.weight"),
        ("model.layers.7.self_attn.k_proj.weight", "layers.7.attention.wk.weight",
         "layers.7.attn.k_proj.weight"),
        ("model.layers.7.self_attn.v_proj.weight", "layers.7.attention.wv.weight",
         "layers.7.attn.v_proj.weight"),
        ("model.layers.7.self_attn.o_proj.weight", "layers.7.attention.wo.weight",
         "layers.7.attn.output_proj.weight"),
        ("model.layers.7.post_attention_layernorm.weight", "layers.7.ffn_norm.weight",
         "layers.7.mlp_norm.scale"),
        ("model.layers.7.mlp.gate_proj.weight", "layers.7.feed_forward.w1.weight",
         "layers.7.mlp.w1.weight"),
        ("model.layers.7.mlp.down_proj.weight", "layers.7.feed_forward.w2.weight",
         "layers.7.mlp.w2.weight"),
        ("model.layers.7.mlp.up_proj.weight", "layers.7.feed_forward.w3.weight",
         "layers.7.mlp.w3.weight"),
        ("model.norm.weight", "norm.weight", "norm.scale"),
        ("lm_head.weight", "output.weight", "output.weight"),
    ],
)
def test_decoder_maps_follow_the_spec_table(hf, meta, native):
    assert to_native_key(hf, "hf") == native
    assert to_native_key(meta, "meta") == native
    assert from_native_key(native, "hf") == hf
    assert from_native_key(native, "meta") == meta


def test_layer_indices_keep_their_spelling():
    assert split_layer_index("model.layers.125.mlp.up_proj.weight") == (
        "model.layers.{i}.mlp.up_proj.weight", "125",
    )
    assert split_layer_index("norm.weight") == ("norm.weight", None)
    assert to_native_key("model.layers.125.mlp.up_proj.weight", "hf") == "layers.125.mlp.w3.weight"


@pytest.mark.parametrize("fixture", ["hf_llama", "hf_mistral", "hf_qwen2"])
def test_real_hf_decoder_keys_all_map_and_come_back(fixture, request):
    saved = request.getfixturevalue(fixture)
    mapping = keys_to_native(saved.infos, "hf")
    assert mapping.dropped == {}
    native = set(mapping.mapping.values())
    templates = {split_layer_index(key)[0] for key in native}
    assert templates <= set(NATIVE_DECODER_KEYS)
    assert keys_from_native(native, "hf").mapping == {v: k for k, v in mapping.mapping.items()}


def test_qwen2_biases_map_and_have_no_meta_name(hf_qwen2):
    assert to_native_key("model.layers.1.self_attn.k_proj.bias", "hf") == (
        "layers.1.attn.k_proj.bias"
    )
    assert "lm_head.weight" not in hf_qwen2.infos  # tied: transformers does not save it
    with pytest.raises(KeyMapError, match="no name in the meta layout"):
        from_native_key("layers.1.attn.q_proj.bias", "meta")


@pytest.mark.parametrize(
    ("key", "layout"),
    [
        ("model.layers.3.self_attn.rotary_emb.inv_freq", "hf"),
        ("model.rotary_emb.inv_freq", "hf"),
        ("rope.freqs", "meta"),
    ],
)
def test_rope_buffers_are_dropped_and_reported(key, layout):
    assert to_native_key(key, layout) is None
    mapping = keys_to_native(["norm.weight", key] if layout == "meta" else [key], layout)
    assert mapping.dropped == {key: "RoPE frequency buffer, recomputed"}


def test_unknown_keys_are_listed_with_a_count():
    keys = ["model.norm.weight"] + [f"model.extra_{n}.weight" for n in range(7)]
    with pytest.raises(KeyMapError) as error:
        keys_to_native(keys, "hf")
    message = str(error.value)
    assert message.startswith("7 keys unknown to the decoder hf key map: model.extra_0.weight")
    assert "(+2 more)" in message
    assert "model.norm.weight" not in message


def test_unknown_kind_or_layout():
    with pytest.raises(KeyMapError, match="unknown key layout 'gguf'"):
        to_native_key("x", "gguf")
    with pytest.raises(KeyMapError, match="no 'meta' layout for a vision"):
        to_native_key("conv.weight", "meta", "vision")
    with pytest.raises(KeyMapError, match="the native and mllama layouts"):
        keys_to_native([], "hf", "fused")


# ----------------------------------------------------------------------------- vision

VISION_DROPPED = {
    "clip_vision": set(),
    "siglip_vision": {"head."},
    "clip": {"text_model.", "logit_scale", "text_projection.weight", "visual_projection.weight"},
    "siglip": {"text_model.", "logit_scale", "logit_bias", "vision_model.head."},
}


@pytest.mark.parametrize("name", sorted(VISION_DROPPED))
def test_real_vision_keys_map_and_drop_what_fusion_does_not_use(name, hf_vision_models):
    saved = hf_vision_models[name]
    mapping = keys_to_native(saved.infos, "hf", "vision")
    templates = {split_layer_index(key)[0] for key in mapping.mapping.values()}
    assert templates <= set(NATIVE_VISION_KEYS)
    dropped_groups = {
        next(p for p in VISION_DROPPED[name] if key.startswith(p)) for key in mapping.dropped
    }
    assert dropped_groups == VISION_DROPPED[name]
    assert len(mapping.mapping) + len(mapping.dropped) == len(saved.infos)


def test_vision_towers_of_full_models_match_the_bare_models(hf_vision_models):
    def native_keys(name):
        return set(keys_to_native(hf_vision_models[name].infos, "hf", "vision").mapping.values())

    assert native_keys("clip") == native_keys("clip_vision")
    assert native_keys("siglip") == native_keys("siglip_vision")
    assert "cls_token_embedding.weight" in native_keys("clip")
    assert "ln_pre.weight" in native_keys("clip")
    assert "conv.bias" in native_keys("siglip")
    assert "cls_token_embedding.weight" not in native_keys("siglip")


def test_both_spellings_of_one_vision_key_collide():
    with pytest.raises(KeyMapError, match="both map to 'conv.weight'"):
        keys_to_native(
            ["embeddings.patch_embedding.weight",
             "vision_model.embeddings.patch_embedding.weight"],
            "hf", "vision",
        )


def test_old_position_ids_buffer_is_dropped():
    key = "vision_model.embeddings.position_ids"
    dropped = keys_to_native([key], "hf", "vision").dropped
    assert dropped == {key: "position index buffer, recomputed"}


@pytest.mark.parametrize("name", ["clip_vision", "siglip_vision"])
def test_hf_vision_keys_written_from_native_load_in_transformers(name, hf_vision_models, tmp_path):
    import transformers

    saved = hf_vision_models[name]
    tensors = saved.tensors()
    mapping = keys_to_native(tensors, "hf", "vision")
    native = {mapping.mapping[k]: v for k, v in tensors.items() if k in mapping.mapping}
    written = keys_from_native(native, "hf", "vision").mapping
    assert all(key.startswith("vision_model.") for key in written.values())
    out = {written[key]: value + 1 for key, value in native.items()}  # distinguishable values
    save_file(out, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((saved.directory / "config.json").read_text())
    model_cls = getattr(transformers, saved.config["architectures"][0])
    loaded = model_cls.from_pretrained(tmp_path).state_dict()
    for key, value in tensors.items():
        if key in mapping.mapping:
            assert torch.equal(loaded[key], value + 1), key


# ----------------------------------------------------------------------------- fused


def test_fused_keys_pass_through_unchanged():
    keys = [
        "decoder.tok_embeddings.weight",
        "decoder.tok_embeddings.fusion_embedding.weight",
        "decoder.layers.3.attn.q_proj.weight",
        "decoder.layers.3.fusion_layer.attn.k_norm.scale",
        "decoder.layers.3.fusion_layer.ca_scale.scale",
        "decoder.output.weight",
        "encoder.vision.conv.weight",
        "encoder.projection.output.weight",
        "encoder.clip.token_pos_embedding.global_token_positional_embedding",
    ]
    mapping = keys_to_native(keys, "native", "fused")
    assert mapping.mapping == {key: key for key in keys}
    assert keys_from_native(keys, "native", "fused").mapping == mapping.mapping


@pytest.mark.parametrize(
    "key", ["decoder.layers.3.fusion_layer.bogus.weight", "layers.0.attn.q_proj.weight",
            "decoder.layers.3.layer.attn.q_proj.weight"],
)
def test_fused_keys_outside_the_layout_are_unknown(key):
    with pytest.raises(KeyMapError, match="1 keys unknown"):
        keys_to_native([key], "native", "fused")


def test_native_layout_still_checks_names():
    assert to_native_key("layers.0.attn.q_proj.weight", "native") == "layers.0.attn.q_proj.weight"
    with pytest.raises(KeyMapError, match="unknown key"):
        to_native_key("layers.0.attention.wq.weight", "native")
    assert keymaps.dropped_reason("layers.0.attention.wq.weight", "native") is None
