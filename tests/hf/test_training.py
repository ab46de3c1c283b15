"""Training the exported model where people train: torchtune's trainable defaults after
loading, a ``transformers.Trainer`` run on image + text with labels, ``save_pretrained`` ->
``from_pretrained``, PEFT LoRA on the fusion layers and on the decoder's attention (adapter
saved, merged, read back by fusesurgery), and bfloat16 loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fusesurgery

pytest.importorskip("transformers")
FUSION = ("cross_attention_layers.", "projection.", "fusion_embedding.")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _model(export, **kwargs):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32, **kwargs)


def _processor(export):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(export)


def _batch(export) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 32, 32), generator=generator, dtype=torch.uint8)
              for _ in range(2)]
    inputs = _processor(export)(
        images=[[images[0]], [images[1]]],
        text=["word5 <|image|> word17 word42 word7 word9", "<|image|> word3 word8 word11"])
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return dict(inputs)


class _Repeated(torch.utils.data.Dataset):
    """The same samples, one per item (the Trainer's collator stacks them again)."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = index % self.batch["input_ids"].shape[0]
        return {k: v[row] for k, v in self.batch.items()}


def _train(model, batch, out, steps: int = 2) -> list[float]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=steps,
        learning_rate=1e-2, weight_decay=0.1, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=_Repeated(batch, 2 * steps))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_loading_trains_fusion_only_unless_told(gated_export):
    model = _model(gated_export)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(FUSION)}
    assert trainable and "fusion_embedding.weight" in trainable
    everything = _model(gated_export, decoder_trainable=True, encoder_trainable=True)
    assert all(p.requires_grad for p in everything.parameters())
    everything.set_trainable(fusion=False)
    assert not any(p.requires_grad for p in everything.parameters())


def test_trainer_steps_train_fusion_and_round_trip(gated_export, gated_example, tmp_path):
    model = _model(gated_export)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch(gated_export)
    losses = _train(model, batch, tmp_path / "run")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    for name, value in before.items():  # frozen: bitwise, under weight decay too
        if not name.startswith(FUSION):
            assert torch.equal(after[name], value), name
    assert torch.equal(model.get_input_embeddings().weight, before[
        "language_model.model.embed_tokens.weight"])  # the original rows
    moved = [n for n in before if n.startswith(FUSION) and not torch.equal(after[n], before[n])]
    assert any(n.startswith("cross_attention_layers.") for n in moved)
    assert "fusion_embedding.weight" in moved and any(n.startswith("projection.") for n in moved)

    model.save_pretrained(tmp_path / "trained")
    _processor(gated_export).save_pretrained(tmp_path / "trained")
    for name in ("configuration", "modeling", "processing"):  # loads without fusesurgery
        assert (tmp_path / "trained" / f"{name}_fusesurgery_fused.py").is_file(), name
    saved = json.loads((tmp_path / "trained" / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"].startswith("processing_fusesurgery_fused.")
    again = _model(tmp_path / "trained").eval()
    model.eval()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected = model(**batch).logits
    # back to fusesurgery's layout: load_fused computes what the trained model computes
    native_dir = tmp_path / "native"
    fusesurgery.hf.import_transformers(tmp_path / "trained", native_dir)
    native = fusesurgery.load_fused(native_dir, dtype=torch.float32).eval()
    inputs = fusesurgery.load_processor(native_dir)(
        ["word5 <|image|> word17 word42 word7 word9", "<|image|> word3 word8 word11"],
        [torch.zeros(3, 32, 32, dtype=torch.uint8)] * 2, padding_side="left")
    with torch.no_grad():
        got = native(inputs.tokens, mask=inputs.mask, input_pos=inputs.input_pos,
                     encoder_input={"images": batch["pixel_values"]},
                     encoder_mask=inputs.encoder_mask)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("targets", "trains"), [
    (r"cross_attention_layers\.\d+\.attn\.(q|k|v|output)_proj", "cross_attention_layers."),
    (r"language_model\.model\.layers\.\d+\.self_attn\.(q|v)_proj", "language_model."),
])
def test_peft_lora_trains_saves_merges_and_reads_back(targets, trains, gated_export, tmp_path):
    peft = pytest.importorskip("peft")

    model = _model(gated_export)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=targets))
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert adapted and all("lora_" in n and trains in n for n in adapted)
    batch = _batch(gated_export)
    _train(lora, batch, tmp_path / "run")
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    lora.eval()
    with torch.no_grad():
        adapted_logits = lora(**batch).logits
    merged = lora.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(k.startswith(trains) for k in changed)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted_logits, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    native_dir = tmp_path / "native"
    fusesurgery.hf.import_transformers(tmp_path / "merged", native_dir)
    native = fusesurgery.load_fused(native_dir, dtype=torch.float32)
    assert type(native).__name__ == "DeepFusionModel"
    # a LoRA merged into the decoder changed original tensors: the native config says so
    # (compared with the sources fuse read), whatever the gates
    recorded = json.loads((native_dir / "fusion_config.json").read_text())
    decoder_changed = sorted(k for k in changed if k.startswith("language_model."))
    assert len(recorded["trained_originals"]) == len(decoder_changed)
    assert all(k.startswith("decoder.layers.") and k.endswith(("q_proj.weight", "v_proj.weight"))
               for k in recorded["trained_originals"])
    assert recorded["trained"] is True
    if trains != "cross_attention_layers.":
        return
    # the reloaded adapter applies to a fresh model the same way
    fresh = peft.PeftModel.from_pretrained(_model(gated_export), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, adapted_logits, rtol=0, atol=1e-5)


