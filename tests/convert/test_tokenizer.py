"""New special tokens in real tokenizers, checked by loading them back with AutoTokenizer.

The tokenizers are built with the ``tokenizers`` library (and ``sentencepiece`` where it is
installed) and saved as transformers saves them; after ``add_special_tokens`` the files are
written to a directory WITHOUT a config.json, as in a fused output, and transformers is the
judge of what they mean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusesurgery.convert.tokenizer import (
    FAST_TOKENIZER_CLASS,
    TOKENIZER_FILES,
    add_special_tokens,
    read_tokenizer_files,
    tokenizer_length,
)
from fusesurgery.errors import ConfigError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["hello", "world", "foo", "bar", "baz", "qux", "red", "green", "blue", "cat", "dog",
         "sun", "moon", "tree", "rock", "fish", "bird"]
IMAGE = "<|image|>"
VIDEO = "<|video|>"
# Byte-level BPE (GPT-2 style): "Ġ" is the byte-level spelling of a space.
BPE_ALPHABET = sorted(set("helowrdfbaz") | {"Ġ"})
BPE_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
              ("Ġw", "or"), ("Ġwor", "l"), ("Ġworl", "d")]
ENDOFTEXT = "<|endoftext|>"


def wordlevel_tokenizer(directory: Path) -> Path:
    """A 20-token WordLevel fast tokenizer saved by transformers: tokenizer.json and
    tokenizer_config.json, special tokens [UNK] [PAD] <s> and an extra <|extra|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[UNK]", "[PAD]", "<s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
        additional_special_tokens=["<|extra|>"])
    fast.save_pretrained(directory)
    return directory


def bpe_vocab() -> dict[str, int]:
    return {token: i for i, token in
            enumerate([ENDOFTEXT, *BPE_ALPHABET, *("".join(m) for m in BPE_MERGES)])}


