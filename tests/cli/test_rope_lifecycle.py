"""Issue 18's RoPE scalings through the whole life of a checkpoint, with sources written by
transformers itself: Qwen2.5 with YaRN (factor 4 over a 16-position original context, in
transformers 5's ``rope_parameters`` spelling and, as Qwen2.5's own config.json states it,
transformers 4's ``rope_scaling`` + ``type`` with max_position_embeddings the context before
YaRN), a Llama with linear scaling, one with dynamic NTK and one with LongRoPE.

Each case: ``load_decoder`` against transformers at 8 and 40 tokens (past the original
context), and token by token with a KV cache across it; ``fuse`` -> ``validate --against``
(every row passes, identity; the library's validate also at 40 tokens) -> ``unfuse`` bitwise
-> ``diff --values`` identical; ``convert --to native`` and back to hf bitwise with the same
config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fusesurgery import load_decoder
from fusesurgery.cli.app import app
from fusesurgery.io import open_checkpoint
from fusesurgery.validate import validate_fused

transformers = pytest.importorskip("transformers")
runner = CliRunner()

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ORIGINAL = 16  # the original context every scaling here extends; the tests run to 40
LONGROPE = dict(rope_type="longrope", original_max_position_embeddings=ORIGINAL,
                short_factor=[1.0, 1.3, 1.9, 2.5], long_factor=[1.5, 2.8, 4.4, 7.0])

# name -> (family, rope settings, other config settings, dtype written, max_shard_size)
CASES = {
    "qwen2.5-yarn-tied-f32": (
        "qwen2", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL),
        dict(tie_word_embeddings=True, rope_theta=1_000_000.0), torch.float32, None),
    # as Qwen2.5's own config.json states YaRN: max_position_embeddings is the context
    # before YaRN, so the native max_seq_len is 4 x 16 = 64
    "qwen2.5-yarn-v4-spelling-untied-bf16-sharded": (
        "qwen2", dict(type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL),
        dict(tie_word_embeddings=False, max_position_embeddings=ORIGINAL), torch.bfloat16,
        "8KB"),
    "llama-linear-f32": ("llama", dict(rope_type="linear", factor=4.0), {}, torch.float32,
                         None),
    # dynamic NTK grows past max_position_embeddings: 16 here, and load_decoder is given a
    # longer max_seq_len to run past it
    "llama-dynamic-f32": ("llama", dict(rope_type="dynamic", factor=2.0),
                          dict(max_position_embeddings=ORIGINAL), torch.float32, None),
    "llama-longrope-f32": ("llama", LONGROPE, {},
                                torch.float32, None),
}
CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "llama": ("LlamaConfig", "LlamaForCausalLM")}


def cli(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def save_decoder(case: str, directory: Path) -> Path:
    family, rope, settings, dtype, shard = CASES[case]
    config_cls, model_cls = (getattr(transformers, name) for name in CLASSES[family])
    theta = settings.get("rope_theta", 10_000.0)
    config = config_cls(**{**SIZES, **{k: v for k, v in settings.items() if k != "rope_theta"}},
                        rope_parameters={**rope, "rope_theta": theta})
    torch.manual_seed(0)
    model = model_cls(config)
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    if "type" in rope:  # Qwen2.5's own config.json: transformers 4's spelling
        document = json.loads((directory / "config.json").read_text())
        del document["rope_parameters"]
        document.update(rope_theta=theta, rope_scaling=rope)
        (directory / "config.json").write_text(json.dumps(document, indent=2))
    return directory


def _reference(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32).eval()


def _native(directory: Path, case: str):
    # dynamic NTK starts where the config's max_position_embeddings ends: the native model
    # needs a longer max_seq_len to get there
    overrides = {"max_seq_len": 64} if "dynamic" in case else None
    return load_decoder(directory, dtype=torch.float32, overrides=overrides).eval()


def _tokens(length: int) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (2, length),
                         generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_decoder_equals_transformers_past_the_original_context(tmp_path, case):
    hf = save_decoder(case, tmp_path / "hf")
    reference, decoder = _reference(hf), _native(hf, case)
    rope_type = CASES[case][1].get("rope_type", CASES[case][1].get("type"))
    assert reference.config.rope_parameters["rope_type"] == rope_type
    assert decoder.layers[0].attn.pos_embeddings.scaling.rope_type == rope_type
    assert decoder.max_seq_len == 64
    for length in (8, 40, 12):  # 40 then 12: dynamic NTK goes back to its original table
        tokens = _tokens(length)
        with torch.no_grad():
            ours, theirs = decoder(tokens), reference(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["llama-dynamic-f32", "llama-longrope-f32",
                                  "qwen2.5-yarn-tied-f32"])
def test_cached_generation_across_the_original_context_equals_transformers(tmp_path, case):
    """A prefill of 10 tokens, then one token at a time to 24, with a KV cache on both sides:
    each step's frequencies are those transformers picks for that call (longrope switches to
    its long factors at 17 positions; dynamic NTK regrows its base at every step past 16),
    while the cached keys keep the ones they were rotated with."""
    hf = save_decoder(case, tmp_path / "hf")
    reference, decoder = _reference(hf), _native(hf, case)
    tokens = _tokens(24)
    prefill = 10
    cache = transformers.DynamicCache(config=reference.config)
    decoder.setup_caches(2, torch.float32, decoder_max_seq_len=24)
    with torch.no_grad():
        for start, stop in [(0, prefill), *((p, p + 1) for p in range(prefill, 24))]:
            positions = torch.arange(start, stop).expand(2, -1)
            ours = decoder(tokens[:, start:stop], input_pos=positions)
            theirs = reference(tokens[:, start:stop], cache=cache, use_cache=True,
                               position_ids=positions).logits
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5,
                                       msg=lambda m, start=start: f"step at {start}: {m}")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


def _assert_bitwise(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype, key
        assert torch.equal(tensor.reshape(-1).view(torch.uint8),
                           theirs[key].reshape(-1).view(torch.uint8)), key


def save_clip(directory: Path) -> Path:
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case", sorted(CASES))
def test_fuse_validate_unfuse_diff_convert(tmp_path, case):
    decoder = save_decoder(case, tmp_path / "hf")
    hf_config = json.loads((decoder / "config.json").read_text())
    fused = tmp_path / "fused"
    result = cli("fuse", save_clip(tmp_path / "clip"), decoder, "-o", fused, "--every", "1",
                 "--json")
    assert result.exit_code == 0, result.output
    recorded = json.loads((fused / "fusion_config.json").read_text())["decoder"]["rope_scaling"]
    assert recorded["rope_type"] == CASES[case][1].get("rope_type", CASES[case][1].get("type"))

    result = cli("validate", fused, "--against", decoder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["identity"], report
    assert {check["status"] for check in report["checks"]} == {"pass"}
    if "dynamic" not in case:  # past the original context (dynamic: max_seq_len is 16)
        report = validate_fused(fused, against=decoder, seq_len=40)
        assert report.ok and report.identity, report.summary()

    if CASES[case][0] == "llama":  # Mllama's text model is a Llama: it carries the scaling
        mllama = tmp_path / "mllama"
        result = cli("convert", fused, "-o", mllama, "--to", "mllama")
        assert result.exit_code == 0, result.output
        exported = transformers.MllamaForCausalLM.from_pretrained(mllama).eval()
        tokens = _tokens(40)
        with torch.no_grad():
            torch.testing.assert_close(exported(tokens).logits,
                                       _reference(decoder)(tokens).logits, rtol=0, atol=1e-5)

    unfused = tmp_path / "unfused"
    result = cli("unfuse", fused, "-o", unfused)
    assert result.exit_code == 0, result.output
    original = _tensors(decoder)
    _assert_bitwise(_tensors(unfused), original)
    assert (unfused / "config.json").read_bytes() == (decoder / "config.json").read_bytes()
    result = cli("diff", "--values", decoder, unfused)
    assert result.exit_code == 0, result.output

    native = tmp_path / "native"
    result = cli("convert", decoder, "-o", native, "--to", "native")
    assert result.exit_code == 0, result.output
    back = tmp_path / "back"
    result = cli("convert", native, "-o", back, "--to", "hf")
    assert result.exit_code == 0, result.output
    _assert_bitwise(_tensors(back), original)
    assert json.loads((back / "config.json").read_text()) == hf_config


def test_inspect_shows_the_scaling_and_refuses_a_bad_one_in_one_line(tmp_path):
    hf = save_decoder("qwen2.5-yarn-tied-f32", tmp_path / "hf")
    result = cli("inspect", hf)
    assert result.exit_code == 0, result.output
    assert any(line.split()[:4] == ["rope_scaling", "yarn", "x4", "(orig"]
               for line in result.stdout.splitlines()), result.stdout
    document = json.loads((hf / "config.json").read_text())
    for rope, message in [
        ({"rope_type": "mrope", "factor": 2.0}, "config.json: rope_type 'mrope' is not "
         "supported; supported: default, linear, dynamic, yarn, longrope, llama3"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 2, "long_factor": [2.0] * 2},
         "config.json: longrope scaling has 2 factors per list, head_dim 8 needs 4"),
        ({"rope_type": "yarn", "factor": -4.0}, "config.json: RopeScaling.factor must be a "
         "positive finite number, got -4.0"),
        ({"rope_type": "yarn", "factor": 0.5}, "config.json: RopeScaling.factor must be at "
         "least 1 (a RoPE scaling extends the context), got 0.5"),
        ({"rope_type": "linear", "factor": 0.5}, "RopeScaling.factor must be at least 1"),
        ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 2.0},
         "config.json: RopeScaling.beta_fast 1 is below beta_slow 2"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
         "config.json: yarn rope scaling's original_max_position_embeddings 128 must be at "
         "most max_position_embeddings 64"),
    ]:
        document["rope_parameters"] = {**rope, "rope_theta": 1e6}
        (hf / "config.json").write_text(json.dumps(document))
        result = cli("inspect", hf)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr)
