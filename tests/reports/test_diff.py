"""diff_checkpoints: key, shape, dtype and value diffs across layouts, kinds and formats."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusesurgery.config import preset
from fusesurgery.convert import layout_tensor_infos
from fusesurgery.convert.transforms import permute_qk_from_native
from fusesurgery.errors import ConfigError, UnrecognizedFormatError
from fusesurgery.io import TensorInfo
from fusesurgery.reports.diff import (
    collapse_key_names,
    collapse_key_pairs,
    compare_tensors,
    diff_checkpoints,
)
from fusesurgery.testing import write_sparse_sharded_safetensors
from tests.reports.diff_checkpoints import (
    FUSION_LAYER,
    HEAD_DIM,
    LAYERS,
    NUM_HEADS,
    fused_state_dict,
    is_fusion_or_encoder_key,
    read_safetensors,
    save_fused,
    save_hf_clip_vision,
    save_hf_llama,
    save_meta,
    save_native_pt,
)

NUM_HF_TENSORS = 3 + 9 * LAYERS


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("hf_llama"))


@pytest.fixture(scope="module")
def hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    return read_safetensors(hf_dir / "model.safetensors")


@pytest.fixture(scope="module")
def fused_file(hf_dir, tmp_path_factory) -> Path:
    return save_fused(hf_dir, tmp_path_factory.mktemp("fused") / "fused.safetensors")


def _hf_variant(tmp_path: Path, tensors: dict[str, torch.Tensor], hf_dir: Path,
                name: str = "variant") -> Path:
    """An HF directory holding ``tensors`` beside the original's config.json."""
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(hf_dir / "config.json", directory / "config.json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors")
    return directory


# --------------------------------------------------------------------------------------------
# Keys.


def test_hf_against_itself_is_identical(hf_dir, tmp_path):
    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    report = diff_checkpoints(hf_dir, copy, values=True)
    assert report.identical and report.keys_identical
    assert report.num_common == NUM_HF_TENSORS == report.num_values_compared
    assert (report.a.kind, report.a.layout) == ("decoder", "hf")
    assert report.summary().splitlines()[-1] == "identical"


def test_hf_against_native_pt_of_same_weights(hf_dir, tmp_path):
    native = save_native_pt(hf_dir, tmp_path / "native.pt")
    report = diff_checkpoints(hf_dir, native)
    assert report.identical
    assert (report.b.kind, report.b.layout, report.b.format) == ("decoder", "native", "torch")

    raw = diff_checkpoints(hf_dir, native, raw=True)
    assert raw.num_common == 0 and not raw.identical
    assert len(raw.only_in_a) == len(raw.only_in_b) == NUM_HF_TENSORS
    assert "model.embed_tokens.weight" in raw.only_in_a
    assert "tok_embeddings.weight" in raw.only_in_b


def test_hf_against_fused_differs_by_exactly_the_fusion_and_encoder_keys(hf_dir, fused_file):
    fused_keys = list(fused_state_dict(hf_dir))
    added = {key for key in fused_keys if is_fusion_or_encoder_key(key)}
    report = diff_checkpoints(hf_dir, fused_file)
    assert report.only_in_a == ()
    assert set(report.only_in_b) == added and len(report.only_in_b) == len(added)
    assert report.num_common == NUM_HF_TENSORS == len(fused_keys) - len(added)
    assert not report.shape_changes and not report.dtype_changes
    assert (report.a.key_prefix, report.b.key_prefix) == ("decoder.", "")
    # Reversed, the same keys are only in A.
    reverse = diff_checkpoints(fused_file, hf_dir)
    assert set(reverse.only_in_a) == added and reverse.only_in_b == ()


