"""The family files against transformers itself: each family's key rows are the names its
transformers class saves, its defaults are its config class's defaults, and the registry's
tables are one-to-one, exclusive and complete.

transformers is the independent reference: every model here is built from its classes.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors import safe_open

from fusesurgery.convert.keymaps import (
    HF_DECODER_FAMILY_TO_NATIVE,
    HF_DECODER_TO_NATIVE,
    HF_VISION_FAMILY_TO_NATIVE,
    HF_VISION_TO_NATIVE,
    NATIVE_DECODER_KEYS,
    NATIVE_VISION_KEYS,
    invert_key_map,
    split_layer_index,
    union_key_map,
)
from fusesurgery.errors import ConfigError, KeyMapError
from fusesurgery.families import (
    DECODER_FAMILIES,
    FAMILIES,
    VISION_FAMILIES,
    DecoderFamily,
    VisionFamily,
    closest_family,
    decoder_family,
    vision_family,
)

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
VISION_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, image_size=16, patch_size=8)


def _templates(keys) -> set[str]:
    return {split_layer_index(key)[0] for key in keys}


def _saved_keys(model, directory) -> list[str]:
    """The names ``save_pretrained`` writes (transformers 5 may rename on the way out)."""
    model.save_pretrained(directory)
    keys = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            keys.extend(f.keys())
    return keys


@pytest.mark.parametrize("name", sorted(DECODER_FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_decoder_key_rows_are_what_transformers_saves(tmp_path, name, tied):
    """The family's rows name exactly the tensors its transformers class holds (the LM head
    only when untied): a missing, extra or misspelt row fails here."""
    family = decoder_family(name)
    # (MinistralForCausalLM fails on an unstated head_dim: its attention takes the null)
    heads = {"head_dim": 8} if name == "ministral" else {}
    config = transformers.AutoConfig.for_model(family.model_types[0], **SIZES, **heads,
                                               tie_word_embeddings=tied)
    model = getattr(transformers, family.architectures[0])(config)
    saved = _templates(k for k in _saved_keys(model, tmp_path)
                       if not (tied and k == "lm_head.weight"))
    rows = set(family.hf_keys) | set(family.hf_fused_keys)
    assert saved == rows - (set() if not tied else {"lm_head.weight"})


@pytest.mark.parametrize("name", sorted(VISION_FAMILIES))
def test_vision_key_rows_are_what_transformers_saves(tmp_path, name):
    """The tower's rows plus the patterns it drops cover its transformers vision model's
    keys exactly (transformers 5 saves the bare model without ``vision_model.``, which the
    CLIP-spelled tables read by adding it)."""
    family = vision_family(name)
    sizes = dict(VISION_SIZES)
    if family.naflex:  # a position table of num_patches rows, no image size
        sizes.pop("image_size")
    prefix = "" if family.own_hf_names else "vision_model."
    saved: set[str] = set()
    for i, architecture in enumerate(family.architectures):  # (DINOv2: with registers too)
        model_cls = getattr(transformers, architecture)
        model = model_cls(model_cls.config_class(**sizes))
        saved |= _templates(prefix + key.removeprefix("vision_model.")
                            for key in _saved_keys(model, tmp_path / str(i)))
    dropped = {t for t in saved if any(re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), t)
                                       for p in family.hf_dropped)}
    assert saved - dropped == set(family.hf_keys)


@pytest.mark.parametrize("name", sorted(DECODER_FAMILIES))
def test_decoder_defaults_are_transformers_class_defaults(name):
    """What a config.json may leave out is read as the family's transformers config class
    assumes it (heads included: derived, or its own fixed head_dim / kv head count)."""
    family = decoder_family(name)
    config = transformers.AutoConfig.for_model(family.model_types[0], hidden_size=64,
                                               num_attention_heads=4)
    defaults = family.hf_defaults
    assert config.max_position_embeddings == defaults["max_seq_len"]
    assert config.rms_norm_eps == defaults["norm_eps"]
    assert config.tie_word_embeddings == defaults["tie_word_embeddings"]
    parameters = config.rope_parameters or {}
    parameters = parameters.get("full_attention", parameters)  # keyed by layer type (Gemma 3)
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    assert theta == defaults["rope_base"]
    head_dim = getattr(config, "head_dim", None) or 64 // 4
    assert head_dim == (family.unstated_heads["head_dim"] or 64 // 4)
    assert config.num_key_value_heads == (family.unstated_heads["num_kv_heads"] or 4)


@pytest.mark.parametrize("name", sorted(VISION_FAMILIES))
def test_vision_defaults_are_transformers_class_defaults(name):
    family = vision_family(name)
    config = transformers.AutoConfig.for_model(family.hf_model_type)
    assert config.layer_norm_eps == family.hf_defaults["norm_eps"]
    image_size = (int(config.num_patches ** 0.5) * config.patch_size if family.naflex
                  else config.image_size)
    assert image_size == family.hf_defaults["image_size"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_key_map_is_one_to_one_onto_native_keys(name):
    family = FAMILIES[name]
    native = NATIVE_DECODER_KEYS if family.kind == "decoder" else NATIVE_VISION_KEYS
    for table in (family.hf_keys, getattr(family, "meta_keys", {})):
        assert set(invert_key_map(table)) <= set(native)
    # a stacked tensor's parts are native keys no whole row names (each native key has one
    # source)
    parts = [part for stacked in getattr(family, "hf_fused_keys", {}).values()
             for part in stacked]
    assert set(parts) <= set(native)
    assert len(parts) == len(set(parts)) and not set(parts) & set(family.hf_keys.values())


def test_generic_tables_are_the_union_of_the_family_rows():
    assert set(HF_DECODER_TO_NATIVE) == {k for f in DECODER_FAMILIES.values() for k in f.hf_keys
                                         if not f.own_hf_names}
    assert set(HF_DECODER_FAMILY_TO_NATIVE) == {f.name for f in DECODER_FAMILIES.values()
                                                if f.own_hf_names}
    assert set(HF_VISION_TO_NATIVE) == {k for f in VISION_FAMILIES.values() for k in f.hf_keys
                                        if not f.own_hf_names}
    assert set(HF_VISION_FAMILY_TO_NATIVE) == {f.name for f in VISION_FAMILIES.values()
                                               if f.own_hf_names}


def test_union_refuses_two_families_that_spell_a_key_differently():
    with pytest.raises(KeyMapError, match="maps to 'norm.scale' in a but to 'x' in b"):
        union_key_map([("a", {"model.norm.weight": "norm.scale"}),
                       ("b", {"model.norm.weight": "x"})], "hf decoder")


@pytest.mark.parametrize("families", [DECODER_FAMILIES, VISION_FAMILIES])
def test_shape_markers_tell_families_apart(families):
    """No checkpoint can match two families' markers: each pair disagrees on some key."""
    marked = [f for f in families.values() if f.shape_markers]
    for i, first in enumerate(marked):
        for second in marked[i + 1:]:
            assert any(key in second.shape_markers and second.shape_markers[key] != wanted
                       for key, wanted in first.shape_markers.items()), (first.name, second.name)


