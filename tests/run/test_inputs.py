"""prepare_inputs: tokens, images, the cross-attention mask (torchtune's Llama 3.2 Vision
semantics), labels and padding, for the bundled examples fused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import fusesurgery
from fusesurgery.errors import InputError
from fusesurgery.run.inputs import IGNORE_INDEX, image_spans

IMAGE = 512  # <|image|> of the fused examples
S_E = 17  # tokens per 32x32 image of the tiny CLIP tower


@pytest.fixture(scope="module")
def processor(fused_example: Path):
    return fusesurgery.load_processor(fused_example)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_spans_follow_torchtune():
    # torchtune's own example: two consecutive images share a span, the third starts anew
    tokens = [1, 1, 9673, 527, 1403, 12875, 13, 1, 1115, 374, 264, 8415]
    assert image_spans(tokens, 1) == [(0, 7), (1, 7), (7, 12)]
    assert image_spans([5, 6, 1, 7], 1) == [(2, 4)]
    assert image_spans([5, 6], 1) == []


def test_mask_labels_and_images(processor):
    text = "word0 <|image|> <|image|> word1 word2 <|image|> word3"
    inputs = processor(text, _images(3))
    tokens = inputs.tokens[0].tolist()
    assert tokens == [3, IMAGE, IMAGE, 4, 5, IMAGE, 6]
    assert inputs.encoder_input["images"].shape == (1, 3, 3, 32, 32)  # [b, n, c, h, w]
    mask = inputs.encoder_mask[0]
    assert mask.shape == (7, 3 * S_E)
    sees = [[bool(mask[row, j * S_E:(j + 1) * S_E].all()) for j in range(3)] for row in range(7)]
    assert not mask[0].any()  # text before the first image sees none
    assert sees[1] == [True, False, False]  # an image token sees its own image on
    assert sees[2:5] == [[True, True, False]] * 3  # the first two images, until the third
    assert sees[5:] == [[False, False, True]] * 2
    # every row sees whole images: no partial spans
    assert all(bool(mask[r, j * S_E:(j + 1) * S_E].any()) == sees[r][j] for r in range(7)
               for j in range(3))
    assert inputs.labels[0].tolist() == [3, IGNORE_INDEX, IGNORE_INDEX, 4, 5, IGNORE_INDEX, 6]
    assert inputs.mask is None and inputs.input_pos is None  # nothing padded


def test_batch_padding(processor):
    inputs = processor(["word0 <|image|> word1", "<|image|> word2 word3 <|image|> word4",
                        "word5"], [_images(1), _images(2, seed=1), None])
    assert inputs.tokens.shape == (3, 5)
    assert inputs.encoder_input["images"].shape == (3, 2, 3, 32, 32)
    assert torch.equal(inputs.encoder_input["images"][0, 1], torch.zeros(3, 32, 32))
    pad = processor.pad_id
    assert inputs.tokens[0].tolist() == [pad, pad, 3, IMAGE, 4]  # left-padded
    assert inputs.padding_mask[0].tolist() == [False, False, True, True, True]
    assert inputs.labels[0].tolist() == [IGNORE_INDEX] * 2 + [3, IGNORE_INDEX, 4]
    assert inputs.labels[2].tolist() == [IGNORE_INDEX] * 4 + [8]
    assert not inputs.encoder_mask[0, :, S_E:].any()  # the missing second image: never seen
    assert not inputs.encoder_mask[2].any()
    assert inputs.input_pos[0].tolist() == [0, 0, 0, 1, 2]
    right = processor(["word0 word1 word2", "word3"], padding_side="right")
    assert right.tokens[1].tolist() == [6, pad, pad] and right.mask is None
    assert right.labels[1].tolist() == [6, IGNORE_INDEX, IGNORE_INDEX]


def test_padded_logits_equal_unpadded(fused_example: Path, processor):
    model = fusesurgery.load_fused(fused_example, dtype=torch.float32)
    for gate in (p for n, p in model.named_parameters() if n.endswith("_scale.scale")):
        gate.data.fill_(0.5)  # the images matter
    texts = ["word9 <|image|> word1 word2 word3", "word4 <|image|> word5"]
    images = [_images(1, seed=2), _images(1, seed=3)]
    with torch.no_grad():
        batch = model(**processor(texts, images).model_kwargs())
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            alone = model(**processor(text, image).model_kwargs())[0]
            torch.testing.assert_close(batch[i, -alone.size(0):], alone, atol=1e-5, rtol=1e-5)


def test_image_token_prepended_when_missing(processor):
    inputs = processor("word1 word2", _images(2))
    assert inputs.tokens[0].tolist() == [IMAGE, IMAGE, 4, 5]
    assert inputs.prepended_image_tokens == (2,)
    assert processor("word1").prepended_image_tokens == (0,)


@pytest.mark.parametrize("text, images, message", [
    ("word1 <|image|>", None, r"1 <\|image\|> token\(s\) and 0 image"),
    ("<|image|> <|image|>", "one", r"the text has 2 <\|image\|> token\(s\) and 1 image"),
    (["a", "<|image|>"], [None, None], r"text 1 has 1 <\|image\|> token\(s\) and 0 image"),
    (["a", "b"], "one", "needs a list of 2 image entries"),
    (["a"], [[1]], "int is not an image"),
    (42, None, "text must be a string"),
])
def test_mismatches_are_named(processor, text, images, message):
    images = _images(1)[0] if images == "one" else images
    with pytest.raises(InputError, match=message):
        processor(text, images)


def test_differently_sized_images_in_one_batch(tmp_path: Path, fused_example: Path):
    copy = tmp_path / "fused"
    shutil.copytree(fused_example, copy)
    config = (copy / "preprocessor_config.json").read_text().replace(
        '"do_center_crop": true', '"do_center_crop": false')
    (copy / "preprocessor_config.json").write_text(config)
    processor = fusesurgery.load_processor(copy)
    wide = torch.zeros(3, 32, 64, dtype=torch.uint8)
    assert processor("<|image|>", wide).encoder_input["images"].shape[-2:] == (32, 64)
    with pytest.raises(InputError, match="different sizes"):
        processor(["<|image|>", "<|image|>"], [wide, torch.zeros(3, 32, 32, dtype=torch.uint8)])


def test_missing_tokenizer_and_bad_source(tmp_path: Path, fused_example: Path):
    copy = tmp_path / "fused"
    shutil.copytree(fused_example, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="has no tokenizer.json"):
        fusesurgery.prepare_inputs(copy, "word1")
    with pytest.raises(InputError, match="not a fused checkpoint directory"):
        fusesurgery.load_processor(tmp_path / "nowhere")


def test_eos_ids_fall_back_to_the_source_config(tmp_path: Path, fused_example: Path):
    copy = tmp_path / "fused"
    shutil.copytree(fused_example, copy)
    (copy / "generation_config.json").write_text('{"eos_token_id": [2, 7], "pad_token_id": 0}')
    processor = fusesurgery.load_processor(copy)
    assert (processor.eos_ids, processor.pad_id) == ((2, 7), 0)
    (copy / "generation_config.json").unlink()
    processor = fusesurgery.load_processor(copy)  # source/decoder/config.json: eos 2, no pad
    assert (processor.eos_ids, processor.pad_id) == ((2,), 2)
    (copy / "source" / "decoder" / "config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(InputError, match="eos_token_id must be a token id"):
        fusesurgery.load_processor(copy)


def test_ids_without_an_embedding_row_are_refused(tmp_path: Path, fused_example: Path):
    copy = tmp_path / "fused"
    shutil.copytree(fused_example, copy)
    rows = 512 + fusesurgery.read_fused_config(copy).fusion.fusion_vocab_size
    (copy / "generation_config.json").write_text(f'{{"eos_token_id": [2, {rows}]}}')
    with pytest.raises(InputError, match=rf"eos/pad token ids \[{rows}\] have no embedding row"):
        fusesurgery.load_processor(copy)
    generation = f'{{"eos_token_id": 2, "pad_token_id": {rows + 5}}}'
    (copy / "generation_config.json").write_text(generation)
    with pytest.raises(InputError, match=rf"ids \[{rows + 5}\] have no embedding row"):
        fusesurgery.load_processor(copy)
