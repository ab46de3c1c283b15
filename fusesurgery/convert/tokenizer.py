"""New special tokens (``<|image|>``) added to a Hugging Face tokenizer at the ids fusion chose.

A fused decoder's new tokens take embedding ids ``vocab_size + i``, where ``vocab_size`` is the
number of rows of the decoder's embedding table. That may be more than the tokenizer knows:
Qwen2-0.5B has 151936 rows for 151665 tokens. Neither ``tokenizers`` nor transformers keep an
added token's id when it leaves a gap: both give added tokens the next free id, in id order
(``tokenizers`` ignores the ``id`` in ``tokenizer.json``; transformers 5 adds a slow tokenizer's
``added_tokens_decoder`` in order). So the gap ``[tokenizer length, vocab_size)`` is filled with
placeholder special tokens ``<|reserved_token_{id}|>`` (transformers' own name for a tiktoken
gap), after which every loader lands the new tokens on their ids, and ``len(tokenizer)`` equals
the fused embedding table's rows.

Files edited (every other file is returned unchanged, byte for byte):

- ``tokenizer.json``: ``added_tokens``, read by every fast tokenizer.
- ``tokenizer_config.json``: ``added_tokens_decoder`` where it has one (transformers >= 4.34
  then reads added tokens from it alone, not from ``special_tokens_map.json`` or
  ``added_tokens.json``, and transformers 5's model classes such as ``Qwen2Tokenizer``
  rebuild the tokenizer from vocab and merges and add exactly these, in id order);
  ``additional_special_tokens`` and a list
  ``extra_special_tokens`` where present; ``tokenizer_class`` set to
  ``PreTrainedTokenizerFast`` where it is missing and a ``tokenizer.json`` exists, because
  without a ``config.json`` beside it (the fused output has none) transformers 4 cannot
  otherwise pick a class. With no ``tokenizer.json`` (a slow tokenizer: ``tokenizer.model`` or
  ``vocab.json`` + ``merges.txt``) the config is the only place the new ids can be recorded, so
  a config without ``added_tokens_decoder`` gets a complete one (the legacy
  ``added_tokens.json`` entries and ``special_tokens_map.json`` keys folded in, so nothing that
  transformers would have read from them is lost), and a missing config is created.
- ``special_tokens_map.json``: ``additional_special_tokens``, where present.
- ``added_tokens.json``, where present.

JSON is rewritten in the file's own style: its indentation (or none), sorted keys if they were,
its trailing newline, non-ASCII text as is. Nothing here imports transformers or tokenizers.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusesurgery.errors import ConfigError
from fusesurgery.io._files import DuplicateKeyError, read_side_file, reject_duplicate_keys
from fusesurgery.io.checkpoint import TOKENIZER_FILES

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
VOCAB_JSON = "vocab.json"
VOCAB_TXT = "vocab.txt"
# transformers reads a tiktoken BPE file under either name, a sentencepiece model under these
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
TIKTOKEN_FILES = ("tokenizer.model", "tiktoken.model")

# (TOKENIZER_FILES, the files that travel with a checkpoint, lives with the reader in io)
assert {TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS, VOCAB_JSON,
        VOCAB_TXT, *SENTENCEPIECE_FILES, *TIKTOKEN_FILES} <= set(TOKENIZER_FILES), (
    "a tokenizer file the readers here name is missing from io's TOKENIZER_FILES")
# The files that define the base vocabulary; tokens can be added only beside one of them.
VOCABULARY_FILES: tuple[str, ...] = (
    TOKENIZER_JSON, VOCAB_JSON, VOCAB_TXT, "tokenizer.model", "tiktoken.model", "spiece.model",
    "sentencepiece.bpe.model",
)
RESERVED_TOKEN = "<|reserved_token_{id}|>"
FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_SPECIAL_LISTS = ("additional_special_tokens", "extra_special_tokens")
_EDITED = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS)


def read_tokenizer_files(directory: Path) -> dict[str, bytes]:
    """The files among :data:`TOKENIZER_FILES` present in ``directory``, read whole.

    Raises:
        CheckpointError: one is present but unreadable, not a regular file, or too large.
    """
    return {name: read_side_file(directory / name) for name in TOKENIZER_FILES
            if (directory / name).exists()}


def tokenizer_length(files: Mapping[str, bytes]) -> int | None:
    """How many ids the tokenizer knows (its largest id + 1, added tokens included), or
    ``None`` when no vocabulary file among ``files`` can be read.

    Raises:
        ConfigError: a JSON tokenizer file is malformed.
    """
    return _read(files).ids.length


def add_special_tokens(
    files: Mapping[str, bytes], tokens: Sequence[str], first_id: int
) -> dict[str, bytes]:
    """``files`` with ``tokens[i]`` added as a special token of id ``first_id + i``.

    Ids between the tokenizer's length and ``first_id`` are filled with
    ``<|reserved_token_{id}|>`` placeholders (see the module docstring for why).

    Args:
        files: file name -> bytes of a tokenizer's files (names from :data:`TOKENIZER_FILES`).
        tokens: the new tokens, distinct and non-empty.
        first_id: the id of ``tokens[0]``; at least the tokenizer's length.

    Returns:
        Every file of ``files``, the edited ones re-serialised (and ``tokenizer_config.json``
        created where needed), the others the very same bytes.

    Raises:
        ConfigError: a token is empty, repeated or already in the tokenizer; an id is taken or
            below the tokenizer's length; no vocabulary file; a malformed file.
    """
    tokens = list(tokens)
    _check_new_tokens(tokens, first_id)
    if not tokens:
        return dict(files)
    read = _read(files)
    ids = read.ids
    if ids.length is None:
        present = [name for name in VOCABULARY_FILES if name in files]
        if present:
            raise ConfigError(f"{present[0]}: neither a sentencepiece model nor a tiktoken "
                              f"file; cannot add {tokens[0]!r}")
        raise ConfigError(
            f"{', '.join(sorted(files)) or 'no tokenizer files'}: no vocabulary "
            f"({', '.join(VOCABULARY_FILES)}) to add {tokens[0]!r} to")
    for offset, token in enumerate(tokens):
        if token in ids.by_token:
            token_id, where = ids.by_token[token]
            raise ConfigError(f"{where}: {token!r} is already token {token_id}; new tokens "
                              "must be new to the tokenizer")
        if first_id + offset in ids.by_id:
            other, where = ids.by_id[first_id + offset]
            raise ConfigError(f"{where}: id {first_id + offset} for {token!r} is already "
                              f"{other!r}")
    if first_id < ids.length:
        raise ConfigError(
            f"{ids.length_file}: the tokenizer's ids run to {ids.length - 1} and loaders "
            f"append added tokens after them, so {tokens[0]!r} cannot take id {first_id} "
            f"(use {ids.length} or more)")
    added = [(RESERVED_TOKEN.format(id=i), i) for i in range(ids.length, first_id)]
    for name, token_id in added:
        if name in ids.by_token or name in tokens:
            where = ids.by_token[name][1] if name in ids.by_token else "the new tokens"
            raise ConfigError(f"{where}: {name!r} is already a token; it is the placeholder "
                              f"for the unused id {token_id} below the new tokens")
    added += [(token, first_id + offset) for offset, token in enumerate(tokens)]

    out = dict(files)
    docs = read.docs
    if TOKENIZER_JSON in docs:
        doc = docs[TOKENIZER_JSON]
        doc.setdefault("added_tokens", []).extend(
            {"id": token_id, "content": token, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for token, token_id in added)
        out[TOKENIZER_JSON] = _dump_like(files[TOKENIZER_JSON], doc,
                                         read.sorted_keys[TOKENIZER_JSON])
    config = _edit_config(files, docs, read, tokens, added)
    if config is not None:
        out[TOKENIZER_CONFIG] = config
    if SPECIAL_TOKENS_MAP in docs:
        special_map = docs[SPECIAL_TOKENS_MAP]
        if _extend_special_lists(special_map, tokens):
            out[SPECIAL_TOKENS_MAP] = _dump_like(files[SPECIAL_TOKENS_MAP], special_map,
                                                 read.sorted_keys[SPECIAL_TOKENS_MAP])
    if ADDED_TOKENS in docs:
        docs[ADDED_TOKENS].update(added)
        out[ADDED_TOKENS] = _dump_like(files[ADDED_TOKENS], docs[ADDED_TOKENS],
                                       read.sorted_keys[ADDED_TOKENS])
    return out


def check_new_tokens_present(
    files: Mapping[str, bytes], tokens: Sequence[tuple[str, int]], origin: str,
    optional: Sequence[str] = (),
) -> None:
    """A fused tokenizer against the new tokens its config records: each must be an added
    token at exactly the recorded id, neither its text nor its id a base-vocabulary one, and
    no other added token at its id. Nothing to check without a vocabulary file (fuse writes
    no tokenizer for a decoder that had none).

    Args:
        files: file name -> bytes of the tokenizer's files.
        tokens: ``(token, id)`` pairs as ``fusion_config.json`` records them.
        origin: the config that records them, for messages.
        optional: tokens that may be absent (names for embedding rows no token reaches);
            their ids must still be free.

    Raises:
        ConfigError: a token missing, at another id, in the base vocabulary, or an id taken
            by another token; a malformed tokenizer file.
    """
    if not tokens or not any(name in files for name in VOCABULARY_FILES):
        return
    docs = {name: _load_json(name, files[name]) for name in
            (TOKENIZER_JSON, TOKENIZER_CONFIG, ADDED_TOKENS, VOCAB_JSON) if name in files}
    added: dict[int, list[tuple[str, str]]] = {}
    for name, token, token_id in _added_ids(docs):
        added.setdefault(token_id, []).append((token, name))
    wanted_tokens = {token for token, _ in tokens}
    # the recorded ids, and any other id an added entry gives a new token
    wanted_ids = {token_id for _, token_id in tokens} | {
        token_id for token_id, entries in added.items()
        if any(text in wanted_tokens for text, _ in entries)}
    base = _Ids()  # only the entries that concern the new tokens: one pass, no full maps
    for name, token, token_id in _vocabulary(files, docs):
        base.length = 0  # a vocabulary is there
        if token in wanted_tokens or token_id in wanted_ids:
            base.add(token, token_id, name)
    if base.length is None:
        return
    for token, token_id in tokens:
        if token in base.by_token:
            other_id, where = base.by_token[token]
            raise ConfigError(f"{where}: {token!r} is token {other_id} of the base vocabulary, "
                              f"but {origin} records it as the new token {token_id}")
        if token_id in base.by_id:
            other, where = base.by_id[token_id]
            raise ConfigError(f"{where}: id {token_id} is {other!r} of the base vocabulary, "
                              f"but {origin} records it as the new token {token!r}")
        elsewhere = sorted((i, name) for i, entries in added.items() for text, name in entries
                           if text == token and i != token_id)
        if elsewhere:
            other_id, where = elsewhere[0]
            taken = (f", which is {base.by_id[other_id][0]!r} of the base vocabulary;"
                     if other_id in base.by_id else ", but")
            raise ConfigError(f"{where}: {token!r} has id {other_id}{taken} {origin} records "
                              f"id {token_id}")
        others = [(text, name) for text, name in added.get(token_id, []) if text != token]
        if others:
            raise ConfigError(f"{others[0][1]}: id {token_id} is {others[0][0]!r}, but {origin} "
                              f"records it as the new token {token!r}")
        if token_id not in added and token not in optional:
            raise ConfigError(f"the tokenizer has no added token {token!r}, but {origin} records "
                              f"it as the new token {token_id}")


def _check_new_tokens(tokens: list[str], first_id: int) -> None:
    if isinstance(first_id, bool) or not isinstance(first_id, int) or first_id < 0:
        raise ConfigError(f"new tokens: the first id must be a non-negative int, not {first_id!r}")
    seen = set()
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise ConfigError(f"new tokens: {token!r} is not a non-empty string")
        if token in seen:
            raise ConfigError(f"new tokens: {token!r} is given twice")
        seen.add(token)


def _edit_config(files: Mapping[str, bytes], docs: dict[str, Any], read: _Read,
                 tokens: list[str], added: list[tuple[str, int]]) -> bytes | None:
    """The new ``tokenizer_config.json``, or ``None`` when it needs no change."""
    created = TOKENIZER_CONFIG not in docs
    config = {} if created else docs[TOKENIZER_CONFIG]
    was_sorted = created or read.sorted_keys[TOKENIZER_CONFIG]
    changed = created
    decoder = config.get("added_tokens_decoder")
    if decoder is None and TOKENIZER_JSON not in files:
        decoder = config["added_tokens_decoder"] = _legacy_added_tokens(docs, config)
        for key, value in docs.get(SPECIAL_TOKENS_MAP, {}).items():
            config.setdefault(key, copy.deepcopy(value))  # the map's lists are extended too
    if decoder is not None:
        decoder.update((str(token_id), _added_token(token)) for token, token_id in added)
        changed = True
    if TOKENIZER_JSON in files and not config.get("tokenizer_class"):
        config["tokenizer_class"] = FAST_TOKENIZER_CLASS
        changed = True
    changed |= _extend_special_lists(config, tokens)
    if not changed:
        return None
    if created:
        return (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    return _dump_like(files[TOKENIZER_CONFIG], config, was_sorted)


def _added_token(token: str, special: bool = True) -> dict[str, Any]:
    """An ``added_tokens_decoder`` entry, keys in the order transformers writes them."""
    return {"content": token, "lstrip": False, "normalized": not special, "rstrip": False,
            "single_word": False, "special": special}


def _legacy_added_tokens(docs: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``added_tokens.json`` as the ``added_tokens_decoder`` transformers would build from it:
    special when a special-token entry of the config or the special tokens map names it."""
    named = set()
    for source in (config, docs.get(SPECIAL_TOKENS_MAP, {})):
        for key, value in source.items():
            if key.endswith("_token") or key in _SPECIAL_LISTS:
                for item in value if isinstance(value, list) else [value]:
                    named.add(item.get("content") if isinstance(item, dict) else item)
    legacy = docs.get(ADDED_TOKENS, {})
    return {str(token_id): _added_token(token, special=token in named)
            for token, token_id in sorted(legacy.items(), key=lambda item: item[1])}


