"""A tied decoder whose checkpoint also stores its output projection (some exports write
``lm_head.weight`` beside ``tie_word_embeddings: true``).

The native layout holds no output projection for a tied model, so the stored one is compared
with the embedding table, bitwise, wherever a model is built or written from the checkpoint:

- equal: the model is the tied one; a record says the source stored the head, and the way
  back to transformers' layout (``convert --to hf``, ``unfuse``) writes it again as a copy of
  the table, so the input's keys and bytes come back;
- different: transformers 5.25 then leaves the two untied and computes with both (it warns
  and says to set ``tie_word_embeddings`` to false), so the checkpoint is read as the untied
  decoder transformers builds, with a note; nothing is dropped.

Detection stays metadata-only; this is the one place that reads the two tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fusesurgery.convert.detect import DetectedModel
from fusesurgery.convert.keymaps import from_native_key, keys_to_native
from fusesurgery.convert.plan import TIED_OUTPUT_REASON, ConversionPlan
from fusesurgery.errors import ConfigError

# Where the record lives: a top-level field of a native config.json, a field of the decoder's
# record in fusion_config.json's ``sources``. Its value is the hf layout's name of the head.
TIED_OUTPUT_FIELD = "tied_output_copy"
OUTPUT_KEY, EMBEDDING_KEY = "output.weight", "tok_embeddings.weight"
EQUAL_REASON = (f"{TIED_OUTPUT_REASON}; this stored copy equals it bit for bit and is written "
                "back as a copy of it in the hf layout")


def resolve_stored_output(source: Any, detected: DetectedModel
                          ) -> tuple[DetectedModel, str | None]:
    """Compare a tied decoder's stored output projection with its embedding table.

    Args:
        source: the open checkpoint (``infos``, ``get_tensor``).
        detected: what ``detect_model`` made of it.

    Returns:
        ``(detected, the head's source name)`` when the head equals the table (the tied
        model; the head to write back); ``(detected untied, None)`` when it differs;
        ``(detected, None)`` when there is nothing to compare (untied, no stored head, a
        vision tower or fused checkpoint).
    """
    config = detected.config
    if detected.kind != "decoder" or not getattr(config, "tie_word_embeddings", False):
        return detected, None
    names = {native: key for key, native in
             keys_to_native(source.infos(), detected.layout, "decoder").mapping.items()}
    if OUTPUT_KEY not in names or EMBEDDING_KEY not in names:
        return detected, None
    head, table_key = names[OUTPUT_KEY], names[EMBEDDING_KEY]
    what = _difference(source.get_tensor(head), source.get_tensor(table_key))
    if what is None:
        return detected, head
    note = (f"{head} differs from {table_key} ({what}) although the config says "
            "tie_word_embeddings: true: transformers then leaves them untied and computes "
            "with both, so this is read as the untied decoder")
    return dataclasses.replace(
        detected, config=config.replace(tie_word_embeddings=False),
        provenance={**detected.provenance, "tie_word_embeddings": "inferred"},
        notes=(*(n for n in detected.notes if not n.startswith(f"{head} is present although")),
               note),
        differences=(*detected.differences, note)), None


def _difference(stored: Any, table: Any) -> str | None:
    """None when the two tensors are the same bytes; else how they differ."""
    import torch  # noqa: PLC0415 - fuse copies files before torch is loaded

    if tuple(stored.shape) != tuple(table.shape) or stored.dtype != table.dtype:
        return (f"{list(stored.shape)} {str(stored.dtype).removeprefix('torch.')} against "
                f"{list(table.shape)} {str(table.dtype).removeprefix('torch.')}")
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        stored.dtype.itemsize]
    # bytes, not values: -0.0 and 0.0 differ, a NaN equals the same NaN
    if bool((stored.contiguous().view(bits) == table.contiguous().view(bits)).all()):
        return None
    count = int((stored.contiguous().view(bits) != table.contiguous().view(bits)).sum())
    return (f"{count} of {stored.numel()} values; max |diff| "
            f"{(stored.float() - table.float()).abs().max().item():g}")


def with_equal_reason(plan: ConversionPlan, head: str | None) -> ConversionPlan:
    """``plan`` with the stored head's drop reason saying it equals the table and comes back."""
    if head is None:
        return plan
    return dataclasses.replace(plan, dropped=tuple(
        (key, EQUAL_REASON if key == head else reason) for key, reason in plan.dropped))


def recorded_output_copy(record: Mapping[str, Any], tied: bool, origin: str) -> str | None:
    """The head's name a record (a native config.json, a fused source record) says to write
    back as a copy of the embedding table, checked; None when it says nothing.

    Raises:
        ConfigError: a record for an untied decoder, or a name other than the hf layout's.
    """
    value = record.get(TIED_OUTPUT_FIELD)
    if value is None:
        return None
    expected = hf_output_key()
    if not tied or value != expected:
        raise ConfigError(f"{origin}: {TIED_OUTPUT_FIELD} {value!r} does not fit the decoder "
                          f"(it names a tied decoder's stored head, {expected!r})")
    return value


def hf_output_key() -> str:
    """The hf layout's name of the head: what a record holds."""
    return from_native_key(OUTPUT_KEY, "hf")


def with_output_copy(plan: ConversionPlan, head: str) -> ConversionPlan:
    """``plan`` (to the hf layout) plus ``head`` written as a copy of the embedding table's
    entry, no longer among the dropped keys."""
    table = plan.entry(from_native_key(EMBEDDING_KEY, "hf"))
    return dataclasses.replace(
        plan, entries=(*plan.entries, dataclasses.replace(table, target_key=head)),
        dropped=tuple(item for item in plan.dropped if item[0] != head))


__all__ = ["EQUAL_REASON", "TIED_OUTPUT_FIELD", "hf_output_key", "recorded_output_copy",
           "resolve_stored_output", "with_equal_reason", "with_output_copy"]
