import json
import math

import pytest
import torch

from fusesurgery.config import DECODER_PRESETS, RopeScaling, preset
from fusesurgery.errors import ConfigError, KeyMapError
from fusesurgery.io import CheckpointSource, TensorInfo
from fusesurgery.reports import collapse_keys, format_index_set, inspect_checkpoint
from tests.reports.inspect_checkpoints import (
    FUSED_DECODER,
    FUSED_VISION,
    fused_state_dict,
    save_fused,
    save_fused_with_config,
    save_hf_decoder,
    save_hf_llama,
    save_hf_vision,
    save_meta_dir,
    save_native_pt,
    stored_numels,
    write_405b,
)

# Per-layer parameters of the tiny HF decoders (width 32, 4 heads of 8, 2 kv heads, MLP 64):
# two norms, q and o (32 x 32), k and v (16 x 32), gate, up, down (64 x 32).
HF_LAYER = 2 * 32 + 2 * 1024 + 2 * 512 + 3 * 2048
HF_EMBEDDING = 64 * 32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def fused_identity(tmp_path_factory):
    return save_fused(tmp_path_factory.mktemp("fused") / "fused.safetensors")


def components(report):
    return {c.name: (c.num_tensors, c.num_parameters) for c in report.components}


def row_names(report):
    return [row.name for row in report.key_rows]


# ----------------------------------------------------------------------------- key tree


@pytest.mark.parametrize(("indices", "expected"), [
    (range(32), "{0..31}"),
    ([3, 7, 11], "{3,7,11}"),
    ([0, 1, 2, 4, 5, 6, 7, 8, 9], "{0..2,4..9}"),
    ([9, 4, 5, 5, 8, 6, 7, 0, 1, 2], "{0..2,4..9}"),
    ([4, 5], "{4,5}"),
    ([0, 1, 3, 4, 5, 10], "{0,1,3..5,10}"),
    ([7], "{7}"),
    ([], "{}"),
])
def test_format_index_set(indices, expected):
    assert format_index_set(indices) == expected


def _infos(*entries):
    return [TensorInfo(name, shape, dtype) for name, shape, dtype in entries]


def test_collapse_keys_merges_only_identical_shape_and_dtype():
    f32, bf16 = torch.float32, torch.bfloat16
    infos = _infos(
        ("embed.weight", (10, 4), f32),
        *[(f"model.layers.{i}.q.weight", (4, 4), f32) for i in (0, 1, 2, 4, 5, 6)],
        ("model.layers.3.q.weight", (8, 4), f32),  # a different shape: its own row
        *[(f"model.layers.{i}.norm.weight", (4,), bf16 if i == 5 else f32) for i in range(7)],
        ("model.layers.2.cross.weight", (4, 4), f32),  # the only key of its template
        ("model.layers.02.odd.weight", (4,), f32),  # a zero-padded index stays as stored
        ("head.0.1.weight", (2,), f32),  # two indices: not a layer key
    )
    rows = collapse_keys(infos)
    assert [(r.name, r.shape, r.dtype, r.num_parameters) for r in rows] == [
        ("embed.weight", (10, 4), "f32", 40),
        ("model.layers.{0..2,4..6}.q.weight", (4, 4), "f32", 6 * 16),
        ("model.layers.3.q.weight", (8, 4), "f32", 32),
        ("model.layers.{0..4,6}.norm.weight", (4,), "f32", 6 * 4),
        ("model.layers.5.norm.weight", (4,), "bf16", 4),
        ("model.layers.2.cross.weight", (4, 4), "f32", 16),
        ("model.layers.02.odd.weight", (4,), "f32", 4),
        ("head.0.1.weight", (2,), "f32", 2),
    ]
    assert rows[1].template == "model.layers.{i}.q.weight"
    assert rows[1].layers == (0, 1, 2, 4, 5, 6) and rows[1].num_tensors == 6
    assert rows[0].layers == () and rows[0].num_tensors == 1
    assert sum(r.num_tensors for r in rows) == len(infos)


# ----------------------------------------------------------------------------- decoders