def test_one_decoder_fallback_and_one_meta_family_without_marker():
    assert [f.name for f in DECODER_FAMILIES.values() if f.shape_fallback] == ["llama"]
    assert [f.name for f in DECODER_FAMILIES.values()
            if f.meta_layout and f.meta_params_marker is None] == ["llama"]


def test_unknown_family_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown decoder family 'gemma'; valid: "
                                          + ", ".join(DECODER_FAMILIES)):
        decoder_family("gemma")
    with pytest.raises(ConfigError, match="unknown vision family 'dino'; valid: "
                                          + ", ".join(VISION_FAMILIES)):
        vision_family("dino")


def test_family_data_is_read_only():
    with pytest.raises(TypeError):
        decoder_family("llama").hf_defaults["norm_eps"] = 1.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoder_family("llama").name = "x"  # type: ignore[misc]


def test_closest_family_from_relatives_and_from_key_names():
    assert closest_family("decoder", "olmo2").family.name == "llama"
    assert closest_family("decoder", "qwen3_moe").family.name == "qwen3"
    # a model type no file lists: the family whose transformers names cover the keys
    qk_norm_keys = [*decoder_family("qwen3").hf_keys, "model.layers.0.extra_norm.weight"]
    keys = [k.replace("{i}", "0") for k in qk_norm_keys]
    closest = closest_family("decoder", "brand_new", keys)
    assert closest.family.name == "qwen3" and "14 of its 14" in closest.why
    assert closest_family("vision", "brand_new", ["x.weight"]) is None
    advice = closest.advice()
    assert "fusesurgery/families/qwen3.py" in advice and "Adding a family" in advice


def test_every_family_has_a_file_and_a_kind():
    for name, family in FAMILIES.items():
        assert family.name == name
        assert isinstance(family, (DecoderFamily, VisionFamily))


def test_relatives_are_unsupported_model_types():
    supported = {t for f in FAMILIES.values() for t in f.model_types}
    for family in FAMILIES.values():
        assert not set(family.relatives) & supported, family.name


def test_native_rope_style_picks_the_q_k_transform():
    """The one per-family tensor transform: interleaved families permute HF's q/k rows."""
    from fusesurgery.config import DECODER_PRESETS
    from fusesurgery.convert.plan import layout_tensor_infos, plan_conversion
    from fusesurgery.convert.transforms import ROW_PERMUTATIONS

    for name in DECODER_FAMILIES:
        config = DECODER_PRESETS["tiny"].replace(family=name,
                                                 qk_norm=decoder_family(name).fixed["qk_norm"],
                                                 attn_bias=decoder_family(name).hf_defaults[
                                                     "attn_bias"])
        infos = layout_tensor_infos(config, "hf", dtype=torch.float32)
        plan = plan_conversion(infos, "hf", config)
        q = plan.entry("layers.0.attn.q_proj.weight")
        permuted = q.transform[0] in ROW_PERMUTATIONS  # (Phi-3's: rows cut from qkv_proj)
        assert permuted == (decoder_family(name).native_rope_style == "interleaved")


def test_readme_explains_every_field_of_a_family():
    """The README's "Adding a family" names each field a family file fills in, so a new
    field cannot be added without saying what it means."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Adding a family", 1)[1].split("\n## ", 1)[0]
    for cls in (DecoderFamily, VisionFamily):
        for spec in dataclasses.fields(cls):
            assert f"`{spec.name}`" in section, f"{cls.__name__}.{spec.name}"


def test_a_field_one_family_spells_is_fixed_in_every_other():
    """A native option only some families' config.json can state (SmolLM3's layers without
    RoPE) is an architecture fact of every other family, so it is read, written and refused
    everywhere."""
    spelled = {name for f in DECODER_FAMILIES.values() for name in f.hf_config_fields}
    for family in DECODER_FAMILIES.values():
        stated = set(family.hf_config_fields) | set(family.hf_config_keys.values())
        if family.hf_sliding_window in ("always", "use_sliding_window", "layer_types"):  # by rule
            stated |= {"sliding_window", "sliding_layers"}
        for name in spelled - stated:
            assert name in family.fixed, (family.name, name)
