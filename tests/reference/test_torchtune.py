"""The native layout against torchtune 0.6.1 itself, for every decoder family it has.

For each family: a tiny source built and saved by transformers; torchtune's own converter run
on its tensors; ``fusesurgery convert --to native`` and the decoder half of ``fusesurgery fuse``
compared with that (the same keys, bitwise values); torchtune's own model built with its
component builder at the same sizes, our native checkpoint loaded into it with
``strict=True``, and its logits compared with transformers' wherever torchtune computes what
transformers does. Last, torchtune's fusion decoder, assembled from ``torchtune.modules`` as
its ``llama3_2_vision_decoder`` builder assembles it (that module imports torchvision, which
cannot be installed beside the CPU torch), loads a fused checkpoint's decoder strictly and
computes our ``load_fused`` logits; and torchtune's ``llama3_vision_hf_to_tune`` gives the
decoder half of a transformers Mllama checkpoint converted to native.

One deviation is deliberate and asserted: torchtune 0.6.1's ``gemma2_hf_to_tune`` files
Hugging Face's ``pre_feedforward_layernorm`` under ``mlp_scale`` (applied to the MLP's output)
and ``post_feedforward_layernorm`` under ``mlp_norm`` (applied to its input): the two swapped,
so torchtune's Gemma 2 loaded from its own conversion does not compute transformers' logits.
The native layout files each norm where torchtune's layer applies it, and so computes them.

torchtune is imported only here (a module-scoped fixture): it takes seconds and warns.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fusesurgery import load_decoder, load_fused, save_fused
from fusesurgery.cli.app import app
from fusesurgery.families import DECODER_FAMILIES
from tests.mllama_models import save_mllama_conditional
from tests.mllama_models import text_config as mllama_text_config
from tests.tiny_models import LLAMA3_SCALING, TINY_VISION, torchtune_state_dict

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# Phi-3's config names ids of its 32k vocabulary; the tiny one needs its own
PHI3_IDS = dict(pad_token_id=62, eos_token_id=62, bos_token_id=1)
LLAMA32_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Gemma 2: a window of 4 on the even layers (torchtune's fixed pattern, transformers' default),
# a score cap that bites; no final logit cap (torchtune caps the normed hidden state instead:
# see _build)
GEMMA2 = dict(head_dim=8, num_hidden_layers=2, sliding_window=4, attn_logit_softcapping=2.0,
              final_logit_softcapping=None, query_pre_attn_scalar=8)

# case -> (transformers family, config settings, torchtune converter, torchtune builder)
# (the transformers family lower-cased is tests/tiny_models.py's name for it)
CASES = {
    "llama3": ("Llama", dict(rope_theta=500_000.0), "hf_to_tune", "llama3"),
    "llama3.2-tied": ("Llama", dict(rope_theta=500_000.0, tie_word_embeddings=True,
                                    rope_scaling=LLAMA32_SCALING), "hf_to_tune", "llama3_2"),
    "mistral": ("Mistral", dict(), "hf_to_tune", "mistral"),
    # Mistral NeMo's head_dim of its own (12, not 32 / 4), which torchtune's Mistral model does
    # not take (it derives width / heads): names and values only
    "mistral-nemo": ("Mistral", dict(head_dim=12), "hf_to_tune", None),
    # Ministral: Mistral's names (torchtune's Mistral converter), a window on the layers
    # layer_types names (wider than the 12 tokens here: torchtune's Mistral has none)
    "ministral": ("Ministral", dict(head_dim=8, sliding_window=16,
                                    layer_types=["sliding_attention", "full_attention"]),
                  "hf_to_tune", "mistral"),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=False), "qwen2_hf_to_tune", "qwen2"),
    "qwen2.5-tied": ("Qwen2", dict(tie_word_embeddings=True), "qwen2_hf_to_tune", "qwen2"),
    "gemma2": ("Gemma2", GEMMA2, "gemma2_hf_to_tune", "gemma2"),
    "phi3-gqa": ("Phi3", dict(PHI3_IDS, tie_word_embeddings=False), "phi3_hf_to_tune", "phi3"),
    "phi3-mha": ("Phi3", dict(PHI3_IDS, num_key_value_heads=4), "phi3_hf_to_tune", "phi3"),
    # Phi-4-mini's shape: a quarter of each head unrotated, which torchtune's Phi-3 model does
    # not compute (no partial rotary): names and values only
    "phi4-mini-tied": ("Phi3", dict(PHI3_IDS, tie_word_embeddings=True,
                                    partial_rotary_factor=0.75), "phi3_hf_to_tune", None),
}
GEMMA2_SWAPPED = ("mlp_norm", "mlp_scale")
runner = CliRunner()


@pytest.fixture(scope="module")
def torchtune() -> types.SimpleNamespace:
    """torchtune's converters, component builders and modules."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("torchtune")
        names = ["torchtune.models.convert_weights", "torchtune.models.qwen2._convert_weights",
                 "torchtune.models.gemma2._convert_weights",
                 "torchtune.models.phi3._convert_weights", "torchtune.modules",
                 "torchtune.modules.model_fusion"]
        names += [f"torchtune.models.{family}._component_builders"
                  for family in ("llama3", "llama3_2", "mistral", "qwen2", "gemma2", "phi3")]
        names += ["torchtune.models.llama3_1._position_embeddings"]
        loaded = {name: importlib.import_module(name) for name in names}
        # torchtune.models.llama3_2_vision imports torchvision; its converter module alone
        # needs only torch and convert_weights, so it is loaded from its file
        package = Path(loaded["torchtune.models.convert_weights"].__file__).parent
        spec = importlib.util.spec_from_file_location(
            "torchtune_llama3_2_vision_convert_weights",
            package / "llama3_2_vision" / "_convert_weights.py")
        vision_converters = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(vision_converters)
    converters = {name: getattr(loaded[module], name) for module in names[:4]
                  for name in ("hf_to_tune", "qwen2_hf_to_tune", "gemma2_hf_to_tune",
                               "phi3_hf_to_tune") if hasattr(loaded[module], name)}
    builders = {family: getattr(loaded[f"torchtune.models.{family}._component_builders"],
                                family)
                for family in ("llama3", "llama3_2", "mistral", "qwen2", "gemma2", "phi3")}
    return types.SimpleNamespace(
        converters=converters, builders=builders, modules=loaded["torchtune.modules"],
        llama3_vision_hf_to_tune=vision_converters.llama3_vision_hf_to_tune,
        fusion=loaded["torchtune.modules.model_fusion"],
        llama3_mlp=loaded["torchtune.models.llama3._component_builders"].llama3_mlp,
        Llama3ScaledRoPE=loaded[
            "torchtune.models.llama3_1._position_embeddings"].Llama3ScaledRoPE)