def bpe_fast_tokenizer(directory: Path, tokenizer_class: str | None) -> Path:
    """A byte-level BPE fast tokenizer in the layout of Qwen2's repository: tokenizer.json,
    vocab.json, merges.txt, and a tokenizer_config.json with added_tokens_decoder and
    additional_special_tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    model = models.BPE(bpe_vocab(), BPE_MERGES)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([ENDOFTEXT, "<|im_start|>", "<|im_end|>"])
    directory.mkdir(parents=True)
    backend.save(str(directory / "tokenizer.json"))
    model.save(str(directory))  # vocab.json, merges.txt
    added = {str(backend.token_to_id(t)): {
        "content": t, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True} for t in (ENDOFTEXT, "<|im_start|>", "<|im_end|>")}
    config = {"added_tokens_decoder": added,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
              "eos_token": "<|im_end|>", "pad_token": ENDOFTEXT, "unk_token": None}
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "chat_template.jinja").write_text("{{ messages }}")
    return directory


def bpe_slow_tokenizer(directory: Path, *, with_config: bool = True) -> Path:
    """GPT-2's slow layout: vocab.json + merges.txt (written by ``tokenizers``) and a
    tokenizer_config.json naming GPT2Tokenizer; no tokenizer.json."""
    from tokenizers import models

    directory.mkdir(parents=True)
    models.BPE(bpe_vocab(), BPE_MERGES).save(str(directory))
    if with_config:
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": ENDOFTEXT,
                  "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
                  "added_tokens_decoder": {"0": {
                      "content": ENDOFTEXT, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True}}}
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def write_out(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    assert not (directory / "config.json").exists()
    return directory


def load(directory: Path):
    assert not (directory / "config.json").exists()
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def check_new_tokens(tok, tokens: list[str], first_id: int, text_before: str,
                     ids_before: list[int]) -> None:
    """``tok`` knows ``tokens`` at ``first_id + i``, round trips them, and encodes the old text
    as before."""
    for offset, token in enumerate(tokens):
        token_id = first_id + offset
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.convert_ids_to_tokens(token_id) == token
        assert tok.decode([token_id]) == token
    encoded = tok(f"hello {' world '.join(tokens)} world", add_special_tokens=False).input_ids
    for offset in range(len(tokens)):
        assert encoded.count(first_id + offset) == 1
    decoded = tok.decode(encoded)
    assert all(token in decoded for token in tokens)
    assert tok.decode(encoded, skip_special_tokens=True).split() == \
        ["hello", *["world"] * len(tokens)]
    assert tok(text_before, add_special_tokens=False).input_ids == ids_before
    assert len(tok) == first_id + len(tokens)


# --- fast tokenizers ----------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0, 7])
@pytest.mark.parametrize("tokens", [[IMAGE], [IMAGE, VIDEO]])
def test_wordlevel_fast(tmp_path, gap, tokens):
    source = wordlevel_tokenizer(tmp_path / "source")
    files = read_tokenizer_files(source)
    before = load(source)
    ids_before = before("hello world foo", add_special_tokens=False).input_ids
    length = tokenizer_length(files)
    assert length == len(before) == 3 + len(WORDS) + 1  # <|extra|> is an added token
    first_id = length + gap

    out = add_special_tokens(files, tokens, first_id)

    tok = load(write_out(tmp_path / "out", out))
    check_new_tokens(tok, tokens, first_id, "hello world foo", ids_before)
    assert tokenizer_length(out) == first_id + len(tokens)
    assert tok.convert_tokens_to_ids("<|extra|>") == before.convert_tokens_to_ids("<|extra|>")
    # the placeholders of the gap are special: dropped when special tokens are skipped
    for token_id in range(length, first_id):
        assert tok.convert_ids_to_tokens(token_id) == f"<|reserved_token_{token_id}|>"
        assert tok.decode([token_id], skip_special_tokens=True) == ""
    config = json.loads(out["tokenizer_config.json"])
    assert config["extra_special_tokens"] == ["<|extra|>", *tokens]


@pytest.mark.parametrize("tokenizer_class", ["Qwen2Tokenizer", FAST_TOKENIZER_CLASS, None])
@pytest.mark.parametrize("gap", [0, 5])
def test_qwen2_layout(tmp_path, tokenizer_class, gap):
    """Qwen2's files: transformers 5 rebuilds a Qwen2Tokenizer from vocab and merges and takes
    the added tokens from added_tokens_decoder alone, in id order."""
    source = bpe_fast_tokenizer(tmp_path / "source", tokenizer_class)
    files = read_tokenizer_files(source)
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "vocab.json",
                          "merges.txt", "chat_template.jinja"}
    before = load(source)
    ids_before = before("hello world", add_special_tokens=False).input_ids
    first_id = tokenizer_length(files) + gap
    assert tokenizer_length(files) == len(bpe_vocab()) + 2

    out = add_special_tokens(files, [IMAGE, VIDEO], first_id)

    tok = load(write_out(tmp_path / "out", out))
    check_new_tokens(tok, [IMAGE, VIDEO], first_id, "hello world", ids_before)
    assert tok.convert_tokens_to_ids("<|im_end|>") == len(bpe_vocab()) + 1
    config = json.loads(out["tokenizer_config.json"])
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>", IMAGE, VIDEO]
    assert config["added_tokens_decoder"][str(first_id)] == {
        "content": IMAGE, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True}
    assert config["tokenizer_class"] == (tokenizer_class or FAST_TOKENIZER_CLASS)
    assert {IMAGE, VIDEO} <= set(tok.all_special_tokens)
    for name in ("vocab.json", "merges.txt", "chat_template.jinja"):
        assert out[name] is files[name]


def test_fast_tokenizer_without_config(tmp_path):
    """tokenizer.json alone: a tokenizer_config.json naming the fast class is created, so that
    transformers 4 too can pick a class without a config.json."""
    source = wordlevel_tokenizer(tmp_path / "source")
    (source / "tokenizer_config.json").unlink()
    files = read_tokenizer_files(source)
    first_id = tokenizer_length(files) + 3

    out = add_special_tokens(files, [IMAGE], first_id)

    assert json.loads(out["tokenizer_config.json"]) == {"tokenizer_class": FAST_TOKENIZER_CLASS}
    tok = load(write_out(tmp_path / "out", out))
    assert tok(f"hello {IMAGE}", add_special_tokens=False).input_ids == [3, first_id]


def test_tokenizer_class_added_only_when_missing(tmp_path):
    source = wordlevel_tokenizer(tmp_path / "source")
    files = read_tokenizer_files(source)
    config = json.loads(files["tokenizer_config.json"])
    assert config["tokenizer_class"] == "TokenizersBackend"
    out = add_special_tokens(files, [IMAGE], tokenizer_length(files))
    assert json.loads(out["tokenizer_config.json"])["tokenizer_class"] == "TokenizersBackend"

    del config["tokenizer_class"]
    files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
    out = add_special_tokens(files, [IMAGE], tokenizer_length(files))
    assert json.loads(out["tokenizer_config.json"])["tokenizer_class"] == FAST_TOKENIZER_CLASS
    tok = load(write_out(tmp_path / "out", out))
    assert tok.convert_tokens_to_ids(IMAGE) == tokenizer_length(files)


# --- slow tokenizers ----------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0, 4])
def test_gpt2_slow_files(tmp_path, gap):
    """vocab.json + merges.txt and no tokenizer.json: the ids live in added_tokens_decoder."""
    source = bpe_slow_tokenizer(tmp_path / "source")
    files = read_tokenizer_files(source)
    assert set(files) == {"vocab.json", "merges.txt", "tokenizer_config.json"}
    before = load(source)
    ids_before = before("hello world", add_special_tokens=False).input_ids
    first_id = tokenizer_length(files) + gap
    assert tokenizer_length(files) == len(bpe_vocab()) == len(before)

    out = add_special_tokens(files, [IMAGE, VIDEO], first_id)

    assert out["vocab.json"] is files["vocab.json"] and out["merges.txt"] is files["merges.txt"]
    tok = load(write_out(tmp_path / "out", out))
    check_new_tokens(tok, [IMAGE, VIDEO], first_id, "hello world", ids_before)
    # the file was written with sorted keys and stays so
    text = out["tokenizer_config.json"].decode()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_gpt2_slow_files_legacy_added_tokens(tmp_path):
    """A config without added_tokens_decoder (before transformers 4.34) and added_tokens.json:
    the config gets a complete added_tokens_decoder, added_tokens.json the new entries."""
    source = bpe_slow_tokenizer(tmp_path / "source")
    config = json.loads((source / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    n = len(bpe_vocab())
    (source / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (source / "added_tokens.json").write_text(json.dumps({"<|sep|>": n}))
    (source / "special_tokens_map.json").write_text(
        json.dumps({"additional_special_tokens": ["<|sep|>"], "pad_token": ENDOFTEXT}))
    files = read_tokenizer_files(source)
    assert tokenizer_length(files) == n + 1

    out = add_special_tokens(files, [IMAGE], n + 3)

    assert json.loads(out["added_tokens.json"]) == {
        "<|sep|>": n, f"<|reserved_token_{n + 1}|>": n + 1,
        f"<|reserved_token_{n + 2}|>": n + 2, IMAGE: n + 3}
    new_config = json.loads(out["tokenizer_config.json"])
    assert new_config["added_tokens_decoder"][str(n)]["content"] == "<|sep|>"
    assert new_config["additional_special_tokens"] == ["<|sep|>", IMAGE]
    assert new_config["pad_token"] == ENDOFTEXT
    assert json.loads(out["special_tokens_map.json"])["additional_special_tokens"] == \
        ["<|sep|>", IMAGE]
    # a compact file stays compact
    assert b"\n" not in out["special_tokens_map.json"]
    tok = load(write_out(tmp_path / "out", out))
    assert tok.convert_tokens_to_ids("<|sep|>") == n
    assert tok(f"hello {IMAGE} world", add_special_tokens=False).input_ids.count(n + 3) == 1
    assert len(tok) == n + 4


def test_sentencepiece_model(tmp_path):
    """Llama 2's slow layout: tokenizer.model and a tokenizer_config.json."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    import io

    model = io.BytesIO()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=60, model_type="bpe",
        byte_fallback=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = processor.get_piece_size()
    special = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
               for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    (source / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": special,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False,
        "legacy": False}, indent=2))
    files = read_tokenizer_files(source)
    assert tokenizer_length(files) == pieces
    for piece_id in (3, pieces - 1):  # the pieces are read right from the protobuf
        piece = processor.id_to_piece(piece_id)
        with pytest.raises(ConfigError, match=f"^tokenizer.model: '{piece}' is already token "
                                              f"{piece_id};"):
            add_special_tokens(files, [piece], pieces)
    before = load(source)
    ids_before = before("hello world", add_special_tokens=False).input_ids
    first_id = pieces + 2

    out = add_special_tokens(files, [IMAGE], first_id)

    assert out["tokenizer.model"] is files["tokenizer.model"]
    tok = load(write_out(tmp_path / "out", out))
    assert tok.convert_tokens_to_ids(IMAGE) == first_id
    assert tok.convert_ids_to_tokens(first_id) == IMAGE
    encoded = tok(f"hello {IMAGE} world", add_special_tokens=False).input_ids
    assert encoded.count(first_id) == 1 and IMAGE in tok.decode(encoded)
    assert tok("hello world", add_special_tokens=False).input_ids == ids_before
    assert len(tok) == first_id + 1