def _extend_special_lists(doc: dict[str, Any], tokens: list[str]) -> bool:
    """Append ``tokens`` to the lists of additional special tokens ``doc`` has; a dict
    ``extra_special_tokens`` (transformers 4's named extras) is left alone."""
    changed = False
    for key in _SPECIAL_LISTS:
        entries = doc.get(key)
        if not isinstance(entries, list):
            continue
        # an entry like the last one: a string, or an AddedToken dict with the same keys
        # (transformers 5 adds ``special=True`` itself and rejects a second one)
        template = entries[-1] if entries and isinstance(entries[-1], dict) else None
        for token in tokens:
            fields = _added_token(token)
            entries.append(token if template is None else
                           {key: fields.get(key, value) for key, value in template.items()})
        changed = True
    return changed


# --- reading -------------------------------------------------------------------------------


@dataclass
class _Ids:
    """Every token the files name: token -> (id, file), id -> (token, file), and the length
    (largest id + 1) with the file that sets it."""

    by_token: dict[str, tuple[int, str]] = field(default_factory=dict)
    by_id: dict[int, tuple[str, str]] = field(default_factory=dict)
    length: int | None = None
    length_file: str = ""

    def add(self, token: str | bytes, token_id: int, where: str) -> None:
        if isinstance(token, str):
            self.by_token.setdefault(token, (token_id, where))
        self.by_id.setdefault(token_id, (token if isinstance(token, str) else repr(token), where))
        if self.length is None or token_id >= self.length:
            self.length, self.length_file = token_id + 1, where


