"""Phi-3's pieces one at a time: stacked tensors (qkv_proj, gate_up_proj) cut into native parts
and stacked back, as data in the key maps and plans; its config reading (partial rotary,
LongRoPE's context, the sliding window only where stated); the partial rotary embedding
against transformers' own; the layouts and exports that cannot hold it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fusesurgery.cli.app import app
from fusesurgery.config import DecoderConfig, RopeScaling
from fusesurgery.convert.configs import hf_config_dict, hf_sliding_window, read_hf_decoder_config
from fusesurgery.convert.keymaps import (
    from_native_key,
    keys_to_native,
    stacked_key,
    to_native_parts,
)
from fusesurgery.convert.plan import (
    layout_tensor_infos,
    plan_conversion,
    plan_entry_value,
)
from fusesurgery.convert.transforms import STACK_ROWS, TAKE_ROWS, stack_rows, take_rows
from fusesurgery.errors import ConfigError, KeyMapError, ShapeError
from fusesurgery.modules.rope import RotaryPositionalEmbeddings
from fusesurgery.surgery import detect_checkpoint
from tests.tiny_models import save_tiny_hf_decoder

transformers = pytest.importorskip("transformers")
runner = CliRunner()

PHI3 = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
            pad_token_id=62, eos_token_id=62, bos_token_id=1)
QKV = "model.layers.1.self_attn.qkv_proj.weight"
GATE_UP = "model.layers.1.mlp.gate_up_proj.weight"
# Phi-4-mini's shape: 24 heads of 128 over a 3072 width, 8 kv heads, 3/4 of each head rotated
PHI4_MINI = DecoderConfig(vocab_size=200_064, embed_dim=3072, num_layers=32, num_heads=24,
                          num_kv_heads=8, intermediate_dim=8192, max_seq_len=131_072,
                          rope_base=10_000.0, tie_word_embeddings=True, family="phi3",
                          partial_rotary_factor=0.75,
                          rope_scaling=RopeScaling(rope_type="longrope", factor=32.0,
                                                   original_max_position_embeddings=4096,
                                                   short_factor=(1.0,) * 48,
                                                   long_factor=(2.0,) * 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taking_row_ranges_and_stacking_them_back_is_bitwise(dtype):
    stacked = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    parts = [take_rows(stacked, 0, 24), take_rows(stacked, 24, 32), take_rows(stacked, 32, 40)]
    assert [part.shape[0] for part in parts] == [24, 8, 8]
    back = stack_rows(parts)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), stacked.view(torch.uint8))
    with pytest.raises(ShapeError, match="nothing to stack"):
        stack_rows([])
    with pytest.raises(ShapeError, match="cannot stack a \\[2, 5\\]"):
        stack_rows([parts[0], torch.zeros(2, 5, dtype=dtype)])


def test_key_maps_say_which_native_keys_a_stacked_tensor_holds():
    assert to_native_parts(QKV, "hf") == ("layers.1.attn.q_proj.weight",
                                          "layers.1.attn.k_proj.weight",
                                          "layers.1.attn.v_proj.weight")
    assert to_native_parts(GATE_UP.removeprefix("model."), "hf") == (  # a bare Phi3Model's
        "layers.1.mlp.w1.weight", "layers.1.mlp.w3.weight")
    assert to_native_parts("model.layers.1.self_attn.q_proj.weight", "hf") is None
    assert to_native_parts(QKV, "native") is None
    mapping = keys_to_native([QKV, "model.norm.weight"], "hf")
    assert mapping.mapping == {"model.norm.weight": "norm.scale"}
    assert mapping.sources()["layers.1.attn.v_proj.weight"] == QKV
    # the way back names the stacked tensor for each part, with its place among the parts
    stacked = stacked_key("layers.1.mlp.w3.weight", "hf", family="phi3")
    assert (stacked.key, stacked.index) == (GATE_UP, 1)
    assert from_native_key("layers.1.attn.k_proj.weight", "hf", family="phi3") == QKV
    assert from_native_key("layers.1.attn.k_proj.weight", "hf", family="llama") == (
        "model.layers.1.self_attn.k_proj.weight")
    assert stacked_key("layers.1.attn.k_proj.weight", "hf", family="llama") is None


def test_a_part_held_both_stacked_and_alone_is_refused():
    with pytest.raises(KeyMapError, match="both hold 'layers.1.attn.k_proj.weight'"):
        keys_to_native([QKV, "model.layers.1.self_attn.k_proj.weight"], "hf")


def test_phi4_mini_shaped_plans_cut_and_stack_rows_from_metadata_alone():
    """A 3.8B-shaped checkpoint planned both ways without a byte of data: q is the first 3072
    rows of qkv_proj, k and v the next 1024 each; the way back stacks them in that order."""
    infos = layout_tensor_infos(PHI4_MINI, "hf", dtype=torch.bfloat16)
    assert infos["model.layers.31.self_attn.qkv_proj.weight"].shape == (5120, 3072)
    assert infos["model.layers.0.mlp.gate_up_proj.weight"].shape == (16384, 3072)
    assert "lm_head.weight" not in infos and len(infos) == 1 + 32 * 6 + 1
    to_native = plan_conversion(infos, "hf", PHI4_MINI)
    rows = {part: to_native.entry(f"layers.31.attn.{part}_proj.weight").transform
            for part in "qkv"}
    assert rows == {"q": (TAKE_ROWS, 0, 3072), "k": (TAKE_ROWS, 3072, 4096),
                    "v": (TAKE_ROWS, 4096, 5120)}
    assert to_native.entry("layers.0.mlp.w3.weight").transform == (TAKE_ROWS, 8192, 16384)
    assert to_native.entry("layers.0.mlp.w3.weight").shape == (8192, 3072)
    assert len(to_native) == 1 + 32 * 9 + 1

    native = plan_conversion(to_native.target_infos(), "native", PHI4_MINI, target_layout="hf")
    assert set(native.target_keys) == set(infos)
    qkv = native.entry("model.layers.31.self_attn.qkv_proj.weight")
    assert qkv.transform == (STACK_ROWS,) and qkv.shape == (5120, 3072)
    assert [part.source_key for part in qkv.parts] == [
        f"layers.31.attn.{p}_proj.weight" for p in "qkv"]
    # hf -> hf (a cast) keeps the stacked tensors whole
    cast = plan_conversion(infos, "hf", PHI4_MINI, target_layout="hf", dtype=torch.float32)
    assert set(cast.target_keys) == set(infos)
    assert cast.entry("model.layers.0.mlp.gate_up_proj.weight").dtype == torch.float32


def test_plan_values_round_trip_bitwise_through_the_parts():
    config = DecoderConfig(vocab_size=64, embed_dim=32, num_layers=1, num_heads=4,
                           num_kv_heads=2, intermediate_dim=48, family="phi3")
    infos = layout_tensor_infos(config, "hf", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    tensors = {key: torch.randn(info.shape, generator=generator).to(torch.bfloat16)
               for key, info in infos.items()}
    to_native = plan_conversion(infos, "hf", config)
    native = {e.target_key: plan_entry_value(e, tensors.__getitem__) for e in to_native.entries}
    assert torch.equal(native["layers.0.attn.k_proj.weight"],
                       tensors["model.layers.0.self_attn.qkv_proj.weight"][32:48])
    back = plan_conversion(to_native.target_infos(), "native", config, target_layout="hf")
    again = {e.target_key: plan_entry_value(e, native.__getitem__) for e in back.entries}
    assert again.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(again[key].view(torch.int16), tensor.view(torch.int16)), key


def test_a_config_whose_widths_do_not_stack_the_rows_is_refused(tmp_path):
    hf = save_tiny_hf_decoder("phi3", tmp_path / "hf", PHI3)
    config = json.loads((hf / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the weights hold 2 kv heads
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="qkv_proj.weight has shape \\[64, 32\\]: its rows do "
                                          "not stack"):
        detect_checkpoint(hf)
    result = runner.invoke(app, ["convert", str(hf), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "qkv_proj.weight" in result.output
    assert not (tmp_path / "out").exists()


def test_phi3_config_reading_and_writing():
    stated = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24,
              "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
              "original_max_position_embeddings": 4096, "sliding_window": 262144,
              "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                               "long_factor": [2.0] * 48}}
    reading = read_hf_decoder_config(stated)
    assert reading.read["partial_rotary_factor"] == 0.75  # transformers 4: top level
    scaling = reading.read["rope_scaling"]
    assert (scaling.rope_type, scaling.original_max_position_embeddings) == ("longrope", 4096)
    assert scaling.factor == 32.0  # transformers' implicit factor: 131072 / 4096
    assert reading.unmodelled["sliding_window"] == 262144 and not reading.differences
    # Phi-3 mini: a 2047-token window over 4096 positions, on every layer, modelled
    mini = {"model_type": "phi3", "sliding_window": 2047, "max_position_embeddings": 4096,
            "num_hidden_layers": 3}
    assert hf_sliding_window(mini, "phi3") == 2047
    reading = read_hf_decoder_config(mini)
    assert (reading.read["sliding_window"], reading.read["sliding_layers"]) == (2047, (0, 1, 2))
    assert not reading.differences
    # no window unless stated (Phi3Config's default is None, not Mistral's 4096)
    assert hf_sliding_window({"model_type": "phi3"}, "phi3") is None
    # transformers 5 states it inside rope_parameters
    v5 = {"model_type": "phi3", "rope_parameters": {"rope_type": "default",
                                                    "partial_rotary_factor": 0.5}}
    assert read_hf_decoder_config(v5).read["partial_rotary_factor"] == 0.5
    written = hf_config_dict(PHI4_MINI)
    assert (written["model_type"], written["partial_rotary_factor"]) == ("phi3", 0.75)
    assert written["sliding_window"] is None  # stated: no window (Phi3Config's default too)
    assert read_hf_decoder_config(written).read["partial_rotary_factor"] == 0.75
    with pytest.raises(ConfigError, match="a llama config.json cannot express "
                                          "partial_rotary_factor=0.5"):
        hf_config_dict(PHI4_MINI.replace(family="llama", partial_rotary_factor=0.5,
                                         rope_scaling=None, tie_word_embeddings=False))


def test_partial_rotary_must_turn_an_even_number_of_dims():
    with pytest.raises(ConfigError, match="partial_rotary_factor.*not 9"):
        DecoderConfig(vocab_size=64, embed_dim=48, num_layers=1, num_heads=4,
                      intermediate_dim=48, family="phi3", partial_rotary_factor=0.75)
    with pytest.raises(ConfigError, match="48 rotated dims of head_dim 128 needs 24"):
        PHI4_MINI.replace(partial_rotary_factor=0.375)
    with pytest.raises(ValueError, match="got rotary_dim 10"):
        RotaryPositionalEmbeddings(8, 16, style="half", rotary_dim=10)


@pytest.mark.parametrize("partial", [0.5, 0.75, 1.0])
def test_partial_rotary_equals_transformers_phi3(partial):
    """The native RoPE on q and k of 8-wide heads, against transformers' Phi3RotaryEmbedding
    and apply_rotary_pos_emb, inside and past LongRoPE's original context."""
    from transformers.models.phi3 import modeling_phi3

    rotated = int(8 * partial)
    half = rotated // 2
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + i / 4 for i in range(half)],
               "long_factor": [2.0 + i for i in range(half)]}
    config = transformers.Phi3Config(**{**PHI3, "partial_rotary_factor": partial},
                                     original_max_position_embeddings=16, rope_scaling=scaling)
    theirs = modeling_phi3.Phi3RotaryEmbedding(config)
    ours = RotaryPositionalEmbeddings(
        8, 64, 10_000.0, RopeScaling(rope_type="longrope", factor=4.0,
                                     original_max_position_embeddings=16,
                                     short_factor=tuple(scaling["short_factor"]),
                                     long_factor=tuple(scaling["long_factor"])),
        style="half", rotary_dim=rotated)
    generator = torch.Generator().manual_seed(0)
    for length in (8, 40):
        q = torch.randn(2, length, 4, 8, generator=generator)
        k = torch.randn(2, length, 2, 8, generator=generator)
        positions = torch.arange(length).expand(2, length)
        cos, sin = theirs(q, positions)
        q_ref, k_ref = modeling_phi3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2),
                                                          cos, sin)
        assert torch.equal(ours(q).transpose(1, 2), q_ref), length
        assert torch.equal(ours(k).transpose(1, 2), k_ref), length
        assert torch.equal(ours(q)[..., rotated:], q[..., rotated:])  # passed unchanged


