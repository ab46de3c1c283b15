"""generate: greedy decoding with zero gates is the source decoder's (transformers' own
``generate``), token for token; the image matters once gates open; the image keys and values
are computed once; the caches are gone afterwards, whatever happened."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fusesurgery
from fusesurgery.errors import InputError
from fusesurgery.run.inputs import ModelInputs
from tests.fusion_inputs import save_decoder, save_encoder

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def model(fused_example: Path):
    return fusesurgery.load_fused(fused_example, dtype=torch.float32)


@pytest.fixture(scope="module")
def source():
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        EXAMPLES / "tiny-llama", dtype=torch.float32).eval()


def _images(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _gates(model, value: float) -> None:
    for name, param in model.named_parameters():
        if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
            param.data.fill_(value)


def test_text_prompt_is_the_source_decoders(model, source):
    inputs = fusesurgery.prepare_inputs(model, "word100 word3 word250 word9 word40")
    expected = source.generate(inputs.tokens, max_new_tokens=10, do_sample=False)
    got = fusesurgery.generate(model, inputs, max_new_tokens=10)
    assert got.sequences()[0] == expected[0, inputs.tokens.size(1):].tolist()


def test_image_prompt_with_zero_gates_is_the_source_decoders(model, source):
    inputs = fusesurgery.prepare_inputs(model, "word7 <|image|> word8", _images())
    # the source decoder fed the same ids: its own rows for the text, and for <|image|> (which
    # it has no row for) the fused checkpoint's new row
    is_image = inputs.tokens >= source.config.vocab_size
    embeds = source.get_input_embeddings()(inputs.tokens.masked_fill(is_image, 0)).detach()
    embeds[is_image] = model.decoder.tok_embeddings(inputs.tokens)[is_image].detach()
    expected = source.generate(inputs_embeds=embeds, max_new_tokens=10, do_sample=False)
    got = fusesurgery.generate(model, inputs, max_new_tokens=10)
    assert got.sequences()[0] == expected[0].tolist()


def test_left_padded_batch_is_each_prompt_alone(model):
    _gates(model, 0.7)  # the images matter
    try:
        texts = ["word7 <|image|> word8", "word100 word3 <|image|> word250 word9 word40",
                 "word1 word2"]
        images = [_images(seed=1), _images(seed=2), None]
        batch = fusesurgery.generate(model, fusesurgery.prepare_inputs(model, texts, images),
                                     max_new_tokens=4, eos_ids=())
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            alone = fusesurgery.generate(model, fusesurgery.prepare_inputs(model, text, image),
                                         max_new_tokens=4, eos_ids=())
            assert batch.sequences()[i] == alone.sequences()[0]
    finally:
        _gates(model, 0.0)


def test_open_gates_let_the_image_change_the_output(model):
    prompt = "word7 <|image|> word8"
    outputs = set()
    for gate, seed in ((0.0, 1), (0.0, 2), (2.0, 1), (2.0, 2)):
        _gates(model, gate)
        inputs = fusesurgery.prepare_inputs(model, prompt, _images(seed=seed))
        outputs.add((gate, tuple(fusesurgery.generate(model, inputs, max_new_tokens=4,
                                                      eos_ids=()).sequences()[0])))
    _gates(model, 0.0)
    closed = {out for gate, out in outputs if gate == 0.0}
    opened = {out for gate, out in outputs if gate != 0.0}
    assert len(closed) == 1  # zero gates: the image does not matter
    assert len(opened) == 2 and not opened & closed


def test_image_keys_and_values_are_computed_once(model):
    calls = {"encoder": 0, "cross k": 0, "cross v": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    handles = [model.encoder.register_forward_hook(count("encoder"))]
    fusion_layers = [layer.fusion_layer for layer in model.decoder.layers
                     if hasattr(layer, "fusion_layer")]
    for layer in fusion_layers:
        handles.append(layer.attn.k_proj.register_forward_hook(count("cross k")))
        handles.append(layer.attn.v_proj.register_forward_hook(count("cross v")))
    try:
        inputs = fusesurgery.prepare_inputs(model, "word7 <|image|> word8", _images())
        out = fusesurgery.generate(model, inputs, max_new_tokens=5, eos_ids=())
    finally:
        for handle in handles:
            handle.remove()
    assert out.lengths == (5,)
    assert calls == {"encoder": 1, "cross k": len(fusion_layers), "cross v": len(fusion_layers)}


def test_training_after_generate(model):
    inputs = fusesurgery.prepare_inputs(model, "word7 <|image|> word8", _images())
    fusesurgery.generate(model, inputs, max_new_tokens=3)
    assert not model.caches_are_enabled()
    # longer than generate's cache (3 + 3 positions): a leftover cache would overflow
    batch = fusesurgery.prepare_inputs(
        model, ["word1 <|image|> " + " ".join(f"word{i}" for i in range(20))], [_images()],
        padding_side="right")
    logits = model(**batch.model_kwargs())
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch.labels[0, 1:],
                                             ignore_index=-100)
    loss.backward()
    assert model.decoder.tok_embeddings.fusion_embedding.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_caches_torn_down_on_error(model):
    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = model.decoder.norm.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            fusesurgery.generate(model, fusesurgery.prepare_inputs(model, "word1"))
    finally:
        handle.remove()
    assert not model.caches_are_enabled()


def test_teardown_is_public(model):
    model.setup_caches(1, torch.float32, encoder_max_seq_len=17, decoder_max_seq_len=4)
    assert model.caches_are_enabled()
    with pytest.raises(ValueError, match=r"9 positions > capacity 4 .*teardown_caches\(\)"):
        with torch.no_grad():
            model(torch.zeros(1, 9, dtype=torch.long))
    model.teardown_caches()
    assert not model.caches_are_enabled()
    assert all(getattr(m, "kv_cache", None) is None for m in model.modules())
    with torch.no_grad():  # the full forward runs again at any length
        model(torch.zeros(1, 9, dtype=torch.long))


def test_sampling(model):
    inputs = fusesurgery.prepare_inputs(model, "word7 word8")
    greedy = fusesurgery.generate(model, inputs, max_new_tokens=4, eos_ids=()).sequences()
    assert fusesurgery.generate(model, inputs, max_new_tokens=4, temperature=1.0, top_k=1,
                                seed=3, eos_ids=()).sequences() == greedy
    assert fusesurgery.generate(model, inputs, max_new_tokens=4, temperature=1.0, top_p=1e-6,
                                seed=3, eos_ids=()).sequences() == greedy
    runs = [fusesurgery.generate(model, inputs, max_new_tokens=4, temperature=5.0, seed=seed,
                                 eos_ids=()).sequences() for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] != greedy


def test_stops_at_eos(model):
    inputs = fusesurgery.prepare_inputs(model, ["word7 word8", "word1"])
    free = fusesurgery.generate(model, inputs, max_new_tokens=6, eos_ids=()).sequences()
    stop = free[0][2]
    out = fusesurgery.generate(model, inputs, max_new_tokens=6, eos_ids=[stop], pad_id=0)
    assert out.sequences()[0] == free[0][:3]
    assert out.tokens[0, 3:].tolist() == [0] * (out.tokens.size(1) - 3)
    # eos_ids default to generation_config.json's
    assert fusesurgery.load_processor(model).eos_ids == (2,)


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 3}, "top_k only apply to sampling, and temperature 0 is greedy"),
    ({"top_p": 0.5, "seed": 1}, "top_p, seed only apply to sampling"),
    ({"temperature": 1.0, "seed": -1}, "seed must be an integer from 0"),
    ({"max_new_tokens": 10_000}, "longer than the model's max_seq_len"),
])
def test_bad_options(model, options, message):
    with pytest.raises(InputError, match=message):
        fusesurgery.generate(model, fusesurgery.prepare_inputs(model, "word1"), **options)


def test_right_padding_is_refused(model):
    inputs = fusesurgery.prepare_inputs(model, ["word1 word2", "word3"], padding_side="right")
    with pytest.raises(InputError, match="padding_side='left'"):
        fusesurgery.generate(model, inputs)
    assert not model.caches_are_enabled()


def test_tied_qwen2_with_siglip(tmp_path: Path):
    """Another family (half-rotation RoPE, q/k/v biases, tied output) from a tiny
    transformers-built checkpoint: the decoder part alone, token ids in."""
    import transformers

    decoder, _ = save_decoder("qwen2-tied", tmp_path)
    fused = tmp_path / "fused"
    fusesurgery.fuse(save_encoder("siglip", tmp_path), decoder, fused, every=1)
    source = transformers.AutoModelForCausalLM.from_pretrained(decoder).eval()
    prompt = torch.tensor([[3, 17, 42, 5], [9, 9, 1, 30]])
    expected = source.generate(prompt, max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    for part in ("model", "decoder"):
        model = fusesurgery.load_fused(fused, part=part)
        got = fusesurgery.generate(model, prompt, max_new_tokens=10, eos_ids=())
        assert got.tokens.tolist() == expected[:, 4:].tolist()


def test_mllama_text_model(tmp_path: Path):
    """A transformers Mllama checkpoint's fused decoder, text alone (no image: its cross
    layers are skipped, in transformers as here), open gates and all."""
    import transformers

    from tests.mllama_models import save_mllama_causal

    path = save_mllama_causal(tmp_path / "mllama")
    source = transformers.MllamaForCausalLM.from_pretrained(path).eval()
    prompt = torch.tensor([[3, 17, 42, 5, 9]])
    expected = source.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    model = fusesurgery.load_fused(path, part="decoder")
    got = fusesurgery.generate(model, prompt, max_new_tokens=8, eos_ids=())
    assert got.tokens.tolist() == expected[:, 5:].tolist()
    with pytest.raises(InputError, match="images need the whole fused model"):
        fusesurgery.generate(model, ModelInputs(
            tokens=prompt, labels=prompt, padding_mask=torch.ones_like(prompt, dtype=bool),
            encoder_input={"images": torch.zeros(1, 3, 8, 8)}))


def test_top_k_and_top_p_keep_the_right_tokens():
    from fusesurgery.run.generation import next_token

    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().expand(2000, 4)  # probabilities
    generator = torch.Generator().manual_seed(0)

    def drawn(**options) -> set[int]:
        return set(next_token(logits, temperature=1.0, generator=generator, **options).tolist())

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=3) == {0, 1, 2} and drawn(top_k=1) == {0}
    assert drawn(top_p=0.6) == {0, 1}  # 0.4 < 0.6: the second is needed, the third is not
    assert drawn(top_p=0.75) == {0, 1, 2} and drawn(top_p=0.3) == {0}


def test_text_instead_of_inputs_is_refused(model):
    with pytest.raises(InputError, match="not str; for text, pass prepare_inputs"):
        fusesurgery.generate(model, "word1 word2", max_new_tokens=2)
    assert not model.caches_are_enabled()


def test_images_for_the_decoder_alone_are_refused(fused_example: Path):
    decoder = fusesurgery.load_fused(fused_example, part="decoder")
    with pytest.raises(InputError, match="images need the whole fused model"):
        fusesurgery.prepare_inputs(decoder, "word7 <|image|>", _images())
    text = fusesurgery.prepare_inputs(decoder, "word7 word8")      # text alone still runs
    assert decoder(**text.model_kwargs()).shape == (1, 2, 512)