@dataclass
class _Read:
    docs: dict[str, Any]
    sorted_keys: dict[str, bool]
    ids: _Ids


def _read(files: Mapping[str, bytes]) -> _Read:
    docs: dict[str, Any] = {}
    for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, ADDED_TOKENS, VOCAB_JSON):
        if name in files:
            docs[name] = _load_json(name, files[name])
    vocab = _Ids()
    for name, token, token_id in _vocabulary(files, docs):
        vocab.add(token, token_id, name)
    if vocab.length is not None:  # added ids only count beside a vocabulary
        for name, token, token_id in _added_ids(docs):
            vocab.add(token, token_id, name)
    # before any edit: whether a file we may rewrite was written with sorted keys
    sorted_keys = {name: _keys_sorted(docs[name]) for name in _EDITED if name in docs}
    return _Read(docs, sorted_keys, vocab)


def _vocabulary(files: Mapping[str, bytes], docs: dict[str, Any]
                ) -> Iterator[tuple[str, str | bytes, int]]:
    if TOKENIZER_JSON in docs:
        model = docs[TOKENIZER_JSON].get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            for token, token_id in vocab.items():
                yield TOKENIZER_JSON, token, _token_id(TOKENIZER_JSON, token, token_id)
        elif isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
            for token_id, entry in enumerate(vocab):
                if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
                    raise ConfigError(f"{TOKENIZER_JSON}: vocab entry {token_id} is {entry!r}, "
                                      "not [piece, score]")
                yield TOKENIZER_JSON, entry[0], token_id
        else:
            raise ConfigError(f"{TOKENIZER_JSON}: 'model' has no 'vocab' dict or list")
    if VOCAB_JSON in docs:
        for token, token_id in docs[VOCAB_JSON].items():
            yield VOCAB_JSON, token, _token_id(VOCAB_JSON, token, token_id)
    if VOCAB_TXT in files:
        text = _text(VOCAB_TXT, files[VOCAB_TXT])
        for token_id, token in enumerate(text.split("\n")[:-1] if text.endswith("\n")
                                         else text.split("\n")):
            yield VOCAB_TXT, token, token_id
    for name in dict.fromkeys((*TIKTOKEN_FILES, *SENTENCEPIECE_FILES)):
        if name in files:
            pieces = _tiktoken_ranks(files[name]) or _sentencepiece_pieces(files[name]) or {}
            for token, token_id in pieces.items():
                yield name, token, token_id