def test_tiktoken_file():
    """Llama 3's original tokenizer.model: base64 tokens and ranks, special tokens beside it."""
    import base64

    ranks = {b"hello": 0, b" world": 1, b"<|image|>": 2, b"\xff": 3}
    model = b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items())
    files = {"tokenizer.model": model, "tokenizer_config.json": json.dumps(
        {"added_tokens_decoder": {"4": {"content": "<|begin|>"}}}).encode()}
    assert tokenizer_length(files) == 5
    with pytest.raises(ConfigError, match=r"tokenizer.model: '<\|image\|>' is already token 2"):
        add_special_tokens(files, [IMAGE], 5)
    out = add_special_tokens(files, [VIDEO], 6)
    decoder = json.loads(out["tokenizer_config.json"])["added_tokens_decoder"]
    assert {k: v["content"] for k, v in decoder.items()} == {
        "4": "<|begin|>", "5": "<|reserved_token_5|>", "6": VIDEO}


# --- errors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_files(tmp_path_factory) -> dict[str, bytes]:
    return read_tokenizer_files(bpe_fast_tokenizer(tmp_path_factory.mktemp("t") / "t", None))


def test_token_already_in_vocab(fast_files):
    assert bpe_vocab()["hello"] == 16
    with pytest.raises(ConfigError, match=r"^tokenizer.json: 'hello' is already token 16;"):
        add_special_tokens(fast_files, ["hello"], 100)