def test_vision_tower_aligns_with_the_fused_encoder(tmp_path, hf_dir, fused_file):
    clip = save_hf_clip_vision(tmp_path / "clip")
    report = diff_checkpoints(clip, fused_file)
    assert report.a.key_prefix == "encoder.vision."
    assert report.only_in_a == ()
    # class, patch and position embeddings, ln_pre (2), 16 per layer, ln_post (2)
    assert report.num_common == 3 + 2 + 16 * 2 + 2
    assert all(k.startswith(("decoder.", "encoder.projection.")) for k in report.only_in_b)
    # A decoder against a vision tower shares no names.
    apart = diff_checkpoints(hf_dir, clip)
    assert apart.num_common == 0
    assert (apart.a.key_prefix, apart.b.key_prefix) == ("decoder.", "encoder.vision.")


def test_changes_are_compared_under_native_names_and_shown_as_stored(hf_dir, hf_tensors,
                                                                      tmp_path):
    changed = dict(hf_tensors)
    changed["model.embed_tokens.weight"] = torch.zeros(72, 32)
    changed["model.layers.1.mlp.up_proj.weight"] = hf_tensors[
        "model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    del changed["model.norm.weight"]
    report = diff_checkpoints(hf_dir, _hf_variant(tmp_path, changed, hf_dir))
    assert not report.identical
    assert report.only_in_a == ("norm.scale",) and report.only_in_b == ()
    assert [(c.key, c.shape_a, c.shape_b) for c in report.shape_changes] == [
        ("tok_embeddings.weight", (64, 32), (72, 32))
    ]
    assert [(c.key, c.dtype_a, c.dtype_b) for c in report.dtype_changes] == [
        ("layers.1.mlp.w3.weight", "f32", "bf16")
    ]
    assert report.key_a("norm.scale") == "model.norm.weight"
    assert report.key_b("layers.1.mlp.w3.weight") == "model.layers.1.mlp.up_proj.weight"
    lines = report.summary().splitlines()
    assert "  model.norm.weight" in lines  # only in A
    assert "  model.embed_tokens.weight: [64, 32] -> [72, 32]" in lines
    assert "  model.layers.1.mlp.up_proj.weight: f32 -> bf16" in lines


def test_dropped_and_unknown_keys(hf_dir, hf_tensors, tmp_path):
    extra = dict(hf_tensors)
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)
    report = diff_checkpoints(hf_dir, _hf_variant(tmp_path, extra, hf_dir))
    assert report.identical
    assert report.dropped_b == {
        "model.layers.0.self_attn.rotary_emb.inv_freq": "RoPE frequency buffer, recomputed"
    }
    assert "B: 1 keys dropped on purpose (RoPE frequency buffer, recomputed)" in report.summary()

    stray = dict(hf_tensors)
    stray["model.layers.0.adapter.weight"] = torch.ones(2)
    other = tmp_path / "stray"
    other.mkdir()
    save_file(stray, other / "model.safetensors")
    report = diff_checkpoints(hf_dir, other)
    assert report.only_in_b == ("model.layers.0.adapter.weight",)
    assert report.unmapped_b == ("model.layers.0.adapter.weight",)


def test_unrecognised_keys_need_raw(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"alpha": torch.zeros(2), "beta": torch.ones(3)}, path)
    with pytest.raises(UnrecognizedFormatError, match="--raw") as error:
        diff_checkpoints(path, path)
    assert "\n" not in str(error.value) and "odd.safetensors" in str(error.value)
    report = diff_checkpoints(path, path, raw=True, values=True)
    assert report.identical and report.a.kind is None and report.num_values_compared == 2


# --------------------------------------------------------------------------------------------
# Values.


def test_values_find_one_changed_tensor(hf_dir, hf_tensors, tmp_path):
    a, b = dict(hf_tensors), dict(hf_tensors)
    key = "model.layers.1.self_attn.v_proj.weight"
    a[key], b[key] = a[key].clone(), b[key].clone()
    a[key][3, 5], b[key][3, 5] = 1.0, 1.5
    b[key][4, 6] = a[key][4, 6] + 1e-3
    side_a, side_b = _hf_variant(tmp_path, a, hf_dir, "a"), _hf_variant(tmp_path, b, hf_dir, "b")
    for chunk_bytes in (64 * 2**20, 40):  # whole tensor, and slices of a few rows
        report = diff_checkpoints(side_a, side_b, values=True, chunk_bytes=chunk_bytes)
        assert report.keys_identical and not report.identical
        assert report.num_values_equal == NUM_HF_TENSORS - 1
        (change,) = report.value_changes
        assert change.key == "layers.1.attn.v_proj.weight"
        assert change.max_abs_diff == 0.5
        assert (change.num_different, change.numel) == (2, 16 * 32)
    loose = diff_checkpoints(side_a, side_b, values=True, atol=0.01)
    assert loose.value_changes[0].num_different == 1
    assert diff_checkpoints(side_a, side_b, values=True, atol=0.5).identical