def _added_ids(docs: dict[str, Any]) -> Iterator[tuple[str, str, int]]:
    if TOKENIZER_JSON in docs:
        entries = docs[TOKENIZER_JSON].get("added_tokens", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{TOKENIZER_JSON}: 'added_tokens' is not a list")
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)):
                raise ConfigError(f"{TOKENIZER_JSON}: added token {entry!r} has no 'content'")
            yield TOKENIZER_JSON, entry["content"], _token_id(TOKENIZER_JSON, entry["content"],
                                                              entry.get("id"))
    decoder = docs.get(TOKENIZER_CONFIG, {}).get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise ConfigError(f"{TOKENIZER_CONFIG}: 'added_tokens_decoder' is not an object")
        for key, entry in decoder.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if not isinstance(content, str) or not key.isdigit():
                raise ConfigError(f"{TOKENIZER_CONFIG}: added_tokens_decoder entry {key!r}: "
                                  f"{entry!r} is not {{'content': ...}} under a numeric id")
            yield TOKENIZER_CONFIG, content, int(key)
    for token, token_id in docs.get(ADDED_TOKENS, {}).items():
        yield ADDED_TOKENS, token, _token_id(ADDED_TOKENS, token, token_id)


def _token_id(name: str, token: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}: {token!r} has id {value!r}, not a non-negative int")
    return value