def test_token_already_added(fast_files):
    with pytest.raises(ConfigError, match=r"^tokenizer.json: '<\|im_end\|>' is already token 23"):
        add_special_tokens(fast_files, [IMAGE, "<|im_end|>"], 100)


def test_token_in_added_tokens_decoder_only(fast_files):
    config = json.loads(fast_files["tokenizer_config.json"])
    config["added_tokens_decoder"]["50"] = {"content": IMAGE}
    files = {**fast_files, "tokenizer_config.json": json.dumps(config).encode()}
    with pytest.raises(ConfigError, match=r"^tokenizer_config.json: '<\|image\|>' is already "
                                          r"token 50"):
        add_special_tokens(files, [IMAGE], 100)
    with pytest.raises(ConfigError, match=r"^tokenizer_config.json: id 50 for '<\|video\|>' "
                                          r"is already '<\|image\|>'"):
        add_special_tokens(files, [VIDEO], 50)


def test_id_already_taken(fast_files):
    assert tokenizer_length(fast_files) == 24  # ids 22 and 23 are <|im_start|>, <|im_end|>
    with pytest.raises(ConfigError, match=r"^tokenizer.json: id 23 for '<\|video\|>' is "
                                          r"already '<\|im_end\|>'$"):
        add_special_tokens(fast_files, [VIDEO], 23)


def test_id_below_tokenizer_length(fast_files):
    """A free id inside the tokenizer's range would still be given the next id on loading."""
    config = json.loads(fast_files["tokenizer_config.json"])
    config["added_tokens_decoder"]["40"] = {"content": "<|far|>"}
    files = {**fast_files, "tokenizer_config.json": json.dumps(config).encode()}
    with pytest.raises(ConfigError, match=r"^tokenizer_config.json: the tokenizer's ids run "
                                          r"to 40 .* \(use 41 or more\)"):
        add_special_tokens(files, [IMAGE], 30)


def test_placeholder_name_taken(fast_files):
    n = tokenizer_length(fast_files)
    with pytest.raises(ConfigError, match=r"^the new tokens: '<\|reserved_token_\d+\|>' is "
                                          r"already a token"):
        add_special_tokens(fast_files, [IMAGE, f"<|reserved_token_{n}|>"], n + 1)


@pytest.mark.parametrize("tokens, message", [
    ([IMAGE, VIDEO, IMAGE], r"^new tokens: '<\|image\|>' is given twice$"),
    ([IMAGE, ""], r"^new tokens: '' is not a non-empty string$"),
    ([None], r"^new tokens: None is not a non-empty string$"),
])
def test_bad_new_tokens(fast_files, tokens, message):
    with pytest.raises(ConfigError, match=message):
        add_special_tokens(fast_files, tokens, 100)


def test_bad_first_id(fast_files):
    with pytest.raises(ConfigError, match="first id must be a non-negative int, not -1"):
        add_special_tokens(fast_files, [IMAGE], -1)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b'{"model": ', r"^tokenizer.json: not valid JSON: Expecting value at "
                                      r"line 1 column 11$"),
    ("tokenizer_config.json", b'{"a": 1, "a": 2}', r"^tokenizer_config.json: names 'a' twice$"),
    ("special_tokens_map.json", b"[1]", r"^special_tokens_map.json: holds a JSON list, not an "
                                        r"object$"),
    ("added_tokens.json", b"\xff", r"^added_tokens.json: not UTF-8 text$"),
    ("added_tokens.json", b'{"<x>": "7"}', r"^added_tokens.json: '<x>' has id '7', not a "
                                           r"non-negative int$"),
    ("tokenizer.json", b'{"model": {"type": "BPE"}}', r"^tokenizer.json: 'model' has no 'vocab'"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": {"x": {"content": "a"}}}',
     r"^tokenizer_config.json: added_tokens_decoder entry 'x'"),
])
def test_malformed_files(fast_files, name, content, message):
    with pytest.raises(ConfigError, match=message):
        add_special_tokens({**fast_files, name: content}, [IMAGE], 100)


