"""fuse -> validate -> load_fused -> unfuse -> diff, through the CLI, on tiny real checkpoints
of every input form and family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import fusesurgery
from fusesurgery.cli.app import app
from fusesurgery.io import open_checkpoint
from tests.fusion_inputs import save_decoder, save_encoder

runner = CliRunner()

CASES = [  # decoder form, encoder, fusion placement
    ("llama", "clip", ["--layers", "1"]),
    ("mistral", "siglip", ["--every", "1", "--fusion-after"]),
    ("qwen2-tied", "clip-full", ["--every", "2", "--projection", "linear"]),
    ("safetensors", "siglip", ["--layers", "0,1", "--embedding-init", "normal"]),
    ("pt", "clip", ["--every", "2", "--new-token", "<|image|>", "--new-token", "<|video|>"]),
    ("meta", "clip", ["--every", "2", "--encoder-layer", "last"]),
]


def cli(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as source:
        return {key: source.get_tensor(key).clone() for key in source.keys()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("decoder_kind, encoder_kind, options", CASES,
                         ids=[f"{d}+{e}" for d, e, _ in CASES])
def test_fuse_validate_load_unfuse_diff(tmp_path, decoder_kind, encoder_kind, options):
    decoder, overrides = save_decoder(decoder_kind, tmp_path)
    encoder = save_encoder(encoder_kind, tmp_path)
    fused = tmp_path / "fused"

    result = cli("fuse", encoder, decoder, "-o", fused, *options, *overrides, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tied_embeddings"] == (decoder_kind == "qwen2-tied")
    config = json.loads((fused / "fusion_config.json").read_text())
    assert config["trained"] is False and set(config["gates"].values()) == {0.0}
    assert config["sources"]["decoder"]["files"][0]["header_sha256"]

    result = cli("validate", fused, "--against", decoder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["identity"], report
    assert {c["status"] for c in report["checks"]} == {"pass"}

    model = fusesurgery.load_fused(fused)
    vision = model.fused_config.encoder
    tokens = torch.randint(0, model.fused_config.decoder.vocab_size, (1, 6))
    tokens[0, 3] = model.fused_config.new_tokens[0].id
    images = torch.randn(1, 3, vision.image_size, vision.image_size)
    with torch.no_grad():
        logits = model(tokens, encoder_input={"images": images})
    assert logits.shape == (1, 6, model.fused_config.decoder.vocab_size)
    assert torch.isfinite(logits).all()

    unfused = tmp_path / "unfused"
    result = cli("unfuse", fused, "-o", unfused)
    assert result.exit_code == 0, result.output
    original, back = _tensors(decoder), _tensors(unfused)
    assert set(back) == set(original) - {"rope.freqs"}  # Meta's unused RoPE table is dropped
    for key, tensor in back.items():
        assert tensor.dtype == original[key].dtype and torch.equal(_bits(tensor),
                                                                   _bits(original[key])), key
    result = cli("diff", "--values", decoder, unfused, *overrides)
    assert result.exit_code == 0, result.output
    if decoder.is_dir():  # the source's own config comes back byte for byte
        for name in ("config.json", "params.json", "generation_config.json"):
            if (decoder / name).exists():
                assert (unfused / name).read_bytes() == (decoder / name).read_bytes()

    encoder_back = tmp_path / "encoder-back"
    result = cli("unfuse", fused, "-o", encoder_back, "--part", "encoder")
    assert result.exit_code == 0, result.output
    with safe_open(encoder / "model.safetensors", "pt") as f, \
            open_checkpoint(encoder_back) as back_source:
        for key in back_source.keys():
            assert torch.equal(_bits(back_source.get_tensor(key)), _bits(f.get_tensor(key))), key
        # what fuse left out (a CLIPModel's text tower, SigLIP's pooling head) is recorded
        dropped = set(config["sources"]["encoder"]["dropped"])
        assert dropped == {k for k in f.keys() if k.startswith(
            ("text_model.", "text_projection", "visual_projection", "logit_", "head.",
             "vision_model.head."))}
        assert set(back_source.keys()) == set(f.keys()) - dropped


def _word_tokenizer(directory: Path, words: int) -> None:
    """A WordLevel fast tokenizer of ``words`` ids saved beside a decoder by transformers."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]"
                                         ).save_pretrained(directory)


