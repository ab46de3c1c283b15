"""Compare two checkpoints: which keys, shapes and dtypes differ, and optionally their values.

:func:`diff_checkpoints` answers "what changed between A and B?" for any pair of checkpoints
``open_checkpoint`` reads. By default both sides are compared in ONE layout, the native one:
each side's keys are renamed with the convert layer's key maps for its detected kind and
layout, so a Hugging Face decoder, the same weights saved natively, a Meta
``consolidated.00.pth`` and the decoder inside a fused checkpoint all line up.

Alignment across kinds. When the two sides are of different kinds, each side's native names
are placed where a fused checkpoint keeps them: a plain decoder's keys under ``decoder.``, a
vision tower's under ``encoder.vision.`` (fusesurgery's fused layout), a fused checkpoint's
as they are. So an HF Llama against a model fused from it differs by exactly the fusion keys
(``decoder.layers.{f}.fusion_layer.*``, ``decoder.tok_embeddings.fusion_embedding.weight``) and
the encoder keys (``encoder.*``), all only in the fused side. A decoder against a vision tower
shares no names at all, which is the honest answer. Two sides of the same kind keep plain
native names.

Keys the key maps drop on purpose (RoPE ``inv_freq`` buffers, a CLIP checkpoint's text tower)
are listed with the reason and are not differences. Keys no key map knows are compared under
their stored names and listed as unmapped. ``raw=True`` compares the names as stored.

The key-level diff reads checkpoint headers only. The value diff (``values=True``) streams:
one tensor pair at a time, memory-mapped, compared in slices of about ``chunk_bytes`` each
(after upcasting) so even a 4 GB embedding table costs a few slices of memory. Values are
compared in the native layout too: where one side is Hugging Face and the other is not, the
HF q/k projections get the conversion plan's RoPE transform, one block of whole heads at a time
(a permutation for Llama and Mistral; none for Qwen2, whose native layout keeps Hugging Face's
rotate-half rows and biases). That permutation needs the head counts, resolved by
``detect_model`` from the HF side's config (else the other side's, else ``overrides``). Two
HF sides are compared as stored: a row permutation applied to both changes no difference.

Peak memory of a value diff: about ``3.5 * chunk_bytes`` (two upcast slices, their difference
and a mask; equal slices of one dtype are compared without any copy) plus one permuted block of
heads, whatever the checkpoint size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusesurgery.convert import (
    detect_layout,
    detect_model,
    layout_tensor_infos,
    plan_conversion,
    to_native_key,
)
from fusesurgery.convert.keymaps import (
    FUSED_DECODER_PREFIX,
    FUSED_VISION_PREFIX,
    LAYER,
    dropped_reason,
    hf_decoder_family_of,
    keys_to_native,
    split_layer_index,
    to_native_parts,
)
from fusesurgery.convert.plan import stacked_row_ranges
from fusesurgery.convert.transforms import IDENTITY, TAKE_ROWS, Transform, apply_transform
from fusesurgery.errors import (
    ConfigError,
    FuseSurgeryError,
    KeyMapError,
    ShapeError,
    UnrecognizedFormatError,
)
from fusesurgery.families import DECODER_FAMILIES
from fusesurgery.io import CheckpointSource, TensorInfo, open_checkpoint
from fusesurgery.reports.formatting import format_bytes, format_index_set

if TYPE_CHECKING:
    import torch

MODE_NORMALISED = "normalised"
MODE_RAW = "raw"
DEFAULT_CHUNK_BYTES = 64 * 2**20
WORST_KEYS_SHOWN = 10
MAX_BRACED_LEAVES = 4  # more leaves under one parent read as "parent.* (N keys)"

# Where a model of each kind sits inside a fused checkpoint (see the module docstring).
# Up to this many bytes a side, diff compares values unless told otherwise.
AUTO_VALUES_LIMIT = 10**9  # 1 GB, in the decimal units every size is printed in
HF_ROWS = ("hf", "mllama")  # layouts in transformers' rotate-half q/k row order
PREFIX_IN_FUSED: dict[str, str] = {
    "decoder": FUSED_DECODER_PREFIX,
    "vision": FUSED_VISION_PREFIX,
    "fused": "",
}

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Report.


@dataclass(frozen=True)
class CheckpointSide:
    """One side of a diff, as opened.

    Args:
        path: the path given.
        format: ``open_checkpoint``'s format name (``safetensors``, ``meta``, ...).
        kind: ``decoder``, ``vision`` or ``fused``; None when the keys match no known layout
            (possible in raw mode only).
        layout: ``native``, ``hf`` or ``meta``; None as for ``kind``.
        num_tensors: tensors stored.
        total_bytes: bytes of tensor data stored.
        key_prefix: what was put before each native name to align it with the other side
            (``decoder.`` / ``encoder.vision.``), empty when nothing was.
    """

    path: str
    format: str
    kind: str | None
    layout: str | None
    num_tensors: int
    total_bytes: int
    key_prefix: str = ""

    def describe(self) -> str:
        what = f"{self.layout} {self.kind}" if self.kind else "unrecognised layout"
        return (f"{self.path} ({what}, {self.format}, {self.num_tensors} tensors, "
                f"{format_bytes(self.total_bytes)})")


@dataclass(frozen=True)
class ShapeChange:
    key: str
    shape_a: Shape
    shape_b: Shape


@dataclass(frozen=True)
class DtypeChange:
    key: str
    dtype_a: str
    dtype_b: str


@dataclass(frozen=True)
class TensorComparison:
    """How two same-shaped tensors differ.

    Args:
        numel: elements compared.
        num_different: elements whose absolute difference exceeds the tolerance (NaN against
            a number counts; NaN against NaN does not).
        max_abs_diff: the largest absolute difference over all elements; ``inf`` where a NaN
            meets a number or infinities of opposite sign meet.
    """

    numel: int
    num_different: int
    max_abs_diff: float

    @property
    def equal(self) -> bool:
        return self.num_different == 0


@dataclass(frozen=True)
class ValueChange:
    """A key whose values differ (same shape on both sides).

    Args:
        key: the compared name.
        max_abs_diff: the largest absolute difference.
        num_different: elements beyond the tolerance.
        numel: elements compared.
    """

    key: str
    max_abs_diff: float
    num_different: int
    numel: int


@dataclass(frozen=True)
class DiffReport:
    """What differs between checkpoints A and B.

    Args:
        a: side A.
        b: side B.
        mode: ``"normalised"`` (native names, aligned across kinds) or ``"raw"`` (as stored).
            The names in ``only_in_*`` and in the changes are the compared ones; what each file
            calls them is in ``stored_keys_a`` / ``stored_keys_b`` (:meth:`key_a`,
            :meth:`key_b`), and the summary and ``to_dict`` show those.
        only_in_a: compared names held by A alone, in A's order.
        only_in_b: compared names held by B alone, in B's order.
        shape_changes: names in both whose shapes differ.
        dtype_changes: names in both whose dtypes differ.
        num_common: names in both.
        dropped_a: A's stored keys dropped on purpose by the key maps, with the reason.
        dropped_b: likewise for B.
        unmapped_a: A's stored keys no key map knows (compared under their stored names).
        unmapped_b: likewise for B.
        values_compared: whether values were compared.
        num_values_compared: names whose values were compared (in both, same shape).
        value_changes: names whose values differ beyond ``atol``, largest difference first.
        atol: the tolerance on absolute differences.
        stored_keys_a: every compared name of A -> the key as A's file spells it
            (``layers.1.mlp.w3.weight`` -> ``model.layers.1.mlp.up_proj.weight``).
        stored_keys_b: likewise for B.
        values_skipped: why values were not compared (empty when they were).
    """

    a: CheckpointSide
    b: CheckpointSide
    mode: str
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    shape_changes: tuple[ShapeChange, ...]
    dtype_changes: tuple[DtypeChange, ...]
    num_common: int
    dropped_a: Mapping[str, str]
    dropped_b: Mapping[str, str]
    unmapped_a: tuple[str, ...] = ()
    unmapped_b: tuple[str, ...] = ()
    values_compared: bool = False
    num_values_compared: int = 0
    value_changes: tuple[ValueChange, ...] = ()
    atol: float = 0.0
    stored_keys_a: Mapping[str, str] = field(default_factory=dict)
    stored_keys_b: Mapping[str, str] = field(default_factory=dict)
    values_skipped: str = ""

    def key_a(self, name: str) -> str:
        """The compared ``name`` as A's file spells it."""
        return self.stored_keys_a.get(name, name)

    def key_b(self, name: str) -> str:
        """The compared ``name`` as B's file spells it."""
        return self.stored_keys_b.get(name, name)

    def _pair_dict(self, name: str) -> dict[str, str]:
        return {"key_a": self.key_a(name), "key_b": self.key_b(name), "normalised_key": name}

    @property
    def keys_identical(self) -> bool:
        """Same names, shapes and dtypes (values not considered)."""
        return not (self.only_in_a or self.only_in_b or self.shape_changes or self.dtype_changes)

    @property
    def identical(self) -> bool:
        """Same names, shapes, dtypes and, when compared, values."""
        return self.keys_identical and not self.value_changes

    @property
    def num_values_equal(self) -> int:
        return self.num_values_compared - len(self.value_changes)

    def worst(self, count: int = WORST_KEYS_SHOWN) -> tuple[ValueChange, ...]:
        """The ``count`` keys with the largest absolute difference."""
        return self.value_changes[:count]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite differences become the strings ``"inf"``/``"nan"``).

        Every tensor is named as stored: ``"key"`` in ``only_in_a`` / ``only_in_b``,
        ``"key_a"`` and ``"key_b"`` in the changes; ``"normalised_key"`` beside them is the
        name the two sides were compared under (the stored name in raw mode).
        """
        return {
            "identical": self.identical,
            "keys_identical": self.keys_identical,
            "mode": self.mode,
            "a": _side_dict(self.a),
            "b": _side_dict(self.b),
            "num_common": self.num_common,
            "only_in_a": [{"key": self.key_a(name), "normalised_key": name}
                          for name in self.only_in_a],
            "only_in_b": [{"key": self.key_b(name), "normalised_key": name}
                          for name in self.only_in_b],
            "shape_changes": [
                {**self._pair_dict(c.key), "shape_a": list(c.shape_a),
                 "shape_b": list(c.shape_b)}
                for c in self.shape_changes
            ],
            "dtype_changes": [
                {**self._pair_dict(c.key), "dtype_a": c.dtype_a, "dtype_b": c.dtype_b}
                for c in self.dtype_changes
            ],
            "dropped_a": dict(self.dropped_a),
            "dropped_b": dict(self.dropped_b),
            "unmapped_a": list(self.unmapped_a),
            "unmapped_b": list(self.unmapped_b),
            "values_compared": self.values_compared,
            "values_skipped": self.values_skipped or None,
            "num_values_compared": self.num_values_compared,
            "num_values_equal": self.num_values_equal,
            "num_values_different": len(self.value_changes),
            "atol": self.atol,
            "value_changes": [
                {**self._pair_dict(c.key), "max_abs_diff": _json_float(c.max_abs_diff),
                 "num_different": c.num_different, "numel": c.numel}
                for c in self.value_changes
            ],
        }

    def summary(self, max_lines: int = 12) -> str:
        """A short human report; long key lists are collapsed (``layers.{0..31}.*``).

        Keys are named as each file stores them; a tensor the two files spell differently
        reads ``A's key (B: B's key)``.

        Raises:
            FuseSurgeryError: ``max_lines`` is below 1.
        """
        if max_lines < 1:
            raise FuseSurgeryError(f"max_lines must be at least 1, got {max_lines}")
        lines = [f"A: {self.a.describe()}", f"B: {self.b.describe()}"]
        if self.mode == MODE_RAW:
            aligned = [f"{side}'s under {s.key_prefix}" for side, s in (("A", self.a),
                                                                         ("B", self.b))
                       if s.key_prefix]
            lines.append("names compared as stored (raw)"
                         + (f", {', '.join(aligned)}" if aligned else ""))
        else:
            aligned = [f"{side} under {s.key_prefix}" for side, s in (("A", self.a), ("B", self.b))
                       if s.key_prefix]
            lines.append("names compared in the native layout"
                         + (f" ({', '.join(aligned)})" if aligned else "")
                         + "; shown as each file stores them")
        for title, names, stored in (("only in A", self.only_in_a, self.key_a),
                                     ("only in B", self.only_in_b, self.key_b)):
            if names:
                lines.append(f"{title} ({len(names)}):")
                lines.extend("  " + line for line in collapse_key_names(
                    [stored(name) for name in names], max_lines))
        if self.shape_changes:
            lines.append(f"shape changes ({len(self.shape_changes)}):")
            lines.extend(_grouped_changes(
                [(self.key_a(c.key), self.key_b(c.key), f"{list(c.shape_a)} -> {list(c.shape_b)}")
                 for c in self.shape_changes],
                self.num_common, max_lines))
        if self.dtype_changes:
            lines.append(f"dtype changes ({len(self.dtype_changes)}):")
            lines.extend(_grouped_changes(
                [(self.key_a(c.key), self.key_b(c.key), f"{c.dtype_a} -> {c.dtype_b}")
                 for c in self.dtype_changes],
                self.num_common, max_lines))
        for side, dropped in (("A", self.dropped_a), ("B", self.dropped_b)):
            for reason, count in Counter(dropped.values()).items():
                lines.append(f"{side}: {count} keys dropped on purpose ({reason})")
        for side, unmapped in (("A", self.unmapped_a), ("B", self.unmapped_b)):
            if unmapped:
                lines.append(f"{side}: {len(unmapped)} keys unknown to the key maps, compared "
                             "as stored")
        if self.values_compared:
            tolerance = f", atol {self.atol:g}" if self.atol else ""
            lines.append(f"values: {self.num_values_equal} equal, {len(self.value_changes)} "
                         f"different of {self.num_values_compared} compared{tolerance}")
            for change in self.worst(max_lines):
                label = pair_label(self.key_a(change.key), self.key_b(change.key))
                lines.append(f"  {label}: max |a-b| {change.max_abs_diff:.6g} "
                             f"({change.num_different} of {change.numel} elements)")
            hidden = len(self.value_changes) - max_lines
            if hidden > 0:
                lines.append(f"  ... and {hidden} more keys")
        if self.identical and not self.values_compared:
            lines.append("same keys, shapes and dtypes; values not compared ("
                         f"{self.values_skipped or 'use --values'})")
        else:
            lines.append("identical" if self.identical else "different")
        return "\n".join(lines)


def _side_dict(side: CheckpointSide) -> dict[str, Any]:
    return {
        "path": side.path, "format": side.format, "kind": side.kind, "layout": side.layout,
        "num_tensors": side.num_tensors, "total_bytes": side.total_bytes,
        "key_prefix": side.key_prefix,
    }


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


# --------------------------------------------------------------------------------------------
# Collapsing long key lists for people.


def _common_dotted_prefix(names: Sequence[str]) -> str:
    parts = [name.split(".") for name in names]
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    # Never swallow a whole name: a prefix is only what comes before the last component.
    shortest = min(len(p) for p in parts)
    return ".".join(common[: shortest - 1]) + "." if common[: shortest - 1] else ""


def _collapsed_groups(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(line, the keys it stands for)`` in first-seen order."""
    members_of: dict[str, list[tuple[int, str]]] = {}
    for key in keys:
        template, index = split_layer_index(key)
        if index is not None and str(int(index)) != index:
            template, index = key, None  # "01" would not survive the round trip through int
        members_of.setdefault(template, []).append((-1 if index is None else int(index), key))
    # Layer templates sharing the part before the index and the layer set form one block;
    # keys without a layer index sharing a parent form one block of leaves.
    blocks: dict[tuple[str, tuple[int, ...]], list[tuple[str, list[str]]]] = {}
    for template, members in members_of.items():
        indices = [index for index, _ in members]
        stored = [key for _, key in members]
        if LAYER in template:
            head, _, tail = template.partition(LAYER)
            block = (head, tuple(sorted(set(indices))))
            blocks.setdefault(block, []).append((tail.removeprefix("."), stored))
        else:
            parent, dot, leaf = template.rpartition(".")
            if not parent:  # top-level names are not worth a brace group
                parent, leaf = template, ""
            blocks.setdefault((parent + dot, ()), []).append((leaf, stored))
    groups: list[tuple[str, list[str]]] = []
    for (head, indices), entries in blocks.items():
        tails = [tail for tail, _ in entries]
        members = [key for _, stored in entries for key in stored]
        if not indices:
            if len(tails) == 1:
                line = head + tails[0]
            elif len(tails) <= MAX_BRACED_LEAVES:
                line = head + "{" + ",".join(tails) + "}"
            else:
                line = f"{head}* ({len(tails)} keys)"
            groups.append((line, members))
            continue
        layers = str(indices[0]) if len(indices) == 1 else format_index_set(indices, max_items=6)
        if len(tails) == 1:
            groups.append((f"{head}{layers}.{tails[0]}", members))
        else:
            each = " each" if len(indices) > 1 else ""
            groups.append((f"{head}{layers}.{_common_dotted_prefix(tails)}* "
                           f"({len(tails)} keys{each})", members))
    return groups