def test_hf_llama(llama_dir):
    report = inspect_checkpoint(llama_dir)
    assert (report.format, report.kind, report.model.family, report.model.layout) == (
        "safetensors", "decoder", "llama", "hf")
    assert report.model.fused_style is None and report.fusion is None
    config = report.config
    assert (config.vocab_size, config.embed_dim, config.num_layers, config.num_heads,
            config.num_kv_heads, config.head_dim, config.intermediate_dim) == (
        64, 32, 3, 4, 2, 8, 64)
    assert config.rope_base == 500_000.0 and config.rope_scaling == RopeScaling(factor=8.0)
    assert report.model.provenance["num_heads"] == "read"
    assert report.model.config_source == "config.json"

    assert components(report) == {
        "embeddings": (1, HF_EMBEDDING),
        "layers": (27, 3 * HF_LAYER),
        "final norm + output": (2, 32 + HF_EMBEDDING),
    }
    numels = stored_numels(llama_dir / "model.safetensors")
    assert report.num_parameters == sum(numels.values()) == 2 * HF_EMBEDDING + 3 * HF_LAYER + 32
    assert report.num_tensors == len(numels) == 30
    assert sum(c.num_parameters for c in report.components) == report.num_parameters
    assert report.total_bytes == 4 * report.num_parameters  # float32
    assert [(d.name, d.num_tensors, d.num_parameters) for d in report.dtypes] == [
        ("f32", 30, report.num_parameters)]

    assert "model.layers.{0..2}.self_attn.q_proj.weight" in row_names(report)
    rows = {row.name: row for row in report.key_rows}
    assert rows["model.layers.{0..2}.self_attn.k_proj.weight"].shape == (16, 32)
    assert rows["lm_head.weight"].layers == ()
    assert len(report.key_rows) == 12
    assert [t.name for t in report.tensors] == list(numels)


def test_qwen2_tied_embeddings_and_biases(tmp_path):
    directory = save_hf_decoder("qwen2", tmp_path, tie_word_embeddings=True)
    report = inspect_checkpoint(directory)
    assert (report.kind, report.model.family) == ("decoder", "qwen2")
    assert report.config.tie_word_embeddings and report.config.attn_bias
    biases = 32 + 16 + 16
    assert components(report) == {
        "embeddings": (1, HF_EMBEDDING),
        "layers": (36, 3 * (HF_LAYER + biases)),
        "final norm + output": (1, 32),
    }
    assert "lm_head.weight" not in row_names(report)
    assert "model.layers.{0..2}.self_attn.q_proj.bias" in row_names(report)
    assert report.num_parameters == sum(stored_numels(directory / "model.safetensors").values())


def test_mistral_reads_its_sliding_window(tmp_path):
    report = inspect_checkpoint(save_hf_decoder("mistral", tmp_path, sliding_window=4096))
    assert (report.kind, report.model.family) == ("decoder", "mistral")
    assert report.config.sliding_window == 4096 and report.config.sliding_layers
    assert not any("sliding_window" in note for note in report.notes)  # modelled
    assert report.num_parameters == 2 * HF_EMBEDDING + 3 * HF_LAYER + 32


def test_meta_dir(tmp_path):
    report = inspect_checkpoint(save_meta_dir(tmp_path))
    assert (report.format, report.model.layout, report.model.family) == ("meta", "meta", "llama")
    assert report.model.config_source == "params.json"
    assert report.model.provenance["num_heads"] == "read"
    assert (report.config.num_heads, report.config.num_kv_heads, report.config.head_dim,
            report.config.intermediate_dim) == (4, 2, 8, 96)
    layer = 2 * 32 + 2 * 1024 + 2 * 512 + 3 * 96 * 32
    assert components(report) == {
        "embeddings": (1, 2048), "layers": (27, 3 * layer), "final norm + output": (2, 2080)}
    assert [(d.name, d.nbytes) for d in report.dtypes] == [("bf16", 2 * report.num_parameters)]
    assert "layers.{0..2}.attention.wq.weight" in row_names(report)


def test_native_pt_needs_the_head_count(tmp_path):
    path = save_native_pt(tmp_path / "model.pt")
    unresolved = inspect_checkpoint(path)  # described, the heads marked as needing the flag
    assert unresolved.model is None and "--num-heads" in unresolved.unresolved.needs()
    report = inspect_checkpoint(path, {"num_heads": 4, "num_kv_heads": None})
    tiny = DECODER_PRESETS["tiny"]
    assert (report.format, report.model.layout) == ("torch", "native")
    assert report.model.provenance["num_heads"] == "given"
    assert report.model.provenance["num_kv_heads"] == "inferred"
    assert report.config == tiny.replace(max_seq_len=4096, rope_base=10_000.0)
    state = torch.load(path, weights_only=True)
    assert report.num_parameters == sum(t.numel() for t in state.values())
    assert [t.name for t in report.tensors] == list(state)
    assert "layers.{0..3}.attn.q_proj.weight" in row_names(report)