@pytest.fixture(scope="module")
def clip_tower(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).save_pretrained(
        directory)
    return directory


def _save_source(case: str, directory: Path):
    """The case's ``*ForCausalLM``, every norm weight drawn at random (so a norm filed under
    another's name changes the logits), saved by transformers."""
    family, settings, _, _ = CASES[case]
    config = getattr(transformers, f"{family}Config")(**{**SIZES, **settings})
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.5)
    model.save_pretrained(directory)
    return model


def _torchtune_conversion(torchtune, case: str, model, source: Path) -> dict[str, torch.Tensor]:
    """torchtune's converter on the tensors saved in ``source``, called as its HF checkpointer
    calls it."""
    hf_state = load_file(source / "model.safetensors")
    config, converter = model.config, CASES[case][2]
    heads, kv_heads, dim = (config.num_attention_heads, config.num_key_value_heads,
                            config.hidden_size)
    convert = torchtune.converters[converter]
    if converter == "phi3_hf_to_tune":  # the checkpointer passes the sizes only for GQA
        sizes = (None, None, None) if heads == kv_heads else (heads, kv_heads, dim)
        return convert(hf_state, *sizes)
    extra = ({"tie_word_embeddings": config.tie_word_embeddings}
             if converter == "qwen2_hf_to_tune" else {})
    return convert(hf_state, num_heads=heads, num_kv_heads=kv_heads, dim=dim,
                   head_dim=getattr(config, "head_dim", None), **extra)


