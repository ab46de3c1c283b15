"""The exported model's processor, forward and ``generate`` in transformers: the processor's
inputs are what fusesurgery's own processor makes of the same text, the model's logits with
images are ``load_fused``'s, the mask it derives is the processor's, ``labels`` give
transformers' shifted loss, text-only calls skip fusion, and ``generate`` runs the tower and
projects the image keys/values once, giving the source decoder's tokens while the gates are
zero."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusesurgery

pytest.importorskip("transformers")
IMAGE = "<|image|>"
IMAGE_ID = 512  # the examples' decoder has 512 rows; <|image|> is the first new token
TEXTS = [f"word5 word17 {IMAGE} word42 word7", f"{IMAGE} word9 {IMAGE}{IMAGE} word3 word8 word11"]


def _images(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 40, 48), generator=generator, dtype=torch.uint8)
            for _ in range(count)]


def _processor(export):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(export)


def _model(export, **kwargs):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32, **kwargs)
    return model.eval()


@pytest.fixture(scope="module")
def batch(gated_export):
    return _processor(gated_export)(images=[_images(1), _images(3, seed=1)], text=TEXTS)


def test_processor_inputs_are_fusesurgerys_own(gated_export, gated_example, batch):
    from fusesurgery.hf.template.processing_fusesurgery_fused import FusedVisionTextProcessor

    assert type(_processor(gated_export)) is FusedVisionTextProcessor
    native = fusesurgery.load_processor(gated_example)(
        TEXTS, [_images(1), _images(3, seed=1)], padding_side="left")
    real = batch["attention_mask"].bool()
    assert torch.equal(real, native.padding_mask)
    assert torch.equal(batch["input_ids"][real], native.tokens[native.padding_mask])
    b, n = batch["pixel_values"].shape[:2]
    assert (b, n) == (2, 3) and batch["cross_attention_mask"].shape == (2, real.shape[1], 3)
    s_e = native.encoder_mask.shape[-1] // n
    per_position = batch["cross_attention_mask"].repeat_interleave(s_e, dim=-1)
    assert torch.equal(per_position[real], native.encoder_mask[native.padding_mask])
    torch.testing.assert_close(batch["pixel_values"], native.encoder_input["images"],
                               rtol=0, atol=0.05)  # PIL's resize vs fusesurgery's


def test_processor_places_the_image_token_and_checks_counts(gated_export):
    processor = _processor(gated_export)
    image_id = processor.image_token_id
    inputs = processor(images=_images(2), text="word5 word6")  # no token: one per image, first
    assert inputs["input_ids"][0, :2].tolist() == [image_id, image_id]
    mask = inputs["cross_attention_mask"][0].tolist()  # [s, n]: a run of image tokens shares
    assert mask == [[True, False]] + [[True, True]] * 3  # its span, each from its own token
    with pytest.raises(ValueError, match="1 <|image|> token"):
        processor(images=_images(2), text=f"word5 {IMAGE} word6")
    text_only = processor(text=["word5 word6", "word7"])
    assert set(text_only) == {"input_ids", "attention_mask"}


def test_chat_template_puts_the_image_where_the_message_does(gated_export):
    processor = _processor(gated_export)
    messages = [{"role": "user", "content": [{"type": "text", "text": "word5 "},
                                             {"type": "image"},
                                             {"type": "text", "text": " word6"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert f"word5 {IMAGE} word6" in prompt
    inputs = processor(images=_images(1), text=prompt)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 1


def test_chat_template_is_the_decoders_own_where_it_has_one(gated_export):
    processor = _processor(gated_export)
    processor.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "word5"}]},
                {"role": "assistant", "content": "word6"}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        f"<user>{IMAGE}word5</user><assistant>word6</assistant><assistant>")


def test_logits_with_images_equal_load_fused(gated_export, gated_example, batch):
    model = _model(gated_export)
    native = fusesurgery.load_fused(gated_example, dtype=torch.float32).eval()
    inputs = fusesurgery.load_processor(gated_example)(
        TEXTS, [_images(1), _images(3, seed=1)], padding_side="left")
    with torch.no_grad():
        given = model(**batch).logits
        derived = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"]).logits
        expected = native(inputs.tokens, mask=inputs.mask, input_pos=inputs.input_pos,
                          encoder_input={"images": batch["pixel_values"]},
                          encoder_mask=inputs.encoder_mask)
        text_only = model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits
    assert torch.equal(derived, given)  # the model derives exactly the processor's mask
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(given[real], expected[real], rtol=0, atol=1e-5)
    assert not torch.allclose(given[real], text_only[real], atol=1e-3)  # the images act


def test_labels_give_the_shifted_loss_without_image_tokens(gated_export, batch):
    model = _model(gated_export)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == IMAGE_ID, -100)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def _count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_text_only_skips_the_fusion_layers(gated_export, batch):
    model = _model(gated_export)
    calls = [_count_calls(layer) for layer in model.cross_attention_layers.values()]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert [c[0] for c in calls] == [0] * len(calls)
    with torch.no_grad():
        model(**batch)
    assert [c[0] for c in calls] == [1] * len(calls)


def test_generate_projects_the_image_once(gated_export, batch):
    model = _model(gated_export)
    tower = _count_calls(model.vision_tower)
    projections = [_count_calls(layer.attn.k_proj)
                   for layer in model.cross_attention_layers.values()]
    steps = _count_calls(model.language_model)
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert steps[0] == 5 and tower[0] == 1 and {p[0] for p in projections} == {1}
    ids, attention = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():  # the same tokens from full forwards without a cache
        for _ in range(5):
            logits = model(input_ids=ids, attention_mask=attention,
                           pixel_values=batch["pixel_values"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    assert torch.equal(generated, ids)


def test_zero_gates_generate_the_source_decoders_tokens(zero_export, fused_example):
    from transformers import AutoModelForCausalLM

    from tests.hf.test_export_cli import EXAMPLES

    model = _model(zero_export)
    source = AutoModelForCausalLM.from_pretrained(EXAMPLES / "tiny-llama",
                                                  dtype=torch.float32).eval()
    processor = _processor(zero_export)
    text = processor(text=["word5 word17 word42 word7"])
    image = processor(images=_images(1), text=[f"word5 {IMAGE} word42 word7"])
    with torch.no_grad():
        expected_text = source.generate(**text, max_new_tokens=6, do_sample=False)
        got_text = model.generate(**text, max_new_tokens=6, do_sample=False)
        # the source has no row for the image token: give it the fused row as an embedding
        ids = image["input_ids"]
        embeds = source.get_input_embeddings()(ids.clamp(max=IMAGE_ID - 1))
        embeds[ids == IMAGE_ID] = model.fusion_embedding.weight[0]
        expected_image = source.generate(inputs_embeds=embeds,
                                         attention_mask=image["attention_mask"],
                                         max_new_tokens=6, do_sample=False)
        got_image = model.generate(**image, max_new_tokens=6, do_sample=False)
    assert torch.equal(got_text, expected_text)
    assert torch.equal(got_image[:, ids.shape[1]:], expected_image)


def test_processor_and_model_load_with_transformers_alone(gated_export, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "process_without_fusesurgery.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # this export's code, not a cached one
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # bitwise below: the same reductions
    run = subprocess.run([sys.executable, str(script), str(gated_export), str(tmp_path / "r.pt")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    remote = torch.load(tmp_path / "r.pt", weights_only=True)
    assert remote["fusesurgery_imported"] is False
    assert remote["processor_class"] == "FusedVisionTextProcessor"
    image = torch.randint(0, 256, (3, 40, 48), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    local = _processor(gated_export)(images=[[image], []], text=["word5 <|image|> word42",
                                                                 "word7 word8"])
    assert set(remote["inputs"]) == set(local)
    assert all(torch.equal(remote["inputs"][k], local[k]) for k in local)
    model = _model(gated_export)
    with torch.no_grad():
        assert torch.equal(remote["logits"], model(**local).logits)
        assert torch.equal(remote["generated"],
                           model.generate(**local, max_new_tokens=3, do_sample=False))


@settings(max_examples=200)
@given(st.lists(st.lists(st.sampled_from([3, 4, IMAGE_ID]), min_size=1, max_size=12),
                min_size=1, max_size=3, unique_by=len))
def test_image_token_mask_is_fusesurgerys_image_spans(rows):
    from fusesurgery.hf.template.modeling_fusesurgery_fused import image_token_mask
    from fusesurgery.run.inputs import image_spans

    s = max(len(row) for row in rows)
    n = max(1, max(row.count(IMAGE_ID) for row in rows))
    ids = torch.tensor([row + [3] * (s - len(row)) for row in rows])  # right-padded
    expected = torch.zeros(len(rows), s, n, dtype=torch.bool)
    for i, row in enumerate(ids.tolist()):
        for j, (start, end) in enumerate(image_spans(row, IMAGE_ID)):
            expected[i, start:end, j] = True
    assert torch.equal(image_token_mask(ids, IMAGE_ID, n), expected)
    if n > 1 or any(IMAGE_ID in row for row in rows):
        with pytest.raises(ValueError, match="image tokens and only"):
            image_token_mask(ids, IMAGE_ID, n - 1) if n > 1 else image_token_mask(
                ids, IMAGE_ID, 0)
