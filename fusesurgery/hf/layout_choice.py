"""Which layout ``fuse`` writes when none is asked for, decided from the sources' config files.

Imports neither torch nor transformers: the command line decides before it calls the writer,
and the writer starts copying the source files while torch loads (see
``fusesurgery.write.copy_ahead``); an import of torch here would make every ``fuse`` wait for
it before its first byte is copied.
"""

from __future__ import annotations

import os

from fusesurgery.hf import EXPORT_MODEL_TYPE
from fusesurgery.io import open_checkpoint
from fusesurgery.surgery.export_layout import native_model_types

LAYOUTS: tuple[str, ...] = ("native", "transformers")


def choose_layout(encoder_path: str | os.PathLike[str],
                  decoder_path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """The layout ``fuse`` writes when none is asked for: native, unless the decoder's or the
    tower's transformers config names a family fusesurgery has no native module for.

    Returns:
        ``(layout, note)``: the note says why the transformers layout was chosen (None for
        native).

    Raises:
        FuseSurgeryError: an input that cannot be opened.
    """
    decoders, towers = native_model_types()
    from fusesurgery.convert.configs import HF_WRAPPED_PARTS  # noqa: PLC0415

    # a multimodal checkpoint whose tower a native family reads (a full Gemma 3's SigLIP) is
    # a native tower, not a decoder given in its place
    towers = towers | frozenset(HF_WRAPPED_PARTS["vision"])
    types = {}
    for role, path in (("decoder", decoder_path), ("tower", encoder_path)):
        with open_checkpoint(path, remote_headers=True) as source:  # a Hub repo: no download
            document = source.config if source.config_file == "config.json" else None
        model_type = document.get("model_type") if isinstance(document, dict) else None
        types[role] = model_type if isinstance(model_type, str) else None
    if (types["decoder"] in towers - decoders or types["tower"] in decoders - towers
            or EXPORT_MODEL_TYPE in types.values()):
        return "native", None  # swapped or fused inputs: the native reader says so
    for role, known in (("decoder", decoders), ("tower", towers)):
        model_type = types[role]
        if model_type is not None and model_type not in known:
            return "transformers", (
                f"the {role}'s family {model_type!r} has no native module: written in the "
                "transformers layout (load it with AutoModelForImageTextToText)")
    return "native", None


__all__ = ["LAYOUTS", "choose_layout", "native_model_types"]