def _fit_lines(groups: Sequence[tuple[str, Sequence[str]]], max_lines: int) -> list[str]:
    if len(groups) <= max_lines:
        return [line for line, _ in groups]
    shown = groups[: max(max_lines - 1, 0)]
    hidden = sum(len(members) for _, members in groups[len(shown):])
    return [line for line, _ in shown] + [f"... and {hidden} more keys"]


def collapse_key_names(keys: Sequence[str], max_lines: int = 12) -> list[str]:
    """Lines that stand for ``keys``: layer-indexed keys grouped, at most ``max_lines``.

    ``decoder.layers.3.fusion_layer.ca_norm.scale`` ... ``decoder.layers.31.fusion_layer.*``
    (13 keys each in layers 3, 7, ..., 31) becomes one line
    ``decoder.layers.{3,7,11,15,...,31}.fusion_layer.* (13 keys each)``; consecutive layers
    read ``{0..31}``; ``ln_post.weight`` and ``ln_post.bias`` read ``ln_post.{weight,bias}``.
    What does not fit ends in ``... and N more keys``.
    """
    if not keys:
        return []
    return _fit_lines(_collapsed_groups(keys), max_lines)


def _layer_order(key: str) -> tuple[str, int]:
    template, index = split_layer_index(key)
    return template, -1 if index is None else int(index)


