"""generate's decoding steps with an image: a step that sees every image position runs the
fusion layers unmasked (the same attention, without the masked kernel and the skipped-row
work); a step that sees only some positions keeps its mask."""

from __future__ import annotations

import pytest
import torch

import fusesurgery


@pytest.fixture(scope="module")
def model(fused_example):
    model = fusesurgery.load_fused(fused_example, dtype=torch.float32)
    for name, param in model.named_parameters():
        if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
            param.data.fill_(1.0)  # open: the image changes the steps
    return model


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def _step_masks(model, prompt: str, images: torch.Tensor):
    """The ``encoder_mask`` a fusion layer got at each call of a 4-token generate."""
    seen = []
    layer = next(layer.fusion_layer for layer in model.decoder.layers
                 if hasattr(layer, "fusion_layer"))
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("encoder_mask")), with_kwargs=True)
    try:
        inputs = fusesurgery.prepare_inputs(model, prompt, images)
        fusesurgery.generate(model, inputs, max_new_tokens=4, eos_ids=())
    finally:
        handle.remove()
    return seen


def test_steps_that_see_the_whole_image_run_unmasked(model):
    masks = _step_masks(model, "word7 <|image|> word8", _images(1))
    prefill, steps = masks[0], masks[1:]
    assert prefill is not None and not bool(prefill.all())  # word7 sees no image
    assert len(steps) == 3 and all(mask is None for mask in steps)


def test_an_unmasked_step_is_the_all_true_masked_one_bitwise(model):
    """What dropping the mask relies on: the same logits, bit for bit (float32, CPU)."""
    inputs = fusesurgery.prepare_inputs(model, "word7 <|image|> word8", _images(1))
    b, s = inputs.tokens.shape
    s_e = inputs.encoder_mask.shape[-1]
    logits = {}
    with torch.no_grad():
        for name, step_mask in (("masked", torch.ones(b, 1, s_e, dtype=torch.bool)),
                                ("unmasked", None)):
            model.setup_caches(b, torch.float32, encoder_max_seq_len=s_e,
                               decoder_max_seq_len=s + 1)
            try:
                model(inputs.tokens, encoder_input=inputs.encoder_input,
                      encoder_mask=inputs.encoder_mask)
                logits[name] = model(torch.tensor([[5]]), encoder_mask=step_mask)
            finally:
                model.teardown_caches()
    assert torch.equal(logits["masked"], logits["unmasked"])


def test_steps_that_see_part_of_the_images_keep_their_mask(model):
    # the last prompt token sees the second image only: so do the steps after it
    masks = _step_masks(model, "<|image|> word7 <|image|> word8", _images(2))
    steps = masks[1:]
    assert len(steps) == 3
    for mask in steps:
        assert mask is not None and mask.shape[1] == 1
        assert bool(mask.any()) and not bool(mask.all())