def test_bf16_against_f32_of_the_same_values(hf_tensors, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in hf_tensors.items()}
    save_file(bf16, tmp_path / "bf16.safetensors")
    save_file({k: v.float() for k, v in bf16.items()}, tmp_path / "f32.safetensors")
    save_file(hf_tensors, tmp_path / "original.safetensors")

    same_values = diff_checkpoints(tmp_path / "bf16.safetensors", tmp_path / "f32.safetensors",
                                   values=True)
    assert len(same_values.dtype_changes) == NUM_HF_TENSORS
    assert same_values.value_changes == () and same_values.num_values_equal == NUM_HF_TENSORS
    assert not same_values.identical  # the dtypes still differ
    assert f"all {NUM_HF_TENSORS} common keys: bf16 -> f32" in same_values.summary()

    rounded = diff_checkpoints(tmp_path / "original.safetensors", tmp_path / "bf16.safetensors",
                               values=True)
    rounds = {key for key, t in hf_tensors.items() if not torch.equal(t.bfloat16().float(), t)}
    assert len(rounded.value_changes) == len(rounds) == NUM_HF_TENSORS - 5  # norms are ones
    changes = {change.key: change for change in rounded.value_changes}
    for key, native in (("model.embed_tokens.weight", "tok_embeddings.weight"),
                        ("lm_head.weight", "output.weight")):
        tensor = hf_tensors[key]
        # x - bf16(x) is exact in f32 (Sterbenz), so the reported figure is exact too.
        error = (tensor - tensor.to(torch.bfloat16).float()).abs()
        assert changes[native].max_abs_diff == error.max().item() > 0
        assert changes[native].num_different == int((error > 0).sum())


def test_native_values_are_compared_after_the_rope_permutation(hf_dir, tmp_path):
    native = save_native_pt(hf_dir, tmp_path / "native.pt")
    assert diff_checkpoints(hf_dir, native, values=True).identical
    # Renamed but not permuted: exactly the q and k projections differ.
    unpermuted = save_native_pt(hf_dir, tmp_path / "unpermuted.pt", permute=False)
    report = diff_checkpoints(hf_dir, unpermuted, values=True)
    assert sorted(c.key for c in report.value_changes) == sorted(
        f"layers.{i}.attn.{p}_proj.weight" for i in range(LAYERS) for p in "qk"
    )


def test_meta_against_hf_with_values(hf_dir, tmp_path):
    meta = save_meta(hf_dir, tmp_path / "meta")
    report = diff_checkpoints(meta, hf_dir, values=True)
    assert (report.a.format, report.a.layout) == ("meta", "meta")
    assert report.identical and report.num_values_compared == NUM_HF_TENSORS
    assert report.dropped_a == {"rope.freqs": "RoPE frequency buffer, recomputed"}
    # An HF file without config.json borrows the head counts from params.json.
    bare = tmp_path / "bare.safetensors"
    shutil.copy(hf_dir / "model.safetensors", bare)
    assert diff_checkpoints(bare, meta, values=True).identical


def test_fused_values_equal_the_decoder_it_came_from(hf_dir, fused_file):
    report = diff_checkpoints(hf_dir, fused_file, values=True)
    assert report.value_changes == () and report.num_values_compared == NUM_HF_TENSORS
    assert not report.identical  # the fused side has more keys