def pair_label(key_a: str, key_b: str) -> str:
    """How a tensor both sides hold is named for people: once when both files spell it the
    same, else as A stores it followed by B's spelling, ``model.norm.weight (B: norm.scale)``.
    """
    return key_a if key_a == key_b else f"{key_a} (B: {key_b})"


def collapse_key_pairs(pairs: Sequence[tuple[str, str]], max_lines: int = 12) -> list[str]:
    """Like :func:`collapse_key_names` for tensors named differently by A and B.

    Each side's keys are collapsed alone; where the two collapse into groups of the same
    tensors, paired in ascending layer order, a line reads
    ``model.layers.{0..3}.mlp.up_proj.weight (B: layers.{0..3}.mlp.w3.weight)``. Where they
    do not, every pair gets its own line.

    Args:
        pairs: ``(A's stored key, B's stored key)`` of each tensor, in A's order.
        max_lines: lines shown before ``... and N more keys``.
    """
    if not pairs:
        return []
    if all(key_a == key_b for key_a, key_b in pairs):
        return collapse_key_names([key_a for key_a, _ in pairs], max_lines)
    partner = dict(pairs)
    groups_a = _collapsed_groups([key_a for key_a, _ in pairs])
    groups_b = _collapsed_groups([key_b for _, key_b in pairs])
    # A group line pairs A's and B's layers in ascending order, so that must be the pairing.
    parallel = len(groups_a) == len(groups_b) and all(
        [partner[key] for key in sorted(members_a, key=_layer_order)]
        == sorted(members_b, key=_layer_order)
        for (_, members_a), (_, members_b) in zip(groups_a, groups_b, strict=True)
    )
    if parallel:
        groups = [(pair_label(line_a, line_b), members_a)
                  for (line_a, members_a), (line_b, _) in zip(groups_a, groups_b, strict=True)]
    else:
        groups = [(pair_label(key_a, key_b), [key_a]) for key_a, key_b in pairs]
    return _fit_lines(groups, max_lines)


