"""``fusesurgery generate``: the quickest "does my fused model run"; with zero gates it prints
what the source decoder generates for the same prompt ids; bad input is one line, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fusesurgery.cli.app import app

PIL = pytest.importorskip("PIL.Image")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    PIL.fromarray(pixels.numpy()).save(path)
    return path


def test_image_prompt_prints_what_the_source_decoder_generates(fused_example, picture):
    import transformers

    result = runner.invoke(app, ["generate", str(fused_example), "--image", str(picture),
                                 "--prompt", "word7 word8", "--max-new-tokens", "6",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert "1 image token put in front of it" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["prompt_ids"] == [512, 10, 11] and doc["prepended_image_tokens"] == 1
    # the bf16 source decoder, fed the same ids (<|image|> is the fused checkpoint's new row)
    import fusesurgery

    table = fusesurgery.load_fused(fused_example, part="decoder").tok_embeddings
    source = transformers.AutoModelForCausalLM.from_pretrained(EXAMPLES / "tiny-llama")
    with torch.no_grad():
        embeds = table(torch.tensor([doc["prompt_ids"]]))
    expected = source.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert doc["new_ids"] == expected[0].tolist()
    text = runner.invoke(app, ["generate", str(fused_example), "--image", str(picture),
                               "--prompt", "<|image|> word7 word8", "--max-new-tokens", "6"])
    assert text.exit_code == 0 and "put in front" not in text.stderr
    assert text.stdout.strip() == doc["text"] and doc["text"].startswith("word")


def test_text_prompt(fused_example):
    result = runner.invoke(app, ["generate", str(fused_example), "--prompt", "word1 word2",
                                 "--max-new-tokens", "3", "--temperature", "1", "--top-k",
                                 "5", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["prompt_ids"] == [4, 5] and 1 <= len(doc["new_ids"]) <= 3


@pytest.mark.parametrize("case, message", [
    ("missing image", "image {dir}/missing.png not found"),
    ("not an image", "is not an image Pillow can read"),
    ("two tokens", "the text has 2 <|image|> token(s) and 1 image(s)"),
    ("no tokenizer", "has no tokenizer.json"),
    ("bad option", "max_new_tokens must be a positive integer"),
    ("bad device", "--device: unknown device 'tpu'"),
])
def test_errors_are_one_line(fused_example, picture, tmp_path, case, message):
    fused, image, prompt, extra = fused_example, picture, "word1", []
    if case == "missing image":
        image = tmp_path / "missing.png"
    elif case == "not an image":
        image = tmp_path / "notes.png"
        image.write_text("hello")
    elif case == "two tokens":
        prompt = "<|image|> word1 <|image|>"
    elif case == "no tokenizer":
        fused = tmp_path / "fused"
        shutil.copytree(fused_example, fused)
        (fused / "tokenizer.json").unlink()
    elif case == "bad option":
        extra = ["--max-new-tokens", "0"]
    else:
        extra = ["--device", "tpu"]
    result = runner.invoke(app, ["generate", str(fused), "--image", str(image), "--prompt",
                                 prompt, *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message.format(dir=tmp_path) in lines[0]
    assert result.stdout == ""