def test_no_vocabulary():
    files = {"special_tokens_map.json": b"{}", "chat_template.jinja": b"{{ x }}"}
    assert tokenizer_length(files) is None
    with pytest.raises(ConfigError, match=r"^chat_template.jinja, special_tokens_map.json: no "
                                          r"vocabulary \(tokenizer.json, "):
        add_special_tokens(files, [IMAGE], 10)


def test_unreadable_model_file():
    files = {"tokenizer.model": b"\x07garbage", "tokenizer_config.json": b"{}"}
    assert tokenizer_length(files) is None
    with pytest.raises(ConfigError, match=r"^tokenizer.model: neither a sentencepiece model "
                                          r"nor a tiktoken file"):
        add_special_tokens(files, [IMAGE], 10)


# --- what stays as it was -----------------------------------------------------------------


def test_unchanged_files_are_the_same_bytes(fast_files):
    files = {**fast_files, "chat_template.json": b'{"chat_template": "x"}',
             "generation_config.json": b"{}"}
    out = add_special_tokens(files, [IMAGE], 100)
    assert set(out) == set(files)
    changed = {name for name in files if out[name] is not files[name]}
    assert changed == {"tokenizer.json", "tokenizer_config.json"}
    assert add_special_tokens(files, [], 100) == files


def test_config_left_alone_when_nothing_to_record(tmp_path):
    """tokenizer.json holds the ids; a legacy config with a class has nothing to gain."""
    source = wordlevel_tokenizer(tmp_path / "source")
    files = read_tokenizer_files(source)
    config = json.loads(files["tokenizer_config.json"])
    del config["extra_special_tokens"]
    files["tokenizer_config.json"] = json.dumps(config).encode()
    out = add_special_tokens(files, [IMAGE], 30)
    assert out["tokenizer_config.json"] is files["tokenizer_config.json"]
    assert load(write_out(tmp_path / "out", out)).convert_tokens_to_ids(IMAGE) == 30


def test_json_style_kept(fast_files):
    out = add_special_tokens(fast_files, [IMAGE], 100)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        before, after = fast_files[name].decode(), out[name].decode()
        assert after.endswith("\n") == before.endswith("\n")
        assert after.split("\n")[1].startswith("  ") and not after.split("\n")[1][2] == " "
    # a one-line tokenizer.json (tokenizers' ``save(pretty=False)``) stays one line
    compact = json.dumps(json.loads(fast_files["tokenizer.json"]),
                         separators=(",", ":")).encode()
    out = add_special_tokens({**fast_files, "tokenizer.json": compact}, ["<|ü|>"], 100)
    assert b"\n" not in out["tokenizer.json"] and "<|ü|>".encode() in out["tokenizer.json"]
    assert json.loads(out["tokenizer.json"])["added_tokens"][-1] == {
        "id": 100, "content": "<|ü|>", "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": True}


def test_tokenizer_files_cover_what_transformers_reads():
    from transformers.tokenization_utils_base import (
        ADDED_TOKENS_FILE,
        FULL_TOKENIZER_FILE,
        SPECIAL_TOKENS_MAP_FILE,
        TOKENIZER_CONFIG_FILE,
    )
    from transformers.utils.hub import CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE

    for name in (ADDED_TOKENS_FILE, FULL_TOKENIZER_FILE, SPECIAL_TOKENS_MAP_FILE,
                 TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE):
        assert name in TOKENIZER_FILES
    for module in ("llama", "qwen2", "gpt2", "gemma", "gpt_neox"):
        tokenization = __import__(f"transformers.models.{module}.tokenization_{module}",
                                  fromlist=["VOCAB_FILES_NAMES"])
        assert set(tokenization.VOCAB_FILES_NAMES.values()) <= set(TOKENIZER_FILES), module


def test_does_not_import_transformers_or_tokenizers():
    code = ("import sys, fusesurgery.convert.tokenizer; "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('transformers', 'tokenizers', 'sentencepiece')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