def _grouped_changes(
    changes: Sequence[tuple[str, str, str]], num_common: int, max_lines: int
) -> list[str]:
    """``changes``: ``(A's stored key, B's stored key, change)``."""
    by_change: dict[str, list[tuple[str, str]]] = {}
    for key_a, key_b, change in changes:
        by_change.setdefault(change, []).append((key_a, key_b))
    lines = []
    for change, pairs in by_change.items():
        if len(pairs) == num_common and num_common > 1:
            lines.append(f"  all {num_common} common keys: {change}")
            continue
        lines.extend(f"  {line}: {change}" for line in collapse_key_pairs(pairs, max_lines))
    return lines


# --------------------------------------------------------------------------------------------
# Names: each side's stored keys -> the names compared.


@dataclass(frozen=True)
class _Names:
    compared: dict[str, str]  # compared name -> stored key, in stored order
    dropped: dict[str, str]  # stored key -> reason
    unmapped: tuple[str, ...]
    # compared name -> the rows [start, stop) of its stored key it is, for a part of a stacked
    # tensor (Phi-3's qkv_proj holds q, k and v)
    rows: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def shape(self, infos: Mapping[str, TensorInfo], name: str) -> tuple[int, ...]:
        """The compared tensor's shape (a part's: its rows of the stacked one)."""
        shape = tuple(infos[self.compared[name]].shape)
        if name in self.rows:
            start, stop = self.rows[name]
            shape = (stop - start, *shape[1:])
        return shape

    def tensor(self, source: CheckpointSource, name: str) -> torch.Tensor:
        """The compared tensor (a part: a view of its rows of the stacked one)."""
        tensor = source.get_tensor(self.compared[name])
        if name in self.rows:
            start, stop = self.rows[name]
            tensor = tensor[start:stop]
        return tensor


