"""``convert FUSED --to transformers``: the export loads with transformers alone and computes
what the fused checkpoint computes.

Sources are tiny transformers models (a Llama with a CLIP tower, fusion before its layers; a
Qwen2 with tied embeddings and a SigLIP tower, fusion after its layers), fused by
``fusesurgery fuse``'s library function and given nonzero gates through ``load_fused`` +
``save_fused``. The exported directories are loaded in a subprocess in which fusesurgery
cannot be imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusesurgery
from tests.tiny_models import TINY_DECODER, TINY_VISION, save_tiny_hf_decoder

HERE = Path(__file__).resolve().parent
PAIRS = {
    "llama-clip": dict(decoder="llama", tower="clip", overrides={}, fusion_after=False),
    "qwen2-siglip": dict(decoder="qwen2", tower="siglip",
                         overrides={"tie_word_embeddings": True}, fusion_after=True),
    "mistral-siglip": dict(decoder="mistral", tower="siglip", overrides={}, fusion_after=False),
    "qwen3-clip": dict(decoder="qwen3", tower="clip", overrides={"head_dim": 16},
                       fusion_after=False),
}
IMAGE_ID = TINY_DECODER["vocab_size"]  # <|image|>: the first id past the vocabulary


def _save_tower(tower: str, directory: Path) -> Path:
    import transformers as t

    torch.manual_seed(1)
    config_cls, model_cls = {"clip": (t.CLIPVisionConfig, t.CLIPVisionModel),
                             "siglip": (t.SiglipVisionConfig, t.SiglipVisionModel)}[tower]
    model_cls(config_cls(**TINY_VISION)).save_pretrained(directory)
    return directory


def _with_gates(fused: Path, out: Path) -> Path:
    """The fused checkpoint with every gate nonzero (as after training)."""
    model = fusesurgery.load_fused(fused)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
                param.fill_(0.7)
    fusesurgery.save_fused(model, out)
    return out


INPUTS = {
    "ids": torch.tensor([[1, 5, 9, IMAGE_ID, 7, 3, 11], [2, 4, IMAGE_ID, 6, 8, 10, 12]]),
    "text": torch.tensor([[1, 5, 9, 7, 3], [2, 4, 6, 8, 10]]),
    "pixels": torch.randn(2, 3, TINY_VISION["image_size"], TINY_VISION["image_size"],
                          generator=torch.Generator().manual_seed(2)),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict]:
    """Per pair: sources, fused checkpoints (zero and nonzero gates), their exports, and what
    the exports computed in one process without fusesurgery."""
    from fusesurgery.hf import export_transformers

    base = tmp_path_factory.mktemp("exports")
    torch.save(INPUTS, base / "inputs.pt")
    pairs, directories = {}, []
    for name, pair in PAIRS.items():
        root = base / name
        decoder = save_tiny_hf_decoder(pair["decoder"], root / "decoder", **pair["overrides"])
        tower = _save_tower(pair["tower"], root / "tower")
        fusesurgery.fuse(tower, decoder, root / "fused", every=1,
                         fusion_after=pair["fusion_after"])
        _with_gates(root / "fused", root / "trained")
        for kind in ("fused", "trained"):
            export_transformers(root / kind, root / f"{kind}-hf")
            directories.append(str(root / f"{kind}-hf"))
        pairs[name] = dict(root=root, decoder=decoder, trained=root / "trained")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # as many threads as this process computes with: a reduction split another way rounds
    # another way, and the comparisons below are bitwise
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    run = subprocess.run(
        [sys.executable, str(HERE / "load_without_fusesurgery.py"), str(base / "inputs.pt"),
         str(base / "results.pt"), *directories],
        capture_output=True, text=True, env=env, cwd=base, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(base / "results.pt", weights_only=True)
    assert results["fusesurgery_imported"] is False
    for pair in pairs.values():
        pair["zero"] = results[str(pair["root"] / "fused-hf")]
        pair["gated"] = results[str(pair["root"] / "trained-hf")]
    return pairs


@pytest.fixture(params=sorted(PAIRS))
def exported(request, exports) -> dict:
    return exports[request.param]


def _encoder_mask(ids: torch.Tensor, s_e: int) -> torch.Tensor:
    """``[b, s, s_e]``: from the image token on, a row sees the whole image."""
    seen = (ids == IMAGE_ID).cumsum(dim=1) > 0
    return seen[:, :, None].expand(-1, -1, s_e)


def test_loads_with_transformers_alone_with_every_key(exported):
    for loaded in (exported["zero"], exported["gated"]):
        assert loaded["class"] == "FusedVisionTextForConditionalGeneration"
        assert loaded["missing"] == [] and loaded["unexpected"] == []


def test_logits_with_an_image_equal_load_fused(exported):
    model = fusesurgery.load_fused(exported["trained"])
    ids, pixels = INPUTS["ids"], INPUTS["pixels"]
    s_e = model.fused_config.encoder.seq_len
    with torch.no_grad():
        native = model(ids, encoder_input={"images": pixels},
                       encoder_mask=_encoder_mask(ids, s_e))
    exported_logits = exported["gated"]["logits"]
    assert not torch.equal(exported_logits, exported["zero"]["logits"])  # the gates act
    # bitwise: float32 on the CPU, the same kernels (the native decoder's RoPE hands attention
    # q and k in transformers' dim order, so its q . k sums round as transformers' do)
    assert torch.equal(exported_logits, native)


def test_zero_gates_give_the_source_decoder_bitwise(exported):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(exported["decoder"], dtype=torch.float32)
    text = INPUTS["text"]
    with torch.no_grad():
        expected = source(text).logits
        generated = source.generate(text, max_new_tokens=4, do_sample=False)
    zero = exported["zero"]
    assert torch.equal(zero["text_logits"], expected)
    assert torch.equal(zero["text_with_image_logits"], expected)  # no image token: no image
    assert torch.equal(zero["generated_text"], generated)


def test_generate_reuses_the_image_cache_and_matches_full_forwards(exported):
    gated = exported["gated"]
    assert gated["generated"].shape == (2, 7 + 4)
    assert torch.equal(gated["generated"], gated["greedy_without_cache"])


def test_inspect_of_each_family_export_has_no_notes(exported):
    # the config check behind inspect's notes reads each family's text_config / vision_config
    # as the weights' own: an unedited export never gets one
    from fusesurgery.hf.inspect_export import inspect_export

    for kind in ("fused-hf", "trained-hf"):
        assert inspect_export(exported["root"] / kind).notes == ()


def test_load_fused_of_the_export_is_load_fused_of_the_checkpoint(exported):
    """``load_fused(EXPORT)``, in memory: the model and config ``load_fused`` of the fused
    checkpoint gives, its logits with an image and open gates bitwise."""
    native = fusesurgery.load_fused(exported["trained"])
    model = fusesurgery.load_fused(exported["root"] / "trained-hf")
    assert model.fused_config == native.fused_config
    ids, pixels = INPUTS["ids"], INPUTS["pixels"]
    mask = _encoder_mask(ids, native.fused_config.encoder.seq_len)
    with torch.no_grad():
        logits = model(ids, encoder_input={"images": pixels}, encoder_mask=mask)
        assert torch.equal(logits, native(ids, encoder_input={"images": pixels},
                                          encoder_mask=mask))
    assert torch.equal(logits, exported["gated"]["logits"])  # transformers' own, too