@pytest.mark.parametrize("tokenizer_words", [64, 50], ids=["contiguous", "qwen2-like-gap"])
def test_fused_tokenizer_maps_new_tokens_to_their_embedding_ids(tmp_path, tokenizer_words):
    import transformers

    decoder, _ = save_decoder("llama", tmp_path)  # 64 embedding rows
    _word_tokenizer(decoder, tokenizer_words)
    original_tokenizer = (decoder / "tokenizer.json").read_bytes()
    encoder = save_encoder("clip", tmp_path)
    fused = tmp_path / "fused"
    result = cli("fuse", encoder, decoder, "-o", fused, "--every", "2",
                 "--new-token", "<|image|>", "--new-token", "<|video|>")
    assert result.exit_code == 0, result.output
    assert not (fused / "config.json").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(fused)
    for i, token in enumerate(["<|image|>", "<|video|>"]):
        assert tokenizer.convert_tokens_to_ids(token) == 64 + i
    ids = tokenizer("w3 <|image|> w5")["input_ids"]
    assert ids == [3, 64, 5]
    assert tokenizer.decode(ids) == "w3 <|image|> w5"
    model = fusesurgery.load_fused(fused)
    assert model.decoder.tok_embeddings.num_embeddings == len(tokenizer) == 66
    # the source's tokenizer is kept unchanged for unfuse, and comes back as it was
    assert (fused / "source" / "decoder" / "tokenizer.json").read_bytes() == original_tokenizer
    assert cli("unfuse", fused, "-o", tmp_path / "back").exit_code == 0
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == original_tokenizer

    result = cli("fuse", encoder, decoder, "-o", tmp_path / "again", "--new-token", "w7",
                 "--every", "2")
    assert result.exit_code == 2 and "w7" in result.stderr and "already" in result.stderr
    assert not (tmp_path / "again").exists()


def test_merged_embeddings_load_in_transformers(tmp_path):
    """unfuse --merge-embeddings: one table of vocab + new tokens that transformers loads; on
    the original vocabulary its logits are the fused model's text path, for input ids that
    include the new tokens."""
    import transformers

    decoder, _ = save_decoder("llama", tmp_path)
    _word_tokenizer(decoder, 64)
    encoder = save_encoder("clip", tmp_path)
    fused, merged = tmp_path / "fused", tmp_path / "merged"
    assert cli("fuse", encoder, decoder, "-o", fused, "--every", "2").exit_code == 0
    result = cli("unfuse", fused, "-o", merged, "--format", "hf", "--merge-embeddings")
    assert result.exit_code == 0, result.output
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert hf.config.vocab_size == 65
    assert transformers.AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids(
        "<|image|>") == 64
    model = fusesurgery.load_fused(fused).eval()
    tokens = torch.tensor([[1, 7, 64, 9, 3, 64, 2]])
    with torch.no_grad():
        ours = model(tokens)  # text path: no encoder input
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs[..., :64], ours, rtol=0, atol=1e-5)


def test_dtype_cast_with_hf_spelling(tmp_path):
    decoder, _ = save_decoder("llama", tmp_path)
    encoder = save_encoder("siglip", tmp_path)
    fused = tmp_path / "fused"
    result = cli("fuse", encoder, decoder, "-o", fused, "--every", "2", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    with open_checkpoint(fused) as source:
        assert {info.dtype for info in source.infos().values()} == {torch.bfloat16}
    result = cli("validate", fused, "--against", decoder, "--json")
    assert result.exit_code == 0, result.output  # compared with the same cast of the source
    assert json.loads(result.stdout)["identity"] is True


def test_fuse_says_what_it_dropped_one_line_a_reason(tmp_path):
    """A whole CLIPModel: its text tower is left out, and fuse says so (one line a reason,
    not one a tensor)."""
    decoder, overrides = save_decoder("llama", tmp_path)
    encoder = save_encoder("clip-full", tmp_path)
    result = cli("fuse", encoder, decoder, "-o", tmp_path / "fused", "--layers", "1",
                 *overrides)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "encoder: dropped" in line]
    assert len(notes) >= 1 and any("text_model." in line and "more)" in line
                                   for line in notes), result.stderr