def test_overrides_that_do_not_apply_are_noted_and_unknown_ones_refused(llama_dir):
    report = inspect_checkpoint(llama_dir, {"encoder_num_heads": 3, "norm_eps": 1e-6})
    assert "ignored --encoder-num-heads: the checkpoint holds no vision encoder" in report.notes
    assert report.config.norm_eps == 1e-6 and report.model.provenance["norm_eps"] == "given"
    with pytest.raises(ConfigError, match="unknown config override 'heads'"):
        inspect_checkpoint(llama_dir, {"heads": 4})
    with pytest.raises(ConfigError, match="unknown config override 'encoder_bogus'"):
        inspect_checkpoint(llama_dir, {"encoder_bogus": 4})


def test_reads_no_tensor_data(llama_dir, monkeypatch):
    def refuse(self, key):
        raise AssertionError(f"read tensor {key}")

    monkeypatch.setattr(CheckpointSource, "get_tensor", refuse)
    assert inspect_checkpoint(llama_dir).num_parameters > 0


def test_405b_sparse_sharded_checkpoint(tmp_path):
    # the data are holes: reading any of it would not finish (timings: benchmarks/)
    directory = write_405b(tmp_path)
    report = inspect_checkpoint(directory, {"num_heads": 128})
    config = preset("llama3_1_405b")
    assert (report.format, report.num_tensors, len(report.files)) == (
        "safetensors-sharded", 1137, 170)
    d, ffn, vocab = config.embed_dim, config.intermediate_dim, config.vocab_size
    layer = 2 * d + 2 * d * d + 2 * 1024 * d + 3 * ffn * d
    assert components(report)["layers"] == (126 * 9, 126 * layer)
    assert report.num_parameters == 2 * vocab * d + 126 * layer + d == 405_853_388_800
    assert report.total_bytes == 2 * report.num_parameters
    assert (report.config.num_kv_heads, report.config.head_dim) == (8, 128)
    assert len(report.key_rows) == 12
    assert "model.layers.{0..125}.mlp.down_proj.weight" in row_names(report)


# ----------------------------------------------------------------------------- vision


def test_clip_vision_model(tmp_path):
    directory = save_hf_vision("clip_vision", tmp_path)
    report = inspect_checkpoint(directory)
    assert (report.kind, report.model.family, report.model.layout) == ("vision", "clip", "hf")
    config = report.config
    assert (config.image_size, config.patch_size, config.embed_dim, config.num_layers,
            config.num_heads, config.intermediate_dim) == (16, 8, 32, 2, 4, 64)
    layer = 4 * 32 + 4 * (32 * 32 + 32) + 2 * (64 * 32) + 64 + 32
    embeddings = 32 * 3 * 8 * 8 + 32 + 5 * 32  # patch conv, class token, 4 + 1 positions
    numels = stored_numels(directory / "model.safetensors")
    assert components(report) == {
        "embeddings": (3, embeddings), "layers": (32, 2 * layer), "norms": (4, 4 * 32),
        **({"not converted (position index buffer, recomputed)": (1, 5)}
           if any(key.endswith("position_ids") for key in numels) else {}),
    }
    assert report.num_parameters == sum(numels.values())


def test_clip_model_counts_its_text_tower_as_not_converted(tmp_path):
    directory = save_hf_vision("clip", tmp_path)
    report = inspect_checkpoint(directory)
    assert (report.kind, report.model.family) == ("vision", "clip")
    counts = components(report)
    numels = stored_numels(directory / "model.safetensors")
    text = sum(n for key, n in numels.items() if key.startswith("text_model."))
    assert counts["not converted (text tower of a CLIP/SigLIP checkpoint)"][1] == text > 0
    assert counts["not converted (image-text projection of a CLIP checkpoint)"] == (1, 24 * 32)
    assert sum(n for _, n in counts.values()) == report.num_parameters == sum(numels.values())
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in row_names(report)


def test_vision_tower_without_config_takes_the_encoder_flag(tmp_path):
    directory = save_hf_vision("clip_vision", tmp_path / "hf")
    bare = tmp_path / "vision.safetensors"
    bare.write_bytes((directory / "model.safetensors").read_bytes())
    unresolved = inspect_checkpoint(bare, {"num_heads": 4})  # described, the heads asked for
    assert unresolved.unresolved.partial.missing == {"num_heads": "--encoder-num-heads"}
    report = inspect_checkpoint(bare, {"num_heads": 4, "encoder_num_heads": 4})
    assert report.config.num_heads == 4 and report.model.provenance["num_heads"] == "given"
    assert "ignored --num-heads: the checkpoint holds no decoder" in report.notes