def _detect_kind(source: CheckpointSource, *, required: bool) -> tuple[str | None, str | None]:
    try:
        return detect_layout(source.keys())
    except UnrecognizedFormatError as error:
        if not required:
            return None, None
        raise UnrecognizedFormatError(
            f"{source.path}: {error}; compare the names as stored instead (--raw)"
        ) from None


def _is_transformers_export(source: CheckpointSource) -> bool:
    from fusesurgery.hf import EXPORT_MODEL_TYPE  # noqa: PLC0415 - imports nothing

    return isinstance(source.config, dict) and source.config.get(
        "model_type") == EXPORT_MODEL_TYPE


# where a transformers export keeps each source's own names
_EXPORT_PARTS = ("language_model.", "vision_tower.")


def _export_alignment(source_a: CheckpointSource, source_b: CheckpointSource
                      ) -> tuple[str, str]:
    """The prefixes that align a transformers export with one of its sources (``diff EXPORT
    DECODER``): the source's names go under the export's part that holds most of them. Two
    exports, or neither, or no name in common: no prefix."""
    export_a, export_b = _is_transformers_export(source_a), _is_transformers_export(source_b)
    if export_a == export_b:
        return "", ""
    export, other = (source_a, source_b) if export_a else (source_b, source_a)
    stored = set(export.keys())
    counts = {part: sum(part + key in stored for key in other.keys()) for part in _EXPORT_PARTS}
    part = max(_EXPORT_PARTS, key=counts.__getitem__)
    if not counts[part]:
        return "", ""
    return ("", part) if export_a else (part, "")


def _claim(compared: dict[str, str], name: str, key: str, source: CheckpointSource) -> None:
    if name in compared:
        raise KeyMapError(
            f"{source.path}: keys {compared[name]!r} and {key!r} both compare as {name!r} (one "
            "tensor stored under two spellings); compare the names as stored instead (--raw)"
        )
    compared[name] = key


def _stacked_rows(source: CheckpointSource, other: CheckpointSource | None,
                  overrides: Mapping[str, Any] | None) -> dict[str, tuple[int, int]] | None:
    """native key -> its rows of the stacked tensor holding it (Phi-3's q/k/v in qkv_proj),
    from the checkpoint's config, else the other side's (a config-less file beside its own
    transformers directory), as the RoPE transform's head counts are; None when neither
    config resolves or fits the stacked rows."""
    for candidate in (source, other):
        if candidate is None:
            continue
        try:
            mapping = keys_to_native(source.keys(), "hf", "decoder")
            config = detect_model(candidate.infos(), candidate.config, candidate.config_file,
                                  overrides).config
            return stacked_row_ranges(mapping, source.infos(), config)
        except (ConfigError, KeyMapError, UnrecognizedFormatError):
            continue
    return None


def _normalised_names(
    source: CheckpointSource, kind: str, layout: str, prefix: str,
    overrides: Mapping[str, Any] | None = None, other: CheckpointSource | None = None,
) -> _Names:
    compared: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unmapped: list[str] = []
    rows: dict[str, tuple[int, int]] = {}
    ranges: dict[str, tuple[int, int]] | None = None
    if layout == "mllama":  # its layer numbers need the whole key set
        mapping = keys_to_native(source.keys(), layout, kind)
        for key, native in mapping.mapping.items():
            _claim(compared, prefix + native, key, source)
        return _Names(compared, dict(mapping.dropped), ())
    # a family with transformers names of its own (Gemma) is told by its whole key set
    family = hf_decoder_family_of(source.keys()) if (kind, layout) == ("decoder", "hf") else None
    for key in source.keys():
        parts = to_native_parts(key, layout, kind)
        if parts is not None:
            # a stacked tensor: each part compares as its native name, its rows of the
            # tensor (which the config gives); without a config, as stored
            ranges = _stacked_rows(source, other, overrides) if ranges is None else ranges
            if ranges is None or any(part not in ranges for part in parts):
                unmapped.append(key)
                continue
            for part in parts:
                _claim(compared, prefix + part, key, source)
                rows[prefix + part] = ranges[part]
            continue
        try:
            native = to_native_key(key, layout, kind, family)
        except KeyMapError:
            unmapped.append(key)
            continue
        if native is None:
            dropped[key] = dropped_reason(key, layout, kind) or "dropped by the key map"
        else:
            _claim(compared, prefix + native, key, source)
    # Unknown keys keep their stored names, so an extra tensor shows up as "only in".
    for key in unmapped:
        _claim(compared, key, key, source)
    return _Names(compared, dropped, tuple(unmapped), rows)