def test_bfloat16_loading_runs_and_generates(gated_export):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(gated_export,
                                                        dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = _batch(gated_export)
    with torch.no_grad():
        out = model(**batch)
        generated = model.generate(**{k: v for k, v in batch.items() if k != "labels"},
                                   max_new_tokens=3, do_sample=False)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)
    reference = _model(gated_export).eval()
    with torch.no_grad():
        expected = reference(**batch).logits
    real = batch["attention_mask"].bool()
    assert float((out.logits.float() - expected)[real].abs().max()) < 0.25


def test_default_loading_keeps_each_parts_stored_dtype(gated_export, tmp_path):
    """Without a dtype, the bfloat16 decoder stays bfloat16 and the float32 tower float32, each
    tensor the stored one bit for bit (transformers alone would cast the tower to bfloat16),
    and a save -> load keeps them so."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = json.loads((gated_export / "config.json").read_text())
    text_dtype = getattr(torch, config["text_config"]["dtype"])
    vision_dtype = getattr(torch, config["vision_config"]["dtype"])
    assert (text_dtype, vision_dtype) == (torch.bfloat16, torch.float32)  # the examples' own
    model = AutoModelForImageTextToText.from_pretrained(gated_export).eval()
    assert {p.dtype for p in model.language_model.parameters()} == {text_dtype}
    assert {p.dtype for p in model.vision_tower.parameters()} == {vision_dtype}
    assert model.config.vision_config.dtype == vision_dtype
    state = model.state_dict()
    for shard in sorted(gated_export.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                stored = f.get_tensor(key)
                assert state[key].dtype == stored.dtype, key
                assert torch.equal(state[key], stored), key
    batch = _batch(gated_export)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == text_dtype and torch.isfinite(out.loss)
    decoder = AutoModelForCausalLM.from_pretrained(EXAMPLES / "tiny-llama").eval()
    ids = batch["input_ids"].clamp(max=model.config.text_vocab_size - 1)
    with torch.no_grad():  # text only: the decoder's logits bit for bit (its buffers untouched)
        assert torch.equal(model(input_ids=ids).logits, decoder(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert {p.dtype for p in again.vision_tower.parameters()} == {vision_dtype}
    assert {p.dtype for p in again.language_model.parameters()} == {text_dtype}


def test_decoding_steps_run_the_cross_attention_unmasked(gated_export):
    """A step whose tokens see every image position hands the layers no mask (no masked
    kernel, no zeroed rows to compute); the prompt, whose text before the image sees none,
    keeps its mask, and the tokens are those of a masked run."""
    model = _model(gated_export).eval()
    batch = {k: v for k, v in _batch(gated_export).items() if k != "labels"}
    batch = {k: v[:1] for k, v in batch.items()}  # one sample: no padding rows
    masks = []
    for layer in model.cross_attention_layers.values():
        layer.register_forward_pre_hook(lambda module, args: masks.append(args[3]))
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False)
    per_call = len(model.cross_attention_layers)
    prefill, steps = masks[:per_call], masks[per_call:]
    assert all(mask is not None and not bool(mask.all()) for mask in prefill)
    assert len(steps) == 3 * per_call and all(mask is None for mask in steps)
    with torch.no_grad():  # the same tokens from full forwards with their masks
        ids = batch["input_ids"]
        for _ in range(4):
            logits = model(input_ids=ids, pixel_values=batch["pixel_values"],
                           attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