# ----------------------------------------------------------------------------- fused


def test_fused_identity(fused_identity):
    report = inspect_checkpoint(fused_identity, {"num_heads": 4, "encoder_num_heads": 4})
    assert (report.kind, report.model.fused_style) == ("fused", "fusesurgery")
    fusion = report.fusion
    assert (fusion.fusion_layers, fusion.fusion_vocab_size, fusion.encoder_dim) == (
        (1, 3), 8, 64)
    assert dict(fusion.gates) == {
        f"decoder.layers.{i}.fusion_layer.{gate}.scale": 0.0
        for i in (1, 3) for gate in ("ca_scale", "mlp_scale")
    }
    assert fusion.is_identity and "gates: identity: all gates 0" in report.summary()
    assert fusion.encoder.config == FUSED_VISION
    assert fusion.encoder.provenance["num_heads"] == "given"

    state = fused_state_dict()

    def numel(predicate):
        return sum(t.numel() for key, t in state.items() if predicate(key))

    counts = components(report)
    assert counts["fusion layers"][1] == numel(lambda k: ".fusion_layer." in k)
    assert counts["fusion embedding"] == (1, 8 * 64)
    assert counts["projection head"] == (2, 64 * 48 + 64)
    assert counts["encoder"][1] == numel(lambda k: k.startswith("encoder.vision."))
    assert counts["layers"][1] == numel(
        lambda k: k.startswith("decoder.layers.") and ".fusion_layer." not in k)
    assert counts["embeddings"] == (1, 256 * 64)
    assert counts["final norm + output"] == (2, 64 + 256 * 64)
    assert report.num_parameters == sum(t.numel() for t in state.values())
    assert "decoder.layers.{1,3}.fusion_layer.attn.k_proj.weight" in row_names(report)
    assert "decoder.layers.{0..3}.attn.q_proj.weight" in row_names(report)


def test_fused_gates_are_read_exactly(tmp_path):
    gates = {"decoder.layers.1.fusion_layer.ca_scale.scale": 0.5,
             "decoder.layers.3.fusion_layer.mlp_scale.scale": -0.25}
    report = inspect_checkpoint(save_fused(tmp_path / "f.safetensors", gates),
                                {"num_heads": 4, "encoder_num_heads": 4})
    assert not report.fusion.is_identity
    assert "gates: 2 of 4 gates non-zero" in report.summary()
    assert {k: v for k, v in report.fusion.gates.items() if v != 0.0} == gates
    assert len(report.fusion.gates) == 4


def test_fused_reads_only_the_gates(fused_identity, monkeypatch):
    read, tensors = [], []
    original = CheckpointSource.read_scalar

    def spy(self, key):
        read.append(key)
        return original(self, key)

    monkeypatch.setattr(CheckpointSource, "read_scalar", spy)
    monkeypatch.setattr(CheckpointSource, "get_tensor", lambda self, key: tensors.append(key))
    inspect_checkpoint(fused_identity, {"num_heads": 4, "encoder_num_heads": 4})
    assert sorted(read) == sorted(k for k in fused_state_dict() if k.endswith("_scale.scale"))
    assert tensors == []  # the gates come from the file's bytes, without torch


def test_fused_encoder_without_a_head_count_is_a_note(fused_identity):
    report = inspect_checkpoint(fused_identity, {"num_heads": 4})
    assert report.fusion.encoder is None
    assert any("vision encoder config not resolved" in note and "--encoder-num-heads" in note
               for note in report.notes)


def test_fused_with_its_own_config(tmp_path):
    report = inspect_checkpoint(save_fused_with_config(tmp_path))
    assert report.model.provenance["num_heads"] == "read"
    assert report.config.rope_base == FUSED_DECODER.rope_base
    assert report.fusion.encoder.provenance["num_heads"] == "read"
    assert report.fusion.encoder.config == FUSED_VISION