def _alignment_prefix(kind: str, other_kind: str) -> str:
    return "" if kind == other_kind else PREFIX_IN_FUSED[kind]


# --------------------------------------------------------------------------------------------
# Values.


def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both sides are compared in: wide enough to hold either exactly."""
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    if a.is_complex or b.is_complex:
        raise FuseSurgeryError(f"complex tensors ({a}, {b}) are not compared")
    if a.is_floating_point or b.is_floating_point:
        if torch.float64 in (a, b) or not (a.is_floating_point and b.is_floating_point):
            return torch.float64  # int64 values need float64's mantissa too
        return torch.float32  # holds f16, bf16 and f8 exactly
    return torch.int64


def _row_blocks(rows: int, row_numel: int, itemsize: int, align: int,
                chunk_bytes: int) -> Iterator[tuple[int, int]]:
    per_chunk = max(chunk_bytes // max(row_numel * itemsize, 1), 1)
    per_chunk = max(per_chunk // align, 1) * align
    for start in range(0, rows, per_chunk):
        yield start, min(start + per_chunk, rows)


def _block(tensor: torch.Tensor, transform: Transform | None, start: int, stop: int,
           head_dim: int) -> torch.Tensor:
    block = tensor[start:stop]
    if transform is None or transform[0] == IDENTITY:
        return block
    # The RoPE permutation acts within each head, so a block of whole heads converts alone.
    name, _num_heads, _head_dim = transform
    return apply_transform((name, (stop - start) // head_dim, head_dim), block)


def compare_tensors(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    transform_a: Transform | None = None,
    transform_b: Transform | None = None,
    atol: float = 0.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> TensorComparison:
    """Compare two same-shaped tensors slice by slice, after converting each to one layout.

    Both are upcast per slice to a dtype that holds either exactly (f32 for any pair of
    16/32-bit floats, f64 when either is f64 or an integer meets a float, int64 for integers),
    so a bf16 tensor equals the f32 tensor of the same values.

    Args:
        a: ``[rows, ...]`` tensor (0-d allowed), e.g. memory-mapped from a checkpoint.
        b: a tensor of the same shape.
        transform_a: a convert-plan transform turning ``a`` into the compared layout
            (``("permute_qk_to_native", n_heads, head_dim)``), or None.
        transform_b: likewise for ``b``.
        atol: absolute differences up to this count as equal.
        chunk_bytes: size of one upcast slice; slices hold whole rows (and whole heads when
            a transform applies).

    Returns:
        Element count, elements beyond ``atol``, and the largest absolute difference.

    Raises:
        ShapeError: the shapes differ, or a transform does not fit the tensor.
    """
    import torch  # noqa: PLC0415 - imported where tensors are touched (fast start-up)

    if a.shape != b.shape:
        raise ShapeError(f"cannot compare values of shapes {list(a.shape)} and {list(b.shape)}")
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    numel = a.numel()
    if numel == 0:
        return TensorComparison(0, 0, 0.0)
    dtype = _compute_dtype(a.dtype, b.dtype)
    transforms = [t for t in (transform_a, transform_b) if t is not None and t[0] != IDENTITY]
    head_dim = transforms[0][2] if transforms else 1
    rows = a.shape[0]
    if rows % head_dim:
        raise ShapeError(f"{rows} rows are not whole heads of {head_dim}")
    worst = 0.0
    different = 0
    for start, stop in _row_blocks(rows, numel // rows, dtype.itemsize, head_dim, chunk_bytes):
        block_a = _block(a, transform_a, start, stop, head_dim)
        block_b = _block(b, transform_b, start, stop, head_dim)
        # Equal slices are the common case: one pass, no upcast copies when dtypes agree.
        if block_a.dtype == block_b.dtype and torch.equal(block_a, block_b):
            continue
        left, right = block_a.reshape(-1).to(dtype), block_b.reshape(-1).to(dtype)
        del block_a, block_b
        if torch.equal(left, right):
            continue
        # A new tensor: ``left`` may be a view of the memory-mapped checkpoint itself.
        delta = torch.sub(left, right).abs_()
        if dtype.is_floating_point and bool(delta.isnan().any()):
            # NaN meets NaN (equal), NaN meets a number or inf meets inf (inf - inf = NaN).
            same = (left == right).logical_or_(left.isnan().logical_and_(right.isnan()))
            delta.nan_to_num_(nan=math.inf).masked_fill_(same, 0)
            del same
        del left, right
        different += int((delta > atol).count_nonzero())
        worst = max(worst, float(delta.max()))
    return TensorComparison(numel, different, worst)


def _decoder_config(sources: Sequence[CheckpointSource], overrides: Mapping[str, Any] | None):
    """The decoder config of the first source it can be resolved for."""
    first_error: FuseSurgeryError | None = None
    for source in sources:
        try:
            return detect_model(source.infos(), source.config, source.config_file, overrides).config
        except (ConfigError, KeyMapError, UnrecognizedFormatError) as error:
            first_error = first_error or error
    assert first_error is not None
    raise first_error


def _rope_transforms(
    hf: CheckpointSource, other: CheckpointSource, overrides: Mapping[str, Any] | None
) -> dict[str, Transform]:
    """HF stored key -> the plan's transform to the native layout, for keys that need one."""
    if detect_layout(hf.keys())[1] == "mllama":  # planned over its own keys and config
        detected = detect_model(hf.infos(), hf.config, hf.config_file, overrides)
        plan = plan_conversion(hf.infos(), "mllama", detected.config, kind="fused")
        return {entry.source_key: entry.transform for entry in plan.entries
                if entry.transform[0] not in (IDENTITY, TAKE_ROWS)}
    try:
        config = _decoder_config([hf, other], overrides)
    except ConfigError as error:
        wrapped = ConfigError(
            f"{hf.path}: comparing its values with a non-HF checkpoint needs its RoPE q/k "
            f"permutation, hence its head counts: {error}"
        )
        wrapped.flag = error.flag
        raise wrapped from None
    # Planned over the model the config describes rather than the stored keys, so the
    # transforms are known even when the two sides differ in which keys or shapes they hold.
    model_infos = layout_tensor_infos(config, "hf", kind="decoder", dtype="F32")
    plan = plan_conversion(model_infos, "hf", config, target_layout="native", kind="decoder")
    # (a row range of a stacked tensor is cut by the names, not transformed)
    return {entry.source_key: entry.transform for entry in plan.entries
            if entry.transform[0] not in (IDENTITY, TAKE_ROWS)}