def test_head_counts_missing_names_the_flag(hf_dir, tmp_path):
    bare = tmp_path / "bare.safetensors"
    shutil.copy(hf_dir / "model.safetensors", bare)
    native = save_native_pt(hf_dir, tmp_path / "native.pt")
    assert diff_checkpoints(bare, native).identical  # names alone need no config
    with pytest.raises(ConfigError, match="--num-heads") as error:
        diff_checkpoints(bare, native, values=True)
    assert error.value.flag == "--num-heads" and "\n" not in str(error.value)
    assert "bare.safetensors" in str(error.value)
    report = diff_checkpoints(bare, native, values=True, overrides={"num_heads": NUM_HEADS})
    assert report.identical


# --------------------------------------------------------------------------------------------
# compare_tensors.


def test_compare_tensors_in_slices_matches_whole():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(37, 11, generator=generator)
    b = a.clone()
    b[30, 2] += 3.0
    b[0, 0] = float("nan")
    whole = compare_tensors(a, b)
    assert (whole.numel, whole.num_different) == (37 * 11, 2)
    assert whole.max_abs_diff == float("inf")  # NaN against a number
    for chunk_bytes in (1, 44, 100, 10_000):
        assert compare_tensors(a, b, chunk_bytes=chunk_bytes) == whole
    nan = torch.tensor([float("nan"), float("inf"), -0.0])
    assert compare_tensors(nan, torch.tensor([float("nan"), float("inf"), 0.0])).equal
    assert compare_tensors(torch.tensor(3), torch.tensor(5)).max_abs_diff == 2
    assert compare_tensors(torch.tensor([1, 2], dtype=torch.int32),
                           torch.tensor([1.0, 2.5], dtype=torch.float16)).max_abs_diff == 0.5


def test_compare_tensors_permutes_block_by_block():
    generator = torch.Generator().manual_seed(0)
    heads, head_dim = 6, 8
    native = torch.randn(heads * head_dim, 5, generator=generator)
    hf = permute_qk_from_native(native, heads, head_dim)
    transform = ("permute_qk_to_native", heads, head_dim)
    for chunk_bytes in (1, 300, 2**20):  # one head, a few heads, all of them
        assert compare_tensors(hf, native, transform_a=transform, chunk_bytes=chunk_bytes).equal
    assert not compare_tensors(hf, native).equal


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_compare_tensors_memory_is_a_few_slices_not_a_tensor():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        _status_kib("VmHWM")
    except (OSError, KeyError):
        pytest.skip("needs Linux /proc/self/clear_refs and VmHWM")
    rows, cols = 4096, 4096  # 32 MiB in bf16, 64 MiB once upcast to f32
    a = torch.full((rows, cols), 1.5, dtype=torch.bfloat16)
    b = torch.full((rows, cols), 1.5, dtype=torch.float32)
    b[-1, -1] = 2.0
    compare_tensors(a[:512], b[:512], chunk_bytes=2 * 2**20)  # first-use allocations
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    result = compare_tensors(a, b, chunk_bytes=2 * 2**20)
    growth_mib = (_status_kib("VmHWM") - baseline) / 1024
    assert (result.num_different, result.max_abs_diff) == (1, 0.5)
    # Measured ~8 MiB; one upcast copy of A alone would be 64 MiB (unsliced: ~208 MiB).
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.0f} MiB"


# --------------------------------------------------------------------------------------------
# Presentation and scale.


def test_collapse_key_names():
    keys = [f"decoder.layers.{i}.fusion_layer.{name}" for i in range(3, 32, 4)
            for name in ("ca_norm.scale", "attn.q_proj.weight", "mlp_scale.scale")]
    keys += [f"layers.{i}.attn.q_proj.weight" for i in range(32)] + ["norm.scale"]
    keys += ["ln_post.weight", "layers.5.mlp.w1.weight", "ln_post.bias", "logit_scale"]
    keys += ["layers.9.fusion_layer.a.weight", "layers.9.fusion_layer.b.weight"]
    assert collapse_key_names(keys) == [
        "decoder.layers.{3,7,11,15,...,31}.fusion_layer.* (3 keys each)",
        "layers.{0..31}.attn.q_proj.weight",
        "norm.scale",
        "ln_post.{weight,bias}",
        "layers.5.mlp.w1.weight",
        "logit_scale",
        "layers.9.fusion_layer.* (2 keys)",
    ]
    assert collapse_key_names(["layers.1.a.weight", "layers.01.b"]) == [
        "layers.1.a.weight", "layers.01.b"
    ]
    many = [f"key{i}" for i in range(30)]
    assert collapse_key_names(many, max_lines=5) == [*many[:4], "... and 26 more keys"]
    assert collapse_key_names([f"head.{n}" for n in "abcdef"]) == ["head.* (6 keys)"]
    assert collapse_key_names([f"layers.{i}.{n}" for i in (0, 1, 2, 4) for n in "ab"]) == [
        "layers.{0..2,4}.* (2 keys each)"
    ]