def _text(name: str, content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not UTF-8 text") from None


def _load_json(name: str, content: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(_text(name, content), object_pairs_hook=reject_duplicate_keys)
    except DuplicateKeyError as error:
        raise ConfigError(f"{name}: names {error.args[0]!r} twice") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{name}: not valid JSON: {error.msg} at line {error.lineno} "
                          f"column {error.colno}") from None
    except RecursionError:
        raise ConfigError(f"{name}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{name}: holds a JSON {type(doc).__name__}, not an object")
    return doc


def _keys_sorted(value: Any) -> bool:
    """Whether every object in ``value`` lists its keys sorted (as ``json.dumps(sort_keys=True)``
    writes them)."""
    if isinstance(value, dict):
        keys = list(value)
        return keys == sorted(keys) and all(_keys_sorted(item) for item in value.values())
    if isinstance(value, list):
        return all(_keys_sorted(item) for item in value)
    return True


def _dump_like(original: bytes, doc: dict[str, Any], sort_keys: bool) -> bytes:
    """``doc`` serialised the way ``original`` was: its indent (or compact on one line),
    sorted keys if ``original`` had them everywhere, its trailing newline."""
    text = original.decode("utf-8")
    lines = text.strip().split("\n")
    indent: str | None = None
    if len(lines) > 1:
        second = lines[1]
        indent = second[: len(second) - len(second.lstrip())] or None
    separators = (",", ": ") if indent is not None else (",", ":")
    out = json.dumps(doc, indent=indent, separators=separators, ensure_ascii=False,
                     sort_keys=sort_keys)
    return (out + "\n" * text.endswith("\n")).encode("utf-8")


def _tiktoken_ranks(content: bytes) -> dict[str | bytes, int] | None:
    """A tiktoken BPE file (``base64-token rank`` per line) as token -> rank; a token is text
    where its bytes are UTF-8, else bytes."""
    ranks = {}
    try:  # UnicodeDecodeError and binascii.Error are ValueErrors
        for line in content.decode("ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError:
        return None
    if not ranks:
        return None
    return {_utf8_or_bytes(token): rank for token, rank in ranks.items()}


def _utf8_or_bytes(token: bytes) -> str | bytes:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return token


def _sentencepiece_pieces(content: bytes) -> dict[str | bytes, int] | None:
    """A sentencepiece ``ModelProto`` as piece -> id, read from the protobuf wire format: the
    pieces are field 1 (repeated ``SentencePiece``), each with its text as field 1."""
    pieces: dict[str | bytes, int] = {}
    count = 0
    try:
        for number, value in _protobuf_fields(memoryview(content)):
            if number == 1:
                if not isinstance(value, memoryview):
                    return None
                text = next((v for n, v in _protobuf_fields(value) if n == 1), None)
                if not isinstance(text, memoryview):
                    return None
                pieces.setdefault(_utf8_or_bytes(bytes(text)), count)
                count += 1
    except ValueError:
        return None
    return pieces or None


def _protobuf_fields(data: memoryview) -> Iterator[tuple[int, Any]]:
    """``(field number, value)`` of each field of a protobuf message: an int for a varint,
    a memoryview otherwise. Raises ValueError on bytes that are not a message."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type in (1, 5):
            end = position + (8 if wire_type == 1 else 4)
            value, position = data[position:end], end
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position:position + length], position + length
        else:
            raise ValueError(f"wire type {wire_type}")
        if position > len(data) or number == 0:
            raise ValueError("truncated")
        yield number, value


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
    raise ValueError("varint too long")