# --------------------------------------------------------------------------------------------
# The diff.


def _check_family(sides: Sequence[tuple[CheckpointSource, str | None]],
                  overrides: Mapping[str, Any] | None) -> None:
    """A decoder family the overrides name (``--family``) is checked as every command checks
    it: against the registry, and against each decoder side's config and weights, whatever
    else of the config stays unresolved (a key-level diff needs no head count).

    Raises:
        ConfigError: an unknown family, or one a decoder side's config or weights contradict.
    """
    if not overrides or overrides.get("family") is None:
        return
    name = overrides["family"]
    if name not in DECODER_FAMILIES:
        raise ConfigError(f"--family {name!r} is not a decoder family; valid: "
                          f"{', '.join(DECODER_FAMILIES)}")
    for source, kind in sides:
        if kind not in ("decoder", "fused"):
            continue
        try:
            detect_model(source.infos(), source.config, source.config_file, overrides)
        except ConfigError as error:
            if getattr(error, "field", None) == "family":
                raise


def _side(source: CheckpointSource, kind: str | None, layout: str | None,
          prefix: str) -> CheckpointSide:
    return CheckpointSide(
        path=source.display_name, format=source.format, kind=kind, layout=layout,
        num_tensors=len(source), total_bytes=source.total_bytes, key_prefix=prefix,
    )