def test_diff_aligns_parts_and_layouts_that_cannot_hold_phi3_refuse_it(tmp_path):
    hf = save_tiny_hf_decoder("phi3", tmp_path / "hf", PHI3)
    result = runner.invoke(app, ["convert", str(hf), "-o", str(tmp_path / "meta"),
                                 "--to", "meta"])
    assert result.exit_code == 2
    assert "the Meta layout holds no Phi-3 decoder" in result.output
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(clip)
    fused = tmp_path / "fused"
    assert runner.invoke(app, ["fuse", str(clip), str(hf), "-o", str(fused),
                              "--every", "1"]).exit_code == 0
    # diff lines the stacked tensors up with their parts: q, k and v of qkv_proj each compare
    # with its rows, and the fused checkpoint adds only fusion and tower tensors
    result = runner.invoke(app, ["diff", str(hf), str(fused), "--values", "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["only_in_a"] == [] and not report["unmapped_a"]
    assert report["num_values_compared"] == report["num_values_equal"] == 1 + 2 * 9 + 2
    assert not any(".fusion_layer." not in item["key"] and item["key"].startswith("decoder.")
                   and "fusion_embedding" not in item["key"] for item in report["only_in_b"])
    result = runner.invoke(app, ["convert", str(fused), "-o", str(tmp_path / "mllama"),
                                 "--to", "mllama"])
    assert result.exit_code == 2 and "it is a Phi-3 decoder" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "mllama").exists()


def test_diff_without_a_config_compares_a_stacked_tensor_as_stored(tmp_path):
    """Without the head counts a stacked tensor's parts cannot be told apart: it is compared
    under its stored name, as a key no map knows."""
    hf = save_tiny_hf_decoder("phi3", tmp_path / "hf", PHI3)
    (hf / "config.json").unlink()
    result = runner.invoke(app, ["diff", str(hf), str(hf), "--values", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identical"]
    assert QKV in report["unmapped_a"]


def test_a_native_phi3_without_its_transformers_config_converts_to_what_transformers_runs(
        tmp_path):
    """Without the ``hf_config.json`` a conversion keeps, the config.json ``--to hf`` writes
    must not leave Phi3Config its own assumptions: its top-level 4096-position original
    context (which it puts over LongRoPE's) and Phi-3-mini's token ids (pad 32000, outside
    this vocabulary: transformers could not even build the model)."""
    scaling = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0],
               "long_factor": [2.0, 4.0, 8.0]}
    hf = save_tiny_hf_decoder("phi3", tmp_path / "hf", PHI3, partial_rotary_factor=0.75,
                              original_max_position_embeddings=16, rope_scaling=scaling)
    native = tmp_path / "native"
    assert runner.invoke(app, ["convert", str(hf), "-o", str(native)]).exit_code == 0
    (native / "hf_config.json").unlink()
    back = tmp_path / "back"
    result = runner.invoke(app, ["convert", str(native), "-o", str(back), "--to", "hf"])
    assert result.exit_code == 0, result.output
    written = json.loads((back / "config.json").read_text())
    assert written["original_max_position_embeddings"] == 16
    assert written["pad_token_id"] is None
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    converted = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    tokens = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # past the 16 original positions: the long factors
        assert torch.equal(converted(tokens).logits, reference(tokens).logits)


def test_real_phi_configs_with_their_shapes_are_detected_from_metadata():
    """Phi-3-mini-4k's config.json (transformers 4: rope_scaling null, a 2047-token window,
    the dropouts) and Phi-4-mini's (GQA, 3/4 rotary, LongRoPE, tied), each over the tensor
    metadata of its real shapes: the stacked tensors' parts get the rows the heads give."""
    from fusesurgery.convert import detect_model

    mini_4k = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
               "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
               "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
               "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
               "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
               "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    phi4_mini = {**mini_4k, "vocab_size": 200_064, "num_attention_heads": 24,
                 "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
                 "max_position_embeddings": 131_072, "sliding_window": 262_144,
                 "tie_word_embeddings": True, "pad_token_id": 199_999,
                 "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                  "long_factor": [2.0] * 48}}
    for document, (heads, kv, head_dim) in ((mini_4k, (32, 32, 96)),
                                            (phi4_mini, (24, 8, 128))):
        shape = DecoderConfig(vocab_size=document["vocab_size"], embed_dim=3072, num_layers=32,
                              num_heads=heads, num_kv_heads=kv, intermediate_dim=8192,
                              family="phi3", tie_word_embeddings=document[
                                  "tie_word_embeddings"])
        infos = layout_tensor_infos(shape, "hf", dtype=torch.bfloat16)
        detected = detect_model(infos, document, "config.json")
        config = detected.config
        assert (config.num_heads, config.num_kv_heads, config.head_dim) == (heads, kv,
                                                                            head_dim)
        assert config.rotary_dim == 96  # Phi-4-mini: 3/4 of 128
        assert detected.provenance["num_kv_heads"] == "read"
        if document is mini_4k:
            assert config.rope_scaling is None and config.partial_rotary_factor == 1.0
            assert (config.sliding_window, config.sliding_layers) == (2047, tuple(range(32)))
            assert not detected.differences
        else:
            assert config.rope_scaling.factor == 32.0 and config.tie_word_embeddings


def test_a_part_is_a_byte_range_of_its_stacked_tensor(tmp_path):
    """Cutting q/k/v out of qkv_proj reads nothing: each part is a region of the file, which
    the writers copy with the kernel. Stacking back is one region too where the parts lie one
    after the other in one file (as ``convert --to native`` writes them); else each part is
    read and the stacked tensor is made."""
    from fusesurgery.io import FileRegion, open_checkpoint
    from fusesurgery.write.plan_sources import plan_entry_source

    hf = save_tiny_hf_decoder("phi3", tmp_path / "hf", PHI3)
    with open_checkpoint(hf) as source:
        detected = detect_checkpoint(hf)
        plan = plan_conversion(source.infos(), "hf", detected.config)
        stacked = source.file_region(QKV)
        row_bytes = stacked.nbytes // 64
        for part, (start, stop) in (("q", (0, 32)), ("k", (32, 48)), ("v", (48, 64))):
            region = plan_entry_source(plan.entry(f"layers.1.attn.{part}_proj.weight"), source)
            assert isinstance(region, FileRegion)
            assert (region.path, region.offset, region.nbytes) == (
                stacked.path, stacked.offset + start * row_bytes, (stop - start) * row_bytes)
    native = tmp_path / "native"
    assert runner.invoke(app, ["convert", str(hf), "-o", str(native)]).exit_code == 0
    with open_checkpoint(native) as source:
        plan = plan_conversion(source.infos(), "native", detect_checkpoint(native).config,
                               target_layout="hf")
        entry = plan.entry(QKV)
        region = plan_entry_source(entry, source)
        q = source.file_region("layers.1.attn.q_proj.weight")
        assert isinstance(region, FileRegion)
        assert (region.path, region.offset, region.nbytes) == (q.path, q.offset, 2 * q.nbytes)
    sharded = tmp_path / "sharded"  # q, k and v in files of their own: read and stacked
    assert runner.invoke(app, ["convert", str(hf), "-o", str(sharded), "--max-shard-size",
                               "2KB"]).exit_code == 0
    with open_checkpoint(sharded) as source:
        value = plan_entry_source(entry, source)
        assert isinstance(value, torch.Tensor) and value.shape == (64, 32)
        with open_checkpoint(hf) as original:
            assert torch.equal(value, original.get_tensor(QKV))