def _as_native(case: str, torchtune_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the native layout holds for torchtune's conversion: the same, but for Gemma 2's
    feed-forward norms, which torchtune 0.6.1 files under each other's names (see the module
    docstring and test_torchtune_gemma2_from_its_own_converter_is_not_transformers)."""
    if CASES[case][0] != "Gemma2":
        return dict(torchtune_state)
    first, second = GEMMA2_SWAPPED
    return {key.replace(f".{first}.", f".{second}.") if f".{first}." in key
            else key.replace(f".{second}.", f".{first}."): tensor
            for key, tensor in torchtune_state.items()}


def _tokens() -> torch.Tensor:
    """``[2, 12]`` token ids: past Gemma 2's window of 4."""
    return torch.randint(0, SIZES["vocab_size"], (2, 12),
                         generator=torch.Generator().manual_seed(0))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, whatever its shards."""
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _assert_bitwise(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    different = [key for key in reference if not torch.equal(ours[key], reference[key])]
    assert not different, different


def _build(torchtune, case: str, config) -> torch.nn.Module:
    """torchtune's model for the case, from its component builder at the source's sizes."""
    builder = CASES[case][3]
    sizes = dict(vocab_size=config.vocab_size, num_layers=config.num_hidden_layers,
                 num_heads=config.num_attention_heads,
                 num_kv_heads=config.num_key_value_heads, embed_dim=config.hidden_size,
                 intermediate_dim=config.intermediate_size,
                 max_seq_len=config.max_position_embeddings, norm_eps=config.rms_norm_eps)
    rope_base = config.rope_parameters["rope_theta"]
    if builder == "llama3_2":
        extra = dict(rope_base=rope_base, scale_factor=int(LLAMA32_SCALING["factor"]),
                     tie_word_embeddings=config.tie_word_embeddings)
    elif builder == "qwen2":
        extra = dict(rope_base=rope_base, tie_word_embeddings=config.tie_word_embeddings)
    elif builder == "gemma2":
        # torchtune's final norm caps the normed hidden state (transformers caps the logits,
        # here switched off): a cap this wide is the identity to float32 rounding
        extra = dict(rope_base=rope_base, head_dim=config.head_dim,
                     hidden_capping_value=config.attn_logit_softcapping,
                     final_capping_value=1e9, sliding_window_size=config.sliding_window,
                     query_pre_attn_scalar=config.query_pre_attn_scalar)
    else:
        extra = dict(rope_base=rope_base)
    torch.manual_seed(1)
    return torchtune.builders[builder](**sizes, **extra).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_and_fuse_write_torchtunes_conversion(tmp_path, torchtune, clip_tower, case):
    model = _save_source(case, tmp_path / "hf")
    expected = _as_native(case, _torchtune_conversion(torchtune, case, model, tmp_path / "hf"))
    # the other tests' stand-in for torchtune's converter (tests/tiny_models.py) is exact
    hf_state = load_file(tmp_path / "hf" / "model.safetensors")
    _assert_bitwise(torchtune_state_dict(hf_state, CASES[case][0].lower(), model.config),
                    expected)

    result = runner.invoke(app, ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "native"),
                                 "--to", "native"])
    assert result.exit_code == 0, result.output
    _assert_bitwise(load_file(tmp_path / "native" / "model.safetensors"), expected)

    result = runner.invoke(app, ["fuse", str(clip_tower), str(tmp_path / "hf"), "-o",
                                 str(tmp_path / "fused"), "--every", "1"])
    assert result.exit_code == 0, result.output
    decoder = {key.removeprefix("decoder."): tensor
               for key, tensor in _tensors(tmp_path / "fused").items()
               if key.startswith("decoder.") and ".fusion_layer." not in key
               and ".fusion_embedding." not in key}
    _assert_bitwise(decoder, expected)


@pytest.mark.parametrize("case", sorted(case for case in CASES if CASES[case][3]))
def test_torchtune_loads_native_strictly_and_computes_transformers(tmp_path, torchtune, case):
    model = _save_source(case, tmp_path / "hf")
    result = runner.invoke(app, ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "native"),
                                 "--to", "native"])
    assert result.exit_code == 0, result.output
    reference = _build(torchtune, case, model.config)
    reference.load_state_dict(load_file(tmp_path / "native" / "model.safetensors"), strict=True)
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(reference(tokens), model(tokens).logits, rtol=0, atol=1e-5)


def test_torchtune_gemma2_from_its_own_converter_is_not_transformers(tmp_path, torchtune):
    """Why Gemma 2's native feed-forward norms are not torchtune's converter's: its own model,
    loaded from its own conversion, is off transformers by far more than rounding."""
    model = _save_source("gemma2", tmp_path / "hf")
    reference = _build(torchtune, "gemma2", model.config)
    converted = _torchtune_conversion(torchtune, "gemma2", model, tmp_path / "hf")
    reference.load_state_dict(converted, strict=True)
    tokens = _tokens()
    with torch.no_grad():
        gap = (reference(tokens) - model(tokens).logits).abs().max().item()
    assert gap > 1e-2


def _respell(directory: Path, old: str, new: str) -> None:
    """Rename one tensor in a written checkpoint (and in the JSON files beside it), as an
    earlier fusesurgery spelled it."""
    for shard in directory.glob("*.safetensors"):
        tensors = load_file(shard)
        if old in tensors:
            tensors[new] = tensors.pop(old)
            save_file(tensors, shard, metadata={"format": "pt"})
    for side in directory.glob("*.json"):
        side.write_text(side.read_text().replace(f'"{old}"', f'"{new}"'))


def test_gemma2_final_norm_spelled_as_before_is_still_read(tmp_path, clip_tower):
    """Native and fused Gemma 2 checkpoints written before the final norm took torchtune's
    name (``norm.scale``) load, convert back and unfuse as the current spelling does."""
    model = _save_source("gemma2", tmp_path / "hf")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    tokens = _tokens()
    native = tmp_path / "native"
    assert runner.invoke(app, ["convert", str(tmp_path / "hf"), "-o", str(native), "--to",
                               "native"]).exit_code == 0
    _respell(native, "norm.rms_norm.scale", "norm.scale")
    with torch.no_grad():
        torch.testing.assert_close(load_decoder(native)(tokens), model(tokens).logits,
                                   rtol=0, atol=1e-5)
    result = runner.invoke(app, ["convert", str(native), "-o", str(tmp_path / "back"), "--to",
                                 "hf"])
    assert result.exit_code == 0, result.output
    _assert_bitwise(load_file(tmp_path / "back" / "model.safetensors"), original)

    fused = tmp_path / "fused"
    assert runner.invoke(app, ["fuse", str(clip_tower), str(tmp_path / "hf"), "-o", str(fused),
                               "--every", "1"]).exit_code == 0
    _respell(fused, "decoder.norm.rms_norm.scale", "decoder.norm.scale")
    _respell(fused, "norm.rms_norm.scale", "norm.scale")  # fusion_config.json's source_keys
    assert "decoder.norm.scale" in _tensors(fused)
    decoder = load_fused(fused, part="decoder")
    assert torch.equal(decoder.norm.rms_norm.scale, original["model.norm.weight"])
    result = runner.invoke(app, ["unfuse", str(fused), "-o", str(tmp_path / "unfused")])
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(tmp_path / "unfused"), original)


def _torchtune_vision_decoder(torchtune, config, *, fusion_interval: int, new_tokens: int,
                              ca_norm_eps: float, qk_norm_eps: float) -> torch.nn.Module:
    """torchtune's Llama 3.2 Vision decoder at the Llama ``config``'s sizes, assembled from
    ``torchtune.modules`` as ``llama3_2_vision_decoder`` assembles it (which cannot be
    imported here: its package imports torchvision): a ``FusionLayer`` around every
    ``fusion_interval``-th layer, a ``FusionEmbedding`` with ``new_tokens`` rows. The builder
    leaves the cross-attention layer's two norms at RMSNorm's default epsilon (1e-6) and its
    q/k norms at 1e-5; here they take the epsilons the fused checkpoint records (SPEC.md,
    section 2)."""
    tt = torchtune.modules
    d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim, hidden = d // heads, config.intermediate_size
    eps = config.rms_norm_eps
    rope = torchtune.Llama3ScaledRoPE(dim=head_dim, max_seq_len=config.max_position_embeddings,
                                      base=config.rope_parameters["rope_theta"])

    def attention(**extra):
        return tt.MultiHeadAttention(
            embed_dim=d, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            q_proj=torch.nn.Linear(d, heads * head_dim, bias=False),
            k_proj=torch.nn.Linear(d, kv_heads * head_dim, bias=False),
            v_proj=torch.nn.Linear(d, kv_heads * head_dim, bias=False),
            output_proj=torch.nn.Linear(d, d, bias=False), attn_dropout=0.0, **extra)

    layers = torch.nn.ModuleList()
    for index in range(1, config.num_hidden_layers + 1):
        layer = tt.TransformerSelfAttentionLayer(
            attn=attention(pos_embeddings=rope, max_seq_len=config.max_position_embeddings),
            mlp=torchtune.llama3_mlp(dim=d, hidden_dim=hidden),
            sa_norm=tt.RMSNorm(dim=d, eps=eps), mlp_norm=tt.RMSNorm(dim=d, eps=eps))
        if index % fusion_interval:
            layers.append(layer)
            continue
        cross = tt.TransformerCrossAttentionLayer(
            attn=attention(q_norm=tt.RMSNorm(dim=head_dim, eps=qk_norm_eps),
                           k_norm=tt.RMSNorm(dim=head_dim, eps=qk_norm_eps),
                           pos_embeddings=None, max_seq_len=64, is_causal=False),
            mlp=torchtune.llama3_mlp(dim=d, hidden_dim=hidden),
            ca_norm=tt.RMSNorm(dim=d, eps=ca_norm_eps),
            mlp_norm=tt.RMSNorm(dim=d, eps=ca_norm_eps),
            ca_scale=tt.TanhGate(), mlp_scale=tt.TanhGate())
        layers.append(torchtune.fusion.FusionLayer(layer=layer, fusion_layer=cross))
    return tt.TransformerDecoder(
        tok_embeddings=torchtune.fusion.FusionEmbedding(config.vocab_size, new_tokens, d),
        layers=layers, max_seq_len=config.max_position_embeddings, num_heads=heads,
        head_dim=head_dim, norm=tt.RMSNorm(d, eps=eps),
        output=torch.nn.Linear(d, config.vocab_size, bias=False)).eval()


def test_torchtune_fusion_decoder_loads_fused_checkpoint_and_computes_load_fused(
        tmp_path, torchtune, clip_tower):
    """A fused Llama 3.x checkpoint whose gates and fusion weights have moved: its decoder
    half loads strictly into torchtune's own fusion decoder, which computes our
    ``load_fused`` logits for the same encoder output and masks (text before the image
    included: rows that attend to no image position)."""
    settings = dict(SIZES, num_hidden_layers=4, rope_theta=500_000.0,
                    rope_scaling=LLAMA3_SCALING)
    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.5)
    source.save_pretrained(tmp_path / "hf")
    result = runner.invoke(app, ["fuse", str(clip_tower), str(tmp_path / "hf"), "-o",
                                 str(tmp_path / "fused"), "--every", "2"])
    assert result.exit_code == 0, result.output

    model = load_fused(tmp_path / "fused")  # trained: every fusion parameter moved
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.decoder.named_parameters():
            if "fusion" in name:
                parameter.copy_(parameter + 0.5 * torch.randn(parameter.shape,
                                                               generator=generator))
    save_fused(model, tmp_path / "trained")
    ours = load_fused(tmp_path / "trained", part="decoder")
    recorded = ours.fused_config.fusion
    assert recorded.fusion_layers == (1, 3)  # torchtune's every-2nd layer from the 2nd

    reference = _torchtune_vision_decoder(
        torchtune, source.config, fusion_interval=2, new_tokens=len(ours.fused_config.new_tokens),
        ca_norm_eps=recorded.ca_norm_eps, qk_norm_eps=recorded.qk_norm_eps)
    decoder_state = {key.removeprefix("decoder."): tensor
                     for key, tensor in _tensors(tmp_path / "trained").items()
                     if key.startswith("decoder.")}
    reference.load_state_dict(decoder_state, strict=True)

    image_token, s_e = SIZES["vocab_size"], 5
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 10), generator=generator)
    tokens[:, 3] = image_token
    encoder_input = torch.randn(2, s_e, SIZES["hidden_size"], generator=generator)
    encoder_mask = torch.zeros(2, 10, s_e, dtype=torch.bool)
    encoder_mask[:, 3:] = True  # the image from its token on; the text before sees none
    with torch.no_grad():
        theirs = reference(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
        mine = ours(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
        plain = ours(tokens)
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)
    assert (theirs - plain).abs().max() > 1e-2  # the fusion layers do contribute


def test_mllama_to_native_is_torchtunes_llama3_vision_conversion(tmp_path, torchtune):
    """A transformers Llama 3.2 Vision checkpoint (``MllamaForConditionalGeneration``, its
    gates open): the decoder half of ``convert --to native`` is what torchtune's
    ``llama3_vision_hf_to_tune`` makes of its text model, keys and values (layers renumbered
    around the cross-attention layers, which become fusion layers; q/k rows permuted but for
    the cross attention's; the table split into the original rows and the 8 new ones)."""
    source = save_mllama_conditional(tmp_path / "mllama")
    text = mllama_text_config()
    hf_state = _tensors(source)
    language = {key: tensor for key, tensor in hf_state.items()
                if key.startswith("language_model.")}
    expected = torchtune.llama3_vision_hf_to_tune(
        language, num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
        dim=text.hidden_size, vocab_size=text.vocab_size,
        cross_attention_layers=text.cross_attention_layers)
    assert expected["decoder.tok_embeddings.fusion_embedding.weight"].shape[0] == 8

    result = runner.invoke(app, ["convert", str(source), "-o", str(tmp_path / "native"),
                                 "--to", "native"])
    assert result.exit_code == 0, result.output
    ours = {key: tensor for key, tensor in _tensors(tmp_path / "native").items()
            if key.startswith("decoder.")}
    _assert_bitwise(ours, expected)


def test_every_decoder_family_torchtune_has_is_checked_here():
    """A family whose ``torchtune_model`` the installed torchtune has gets a case above (its
    converter and model checked); Qwen3 names torchtune's later ``qwen3``, absent from 0.6.1.
    (Vision towers: torchtune's ``clip`` imports torchvision, out of reach here.)"""
    pytest.importorskip("torchtune")
    checked = {family.lower() for family, *_ in CASES.values()}
    for name, family in DECODER_FAMILIES.items():
        if family.torchtune_model is not None:
            installed = importlib.util.find_spec(family.torchtune_model) is not None
            assert installed == (name in checked), (name, family.torchtune_model)