def diff_checkpoints(
    a: str | os.PathLike[str] | CheckpointSource,
    b: str | os.PathLike[str] | CheckpointSource,
    *,
    values: bool | None = False,
    raw: bool = False,
    overrides: Mapping[str, Any] | None = None,
    atol: float = 0.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> DiffReport:
    """Compare checkpoints A and B: keys, shapes, dtypes and, if asked, values.

    Args:
        a: a checkpoint path (anything ``open_checkpoint`` reads, a Hub repo id too: a
            safetensors repo is read from its remote headers unless ``values`` is True) or an
            open source.
        b: likewise.
        values: also compare values, streamed one tensor pair at a time; None decides by size:
            values are compared when neither side holds more than
            :data:`AUTO_VALUES_LIMIT` bytes (reading them costs about what reading the files
            does, seconds at that size) and neither is a Hub repo read from its remote
            headers (its values would mean downloading it), else only keys, shapes and dtypes.
        raw: compare names as stored, with no key maps and no value transforms.
        overrides: decoder config fields (``num_heads``, ``num_kv_heads``, ``head_dim``) for
            when a value diff must permute HF q/k projections and no config states the heads;
            ``family`` names the decoder family of weights whose config names none (a
            native SmolLM3's or Phi-3's q/k rows rotate halves, a Llama's pairs), checked
            against the registry and each decoder side's config and weights.
        atol: absolute differences up to this count as equal.
        chunk_bytes: bytes of one upcast slice in the value comparison.

    Returns:
        The report; ``report.identical`` is the one-word answer.

    Raises:
        CheckpointError: a path cannot be opened or read.
        UnrecognizedFormatError: in normalised mode, a side's keys match no known layout.
        KeyMapError: two stored keys of one side compare under one name.
        ConfigError: a value diff needs head counts that no config or override gives (the
            message names the flag), or a ``family`` the registry, a config or the weights
            refuse.
        FuseSurgeryError: ``atol`` is negative or NaN, or ``chunk_bytes`` not positive.
    """
    if not atol >= 0:
        raise FuseSurgeryError(f"atol must be a number >= 0, got {atol}")
    if chunk_bytes <= 0:
        raise FuseSurgeryError(f"chunk_bytes must be positive, got {chunk_bytes}")
    # a Hub repo's headers are read remotely unless values are asked for
    remote = values is not True
    source_a = a if isinstance(a, CheckpointSource) else open_checkpoint(a, remote_headers=remote)
    try:
        source_b = b if isinstance(b, CheckpointSource) else open_checkpoint(
            b, remote_headers=remote)
        try:
            skipped = "not asked for: use --values" if values is False else ""
            if values is None:  # values of a remote repo would mean downloading it
                remote = [s for s in (source_a, source_b)
                          if s.hub is not None and s.hub.headers_only]
                largest = max(source_a.total_bytes, source_b.total_bytes)
                values = not remote and largest <= AUTO_VALUES_LIMIT
                if remote:
                    skipped = (f"{remote[0].hub.reference.given} is read from its remote "
                               "headers; --values downloads it and compares")
                elif not values:
                    skipped = (f"{format_bytes(largest)} is over the "
                               f"{format_bytes(AUTO_VALUES_LIMIT)} compared by default; use "
                               "--values")
            report = _diff(source_a, source_b, values=values, raw=raw, overrides=overrides,
                           atol=atol, chunk_bytes=chunk_bytes)
            return dataclasses.replace(report, values_skipped=skipped) if skipped else report
        finally:
            if source_b is not b:
                source_b.close()
    finally:
        if source_a is not a:
            source_a.close()


def _diff(
    source_a: CheckpointSource,
    source_b: CheckpointSource,
    *,
    values: bool,
    raw: bool,
    overrides: Mapping[str, Any] | None,
    atol: float,
    chunk_bytes: int,
) -> DiffReport:
    # a transformers export's keys are transformers' own names: compared as stored
    raw = raw or any(_is_transformers_export(s) for s in (source_a, source_b))
    kind_a, layout_a = _detect_kind(source_a, required=not raw)
    kind_b, layout_b = _detect_kind(source_b, required=not raw)
    _check_family(((source_a, kind_a), (source_b, kind_b)), overrides)
    if raw:
        prefix_a, prefix_b = _export_alignment(source_a, source_b)
        names_a = _Names({prefix_a + k: k for k in source_a.keys()}, {}, ())
        names_b = _Names({prefix_b + k: k for k in source_b.keys()}, {}, ())
    else:
        assert kind_a and layout_a and kind_b and layout_b
        prefix_a, prefix_b = _alignment_prefix(kind_a, kind_b), _alignment_prefix(kind_b, kind_a)
        names_a = _normalised_names(source_a, kind_a, layout_a, prefix_a, overrides, source_b)
        names_b = _normalised_names(source_b, kind_b, layout_b, prefix_b, overrides, source_a)

    infos_a, infos_b = source_a.infos(), source_b.infos()
    only_in_a = tuple(name for name in names_a.compared if name not in names_b.compared)
    only_in_b = tuple(name for name in names_b.compared if name not in names_a.compared)
    common = [name for name in names_a.compared if name in names_b.compared]
    shape_changes, dtype_changes, same_shape = [], [], []
    for name in common:
        info_a = infos_a[names_a.compared[name]]
        info_b = infos_b[names_b.compared[name]]
        shape_a, shape_b = names_a.shape(infos_a, name), names_b.shape(infos_b, name)
        if shape_a != shape_b:
            shape_changes.append(ShapeChange(name, shape_a, shape_b))
        else:
            same_shape.append(name)
        if info_a.dtype_code != info_b.dtype_code:  # torch-free: no tensor is touched
            dtype_changes.append(DtypeChange(name, info_a.dtype_name, info_b.dtype_name))

    value_changes: list[ValueChange] = []
    if values:
        transforms_a: dict[str, Transform] = {}
        transforms_b: dict[str, Transform] = {}
        decoders = {"decoder", "fused"}
        # HF and Mllama keep transformers' q/k row order; native and Meta interleave pairs
        if not raw and {kind_a, kind_b} <= decoders and (layout_a in HF_ROWS) != (
                layout_b in HF_ROWS):
            if layout_a in HF_ROWS:
                transforms_a = _rope_transforms(source_a, source_b, overrides)
            else:
                transforms_b = _rope_transforms(source_b, source_a, overrides)
        for name in same_shape:
            key_a, key_b = names_a.compared[name], names_b.compared[name]
            try:
                result = compare_tensors(
                    names_a.tensor(source_a, name), names_b.tensor(source_b, name),
                    transform_a=transforms_a.get(key_a), transform_b=transforms_b.get(key_b),
                    atol=atol, chunk_bytes=chunk_bytes,
                )
            except ShapeError as error:
                raise ShapeError(f"comparing {key_a} (A) with {key_b} (B): {error}") from None
            if not result.equal:
                value_changes.append(
                    ValueChange(name, result.max_abs_diff, result.num_different, result.numel)
                )
        value_changes.sort(key=lambda change: -change.max_abs_diff)

    return DiffReport(
        a=_side(source_a, kind_a, layout_a, prefix_a),
        b=_side(source_b, kind_b, layout_b, prefix_b),
        mode=MODE_RAW if raw else MODE_NORMALISED,
        only_in_a=only_in_a,
        only_in_b=only_in_b,
        shape_changes=tuple(shape_changes),
        dtype_changes=tuple(dtype_changes),
        num_common=len(common),
        dropped_a=types.MappingProxyType(names_a.dropped),
        dropped_b=types.MappingProxyType(names_b.dropped),
        unmapped_a=names_a.unmapped,
        unmapped_b=names_b.unmapped,
        values_compared=values,
        num_values_compared=len(same_shape) if values else 0,
        value_changes=tuple(value_changes),
        atol=atol,
        stored_keys_a=types.MappingProxyType(names_a.compared),
        stored_keys_b=types.MappingProxyType(names_b.compared),
    )


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MODE_NORMALISED",
    "MODE_RAW",
    "PREFIX_IN_FUSED",
    "CheckpointSide",
    "DiffReport",
    "DtypeChange",
    "ShapeChange",
    "TensorComparison",
    "ValueChange",
    "collapse_key_names",
    "collapse_key_pairs",
    "compare_tensors",
    "diff_checkpoints",
    "pair_label",
]