def test_report_json_round_trips(hf_dir, fused_file):
    payload = json.loads(json.dumps(diff_checkpoints(hf_dir, fused_file, values=True).to_dict()))
    assert payload["identical"] is False and payload["mode"] == "normalised"
    assert payload["a"]["layout"] == "hf" and payload["b"]["kind"] == "fused"
    assert payload["value_changes"] == [] and payload["num_values_equal"] == NUM_HF_TENSORS
    gate = f"decoder.layers.{FUSION_LAYER}.fusion_layer.ca_scale.scale"
    assert {"key": gate, "normalised_key": gate} in payload["only_in_b"]


def test_collapse_key_pairs():
    pairs = [(f"model.layers.{i}.mlp.up_proj.weight", f"layers.{i}.mlp.w3.weight")
             for i in range(4)]
    pairs += [("model.norm.weight", "norm.scale"), ("lm_head.weight", "lm_head.weight")]
    assert collapse_key_pairs(pairs) == [
        "model.layers.{0..3}.mlp.up_proj.weight (B: layers.{0..3}.mlp.w3.weight)",
        "model.norm.weight (B: norm.scale)",
        "lm_head.weight",
    ]
    assert collapse_key_pairs(pairs, max_lines=2) == [
        "model.layers.{0..3}.mlp.up_proj.weight (B: layers.{0..3}.mlp.w3.weight)",
        "... and 2 more keys",
    ]
    # B numbers the layers differently (as Mllama does): a group pairs them in order...
    shifted = [(f"layers.{i}.x", f"model.layers.{i + 1}.y") for i in range(3)]
    assert collapse_key_pairs(shifted) == ["layers.{0..2}.x (B: model.layers.{1..3}.y)"]
    # ...so where the order is not kept, no group line would be true: one line per pair
    shuffled = [("layers.0.x", "m.layers.2.y"), ("layers.1.x", "m.layers.0.y"),
                ("layers.2.x", "m.layers.1.y")]
    assert collapse_key_pairs(shuffled) == [f"{a} (B: {b})" for a, b in shuffled]
    same = [(f"layers.{i}.a", f"layers.{i}.a") for i in range(3)]
    assert collapse_key_pairs(same) == collapse_key_names([a for a, _ in same])
    assert collapse_key_pairs([]) == []


def test_405b_key_diff_reads_headers_only(tmp_path):
    config = preset("llama3_1_405b")
    infos = layout_tensor_infos(config, "hf")
    write_sparse_sharded_safetensors(tmp_path / "a", infos)
    modified = dict(infos)
    del modified["model.layers.100.self_attn.o_proj.weight"]
    up_proj = infos["model.layers.7.mlp.up_proj.weight"]
    modified[up_proj.name] = TensorInfo(up_proj.name, up_proj.shape, torch.float32)
    write_sparse_sharded_safetensors(tmp_path / "b", modified)

    same = diff_checkpoints(tmp_path / "a", tmp_path / "a")
    different = diff_checkpoints(tmp_path / "a", tmp_path / "b")
    assert same.identical and same.a.total_bytes > 800e9
    assert different.only_in_a == ("layers.100.attn.output_proj.weight",)
    assert [c.key for c in different.dtype_changes] == ["layers.7.mlp.w3.weight"]