def test_fused_with_unknown_decoder_keys(tmp_path):
    state = fused_state_dict()
    state["decoder.layers.1.cross_attn.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(KeyMapError, match="decoder.layers.1.cross_attn.weight"):
        inspect_checkpoint(tmp_path / "bad.safetensors", {"num_heads": 4})


# ----------------------------------------------------------------------------- JSON


def test_to_dict_is_json_and_complete(fused_identity, llama_dir):
    payload = json.loads(json.dumps(inspect_checkpoint(llama_dir).to_dict()))
    assert payload["architecture"] == {"kind": "decoder", "layout": "hf", "fused_style": None}
    assert payload["config"]["family"] == "llama" and "family" not in payload["architecture"]
    assert {k: payload["config"][k] for k in ("vocab_size", "embed_dim", "num_layers",
                                              "num_heads", "num_kv_heads", "head_dim",
                                              "intermediate_dim")} == {
        "vocab_size": 64, "embed_dim": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "intermediate_dim": 64}
    assert payload["config"]["rope_scaling"]["factor"] == 8.0
    assert payload["provenance"]["num_heads"] == "read"
    # a list of named counts, not a mapping keyed by display labels ("final norm + output")
    components = {c.pop("name"): c for c in payload["components"]}
    assert list(components) == ["embeddings", "layers", "final norm + output"]
    assert components["layers"]["num_parameters"] == 3 * HF_LAYER
    assert payload["num_parameters"] == sum(c["num_parameters"] for c in components.values())
    assert payload["total_bytes"] == 4 * payload["num_parameters"]
    assert payload["fusion"] is None and "keys" not in payload
    assert sum(row["num_tensors"] for row in payload["key_tree"]) == payload["num_tensors"]

    fused = inspect_checkpoint(fused_identity, {"num_heads": 4, "encoder_num_heads": 4})
    payload = json.loads(json.dumps(fused.to_dict(all_keys=True)))
    assert payload["fusion"]["fusion_layers"] == [1, 3]
    assert payload["fusion"]["is_identity"] is True
    assert payload["fusion"]["encoder"]["config"]["embed_dim"] == 48
    assert "family" not in payload["fusion"]["encoder"]  # once, in its config
    assert payload["fusion"]["encoder"]["config"]["family"] in ("clip", "siglip")
    assert len(payload["keys"]) == payload["num_tensors"] and "key_tree" not in payload
    assert payload["keys"][0] == {"name": fused.tensors[0].name,
                                  "shape": list(fused.tensors[0].shape), "dtype": "f32"}
    assert math.prod(payload["keys"][0]["shape"]) == fused.tensors[0].numel


def test_a_config_the_weights_cannot_complete_is_still_described(tmp_path, fused_identity):
    # no config states the heads: the report shows what the shapes tell and which facts need
    # which option, for a decoder, a fused checkpoint and a vision tower alike
    decoder = inspect_checkpoint(save_native_pt(tmp_path / "native.pt"))
    assert decoder.model is None and decoder.kind == "decoder"
    partial = decoder.unresolved.partial
    assert (partial.values["vocab_size"], partial.values["num_layers"]) == (256, 4)
    assert partial.provenance["family"] == "default"
    assert set(partial.missing) == {"num_heads", "head_dim", "num_kv_heads"}
    assert decoder.notes[-1] == decoder.unresolved.needs()
    assert [c.name for c in decoder.components] == ["embeddings", "layers",
                                                    "final norm + output"]
    fused = inspect_checkpoint(fused_identity)
    assert fused.kind == "fused" and "fusion layers" in [c.name for c in fused.components]
    assert fused.unresolved.attention_rows == {"decoder.layers.0.attn.q_proj.weight": 64,
                                               "decoder.layers.0.attn.k_proj.weight": 32}
    state = {key.removeprefix("encoder.vision."): value
             for key, value in fused_state_dict().items() if key.startswith("encoder.vision.")}
    torch.save(state, tmp_path / "tower.pt")
    tower = inspect_checkpoint(tmp_path / "tower.pt")
    assert tower.kind == "vision" and tower.unresolved.partial.missing == {
        "num_heads": "--encoder-num-heads"}
    assert tower.notes[-1].startswith(
        "num_heads needs --encoder-num-heads: neither a config file nor the shapes tell it")
    # given, the model resolves as before; the library loaders still refuse without it
    assert inspect_checkpoint(tmp_path / "native.pt", {"num_heads": 4}).config.num_heads == 4
    from fusesurgery import load_decoder

    with pytest.raises(ConfigError, match="--num-heads") as error:
        load_decoder(tmp_path / "native.pt")
    assert error.value.flag == "--num-heads"
